"""Dataset reading and validation: every bad-input case gives its warning, nothing is modified."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from charseg.data.dataset import parse_polygon, scan_dataset
from charseg.data.images import load_image_rgb
from charseg.data.loading import CharacterDataset
from charseg.errors import DatasetError
from charseg.polygons import clip_polygon_to_image, polygon_area, polygons_to_masks


def write_dataset(root: Path, annotations: dict[str, str], images: dict[str, tuple[int, int]]) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "annotations").mkdir()
    for name, (w, h) in images.items():
        Image.new("RGB", (w, h), (255, 255, 255)).save(root / "images" / f"{name}.png")
    for name, text in annotations.items():
        (root / "annotations" / f"{name}.csv").write_text(text, encoding="utf-8")
    return root


GOOD = "[2,2,20,2,20,20,2,20]"


def test_generated_dataset_is_fully_valid(tiny_dataset):
    report = scan_dataset(tiny_dataset)
    assert len(report.samples) == 4
    assert report.problems() == []
    assert report.num_instances >= 8


def test_target_holds_boxes_labels_and_polygons_not_full_masks(tiny_dataset):
    dataset = CharacterDataset(scan_dataset(tiny_dataset).samples)
    image, target, name = dataset[0]
    sample = dataset.samples[0]
    n = len(sample.polygons)
    assert image.shape == (3, 64, 64) and image.dtype.is_floating_point and 0 <= image.min() <= image.max() <= 1
    assert target["boxes"].shape == (n, 4) and "masks" not in target
    assert target["polygon_lengths"].tolist() == [len(p) for p in sample.polygons]
    assert target["polygon_points"].shape == (sum(len(p) for p in sample.polygons), 2)
    assert target["image_size"].tolist() == [64, 64]
    assert target["labels"].tolist() == [1] * n
    assert name == "00001"
    boxes = target["boxes"]
    assert bool(((boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])).all())
    stock = CharacterDataset(dataset.samples, full_masks=True)[0][1]
    assert stock["masks"].shape == (n, 64, 64)


@pytest.mark.parametrize("cell, reason", [
    ("[1,2,3,4,5]", "odd number of values"),
    ("[1,2,3,4]", "at least 3 are needed"),
    ('[1,2,"a",4,5,6]', "non-number"),
    ("[1,2,NaN,4,5,6]", "non-finite"),
    ("[1,2,Infinity,4,5,6]", "non-finite"),
    ("[1,1,5,5,9,9]", "zero area"),
    ("[100,100,120,100,120,120]", "wholly outside"),
    ("[1,2,3", "not valid JSON"),
    ('{"x": 1}', "flat JSON list"),
    ("[true,2,3,4,5,6]", "non-number"),
    ("[1,2,1" + "0" * 400 + ",4,5,6]", "coordinate of 401 digits"),  # past float range: named, not a crash
    ("[1,2," + "1" * 5000 + ",4,5,6]", "more than 4300 digits"),  # past what Python reads as an int
])
def test_bad_polygon_is_skipped_with_reason(cell, reason):
    points, note = parse_polygon(cell, 50, 50)
    assert points is None
    assert reason in note


def test_polygon_partly_outside_is_clipped_exactly():
    points, note = parse_polygon("[-10,-10,10,-10,10,10,-10,10]", 50, 50)
    assert "clipped" in note
    assert polygon_area(points) == pytest.approx(100.0)
    assert points.min() >= 0


def test_clip_keeps_inside_polygon_unchanged():
    square = np.array([[1, 1], [5, 1], [5, 5], [1, 5]], dtype=np.float32)
    assert np.allclose(clip_polygon_to_image(square, 10, 10), square)
    # on the window's edges is inside: the same points, in order, as float32
    edges = np.array([[0, 0], [10, 0], [10, 7.25], [3.5, 10], [0, 10]], dtype=np.float64)
    clipped = clip_polygon_to_image(edges, 10, 10)
    assert clipped.dtype == np.float32 and np.array_equal(clipped, edges.astype(np.float32))
    just_past = edges + [[0, 0], [1e-3, 0], [0, 0], [0, 0], [0, 0]]
    assert clip_polygon_to_image(just_past, 10, 10)[:, 0].max() == 10  # clipped back to the edge


def test_mask_rasterises_polygon_area():
    mask = polygons_to_masks([np.array([[2, 2], [12, 2], [12, 12], [2, 12]], dtype=np.float32)], 20, 20)
    assert mask.shape == (1, 20, 20)
    assert abs(int(mask.sum()) - 100) <= 21  # area 100 plus at most one edge row/column


def test_broken_dataset_report_names_file_line_and_reason(tmp_path):
    root = write_dataset(tmp_path / "d", images={"a": (50, 50), "b": (50, 50), "c": (50, 50), "e": (50, 50)}, annotations={
        "a": f'char,polygon_json\n"x,""y",{json.dumps(GOOD)}\nq,"[1,2,3]"\nr,"[-5,-5,10,-5,10,10,-5,10]"\n',
        "b": 'char,polygon_json\nz,"[1,2,NaN,4,5,6]"\n',
        "c": "letter,points\nx,[1,2]\n",
        "orphan": f'char,polygon_json\nx,"{GOOD}"\n',
    })
    report = scan_dataset(root)
    assert [s.name for s in report.samples] == ["a"]
    assert report.samples[0].chars == ['x,"y', "r"]  # CSV-quoted comma and quote survive
    skipped = {(Path(p.path).name, p.line): p.reason for p in report.skipped_polygons}
    assert "odd number" in skipped[("a.csv", 3)]
    assert "non-finite" in skipped[("b.csv", 2)]
    assert [(Path(p.path).name, p.line) for p in report.clipped_polygons] == [("a.csv", 4)]
    images = {Path(p.path).name: p.reason for p in report.skipped_images}
    assert "no valid polygon" in images["b.png"]
    assert "expected char,polygon_json" in images["c.csv"]
    assert "no annotation file" in images["e.png"]
    assert [Path(p.path).name for p in report.orphan_annotations] == ["orphan.csv"]
    text = report.format()
    assert f"{root / 'annotations' / 'a.csv'}:3: polygon has an odd number" in text


def test_scan_never_modifies_inputs(tmp_path):
    root = write_dataset(tmp_path / "d", images={"a": (30, 30)},
                         annotations={"a": 'char,polygon_json\nx,"[-5,-5,10,-5,10,10]"\ny,"[1]"\n'})
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()}
    scan_dataset(root)
    after = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()}
    assert before == after


def test_missing_folders_raise_clear_errors(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        scan_dataset(tmp_path / "nope")
    with pytest.raises(DatasetError, match="images"):
        scan_dataset(tmp_path)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16", "LA", "1"])
def test_any_image_mode_becomes_rgb(tmp_path, mode):
    path = tmp_path / "img.png"
    if mode == "I;16":
        Image.fromarray(np.full((8, 6), 65535, dtype=np.uint16)).save(path)
    else:
        Image.new("RGB", (6, 8), (200, 10, 10)).convert(mode).save(path)
    rgb = load_image_rgb(path)
    assert rgb.shape == (8, 6, 3) and rgb.dtype == np.uint8
    if mode == "I;16":
        assert rgb.min() == 255  # full-scale 16-bit white stays white, not clipped garbage


@pytest.mark.parametrize("top", [1.0, 255.0, 65535.0])
def test_a_float_tiff_reads_by_its_range(tmp_path, top):
    """A mode F page (float TIFF): 0-1, 0-255 or 0-65535 values all read as the same gray ramp
    (Pillow's own conversion clips, so a 0-1 page came out black)."""
    ramp = np.linspace(0.0, 1.0, 6 * 8).reshape(8, 6)
    path = tmp_path / "img.tiff"
    Image.fromarray((ramp * top).astype(np.float32), mode="F").save(path)
    rgb = load_image_rgb(path)
    assert rgb.shape == (8, 6, 3) and rgb.dtype == np.uint8
    assert np.abs(rgb[:, :, 0].astype(int) - np.rint(ramp * 255)).max() <= 1


def test_a_float_page_out_of_every_range_is_refused(tmp_path):
    path = tmp_path / "img.tiff"
    Image.fromarray(np.full((8, 6), 1e6, dtype=np.float32), mode="F").save(path)
    with pytest.raises(DatasetError, match=r"img.tiff: float image with values up to 1e\+06.*rescale it"):
        load_image_rgb(path)


def test_unreadable_image_is_reported(tmp_path):
    root = write_dataset(tmp_path / "d", images={}, annotations={"a": f'char,polygon_json\nx,"{GOOD}"\n'})
    (root / "images" / "a.png").write_bytes(b"not a png")
    report = scan_dataset(root)
    assert not report.samples
    assert "cannot read image" in report.skipped_images[0].reason
