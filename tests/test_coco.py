"""COCO instances JSON in and out: pycocotools reads what charseg writes, a round trip keeps
every polygon, and a labelling tool's export (written here from the COCO format spec) imports."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from charseg.cli import cli
from charseg.data.coco import export_coco, import_coco, predictions_to_coco
from charseg.data.dataset import scan_dataset
from charseg.errors import DatasetError
from charseg.inference.predict import Instance


def polygons_and_chars(data_dir):
    return [(s.name, [p.round(2).tolist() for p in s.polygons], s.chars) for s in scan_dataset(data_dir).samples]


def test_export_import_export_keeps_every_polygon(tiny_dataset, tmp_path):
    counts, problems = export_coco(tiny_dataset, tmp_path / "a.json")
    coco = COCO(str(tmp_path / "a.json"))  # pycocotools loads it and indexes every annotation
    assert counts["images"] == 4 and len(coco.getAnnIds()) == counts["annotations"] > 0 and problems == []
    assert {c["name"] for c in coco.loadCats(coco.getCatIds())} == {c for s in scan_dataset(tiny_dataset).samples
                                                                    for c in s.chars}
    ann = coco.loadAnns(coco.getAnnIds())[0]
    assert coco.annToMask(ann).sum() > 0 and ann["iscrowd"] == 0 and len(ann["bbox"]) == 4

    report = import_coco(tmp_path / "a.json", tiny_dataset / "images", tmp_path / "imported")
    assert report.problems == [] and report.traced == 0 and report.characters == counts["annotations"]
    assert polygons_and_chars(tmp_path / "imported") == polygons_and_chars(tiny_dataset)
    export_coco(tmp_path / "imported", tmp_path / "b.json")
    COCO(str(tmp_path / "b.json"))
    import_coco(tmp_path / "b.json", tmp_path / "imported" / "images", tmp_path / "again")
    assert polygons_and_chars(tmp_path / "again") == polygons_and_chars(tiny_dataset)


def tool_export(tmp_path):
    """A CVAT 'COCO 1.0' export as the COCO spec lays it out: licenses and info, attributes,
    a polygon, an instance of two rings, an iscrowd RLE (uncompressed counts), a compressed
    RLE, a box without segmentation, an annotation of an unknown image, a missing file."""
    images = tmp_path / "tool" / "images"
    (images / "batch1").mkdir(parents=True)
    page = np.full((30, 40, 3), 255, np.uint8)
    page[5:20, 5:12] = 0
    Image.fromarray(page).save(images / "batch1" / "page one.png")
    square = np.zeros((30, 40), np.uint8, order="F")
    square[10:20, 20:30] = 1
    compressed = mask_utils.encode(square)
    runs, previous, count = [], 0, 0  # uncompressed RLE: column-major run lengths from 0s
    for value in square.flatten(order="F"):
        if value != previous:
            runs.append(count)
            previous, count = value, 0
        count += 1
    runs.append(count)
    coco = {
        "licenses": [{"name": "", "id": 0, "url": ""}],
        "info": {"contributor": "", "date_created": "", "description": "", "url": "", "version": "", "year": ""},
        "categories": [{"id": 1, "name": "A", "supercategory": ""}, {"id": 2, "name": "i", "supercategory": ""}],
        "images": [{"id": 1, "width": 40, "height": 30, "file_name": "batch1/page one.png", "license": 0,
                    "flickr_url": "", "coco_url": "", "date_captured": 0},
                   {"id": 2, "width": 40, "height": 30, "file_name": "batch1/missing.png", "license": 0}],
        "annotations": [
            {"id": 11, "image_id": 1, "category_id": 1, "segmentation": [[5.0, 5.0, 12.0, 5.0, 12.0, 20.0, 5.0, 20.0]],
             "area": 105.0, "bbox": [5.0, 5.0, 7.0, 15.0], "iscrowd": 0,
             "attributes": {"occluded": False, "char": "B"}},
            {"id": 12, "image_id": 1, "category_id": 2, "segmentation": [
                [30.0, 8.0, 33.0, 8.0, 33.0, 20.0, 30.0, 20.0], [30.0, 3.0, 33.0, 3.0, 33.0, 6.0, 30.0, 6.0]],
             "area": 45.0, "bbox": [30.0, 3.0, 3.0, 17.0], "iscrowd": 0, "attributes": {"occluded": False}},
            {"id": 13, "image_id": 1, "category_id": 1, "segmentation": {"size": [30, 40], "counts": runs},
             "area": 100.0, "bbox": [20.0, 10.0, 10.0, 10.0], "iscrowd": 1, "attributes": {"char": "C"}},
            {"id": 14, "image_id": 1, "category_id": 1,
             "segmentation": {"size": [30, 40], "counts": compressed["counts"].decode("ascii")},
             "area": 100.0, "bbox": [20.0, 10.0, 10.0, 10.0], "iscrowd": 0},
            {"id": 15, "image_id": 1, "category_id": 1, "segmentation": [], "area": 4.0, "bbox": [1, 1, 2, 2],
             "iscrowd": 0},
            {"id": 16, "image_id": 9, "category_id": 1, "segmentation": [[1, 1, 5, 1, 5, 5]], "iscrowd": 0},
            {"id": 17, "image_id": 2, "category_id": 1, "segmentation": [[1, 1, 5, 1, 5, 5]], "iscrowd": 0},
        ],
    }
    path = tmp_path / "tool" / "instances_default.json"
    path.write_text(json.dumps(coco))
    return path, images


def test_a_labelling_tools_export_imports_and_says_what_it_could_not(tmp_path):
    path, images = tool_export(tmp_path)
    report = import_coco(path, images, tmp_path / "out")
    assert (report.images, report.characters, report.traced) == (1, 4, 3)
    problems = "\n".join(report.problems)
    assert "annotation 15 (image 1): no segmentation (a box only)" in problems and "not imported" in problems
    assert "annotation 12 (image 1): 2 separate parts; kept the largest (81% of the area)" in problems
    assert "image_id 9: 1 annotation(s) of an image that is not in 'images'" in problems
    assert "image 2 (" in problems and "missing.png): cannot read image" in problems
    [sample] = scan_dataset(tmp_path / "out").samples
    assert sample.name == "page one" and sample.chars == ["A", "i", "A", "A"]
    rows = {c: p for c, p in zip(sample.chars, sample.polygons)}
    # The RLE square traced on its pixels' edges (within 1/8 px, as predict traces masks).
    assert np.allclose(rows["A"], [[20, 10], [20, 20], [30, 20], [30, 10]], atol=0.13)
    first = (tmp_path / "out" / "annotations" / "page one.csv").read_text().splitlines()[1]
    assert first == 'A,"[5.0, 5.0, 12.0, 5.0, 12.0, 20.0, 5.0, 20.0]"'  # one ring: copied as it is

    by_attribute = import_coco(path, images, tmp_path / "attr", char_from="attribute:char")
    assert scan_dataset(tmp_path / "attr").samples[0].chars == ["B", "?", "C", "?"]
    assert "annotation 12 (image 1): no attribute 'char'; char '?'" in by_attribute.problems


def test_import_refuses_what_is_not_coco_and_an_existing_dataset(tiny_dataset, tmp_path):
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(DatasetError, match="not COCO instances JSON"):
        import_coco(tmp_path / "list.json", tiny_dataset / "images", tmp_path / "o")
    export_coco(tiny_dataset, tmp_path / "a.json")
    with pytest.raises(DatasetError, match="already holds a dataset"):
        import_coco(tmp_path / "a.json", tiny_dataset / "images", tiny_dataset)
    result = CliRunner().invoke(cli, ["import-coco", str(tmp_path / "a.json"), str(tiny_dataset / "images"),
                                      str(tmp_path / "o"), "--char-from", "colour"])
    assert result.exit_code == 1 and "Error: --char-from 'colour'" in result.output


def test_commands_and_predictions_as_coco_results(tiny_dataset, tmp_path):
    result = CliRunner().invoke(cli, ["export-coco", str(tiny_dataset), str(tmp_path / "d.json")])
    assert result.exit_code == 0 and "wrote 4 images" in result.output
    result = CliRunner().invoke(cli, ["import-coco", str(tmp_path / "d.json"), str(tiny_dataset / "images"),
                                      str(tmp_path / "back")])
    assert result.exit_code == 0 and "0 problems" in result.output
    gt = COCO(str(tmp_path / "d.json"))
    instances = [Instance(0.9, [5.0, 5.0, 12.0, 20.0], [5.0, 5.0, 12.0, 5.0, 12.0, 20.0, 5.0, 20.0])]
    pages = [(im["file_name"], im["width"], im["height"], instances) for im in gt.loadImgs(gt.getImgIds())]
    for segmentation in ("polygon", "rle"):
        predicted = predictions_to_coco(pages, segmentation)
        results = gt.loadRes(predicted["annotations"])  # what COCOeval reads
        assert len(results.getAnnIds()) == 4 and results.loadAnns(1)[0]["score"] == 0.9
        assert abs(results.loadAnns(1)[0]["area"] - 105.0) < 8
