"""Bad values on the command line and in files: refused at once with one clear line, never a
traceback, and nothing is run or modified."""

from __future__ import annotations

import json
import math
import os
import pickle

import pytest
from click.testing import CliRunner

from charseg import checkpoint as ckpt
from charseg.cli import FiniteFloat, cli
from charseg.config import TrainConfig
from charseg.errors import CheckpointError


def minimal_args(command: str, data) -> list[str]:
    """Arguments that get a command past parsing to its options."""
    return {"train": [str(data)], "resume": [str(data)], "finetune": [str(data), str(data)],
            "evaluate": [str(data), "--model", str(data)], "predict": [str(data), "--model", str(data), "--out", "o"],
            }.get(command, [])


def test_every_float_option_is_a_finite_float():
    import click

    floats = [(name, p.opts[0]) for name, c in cli.commands.items() for p in c.params
              if isinstance(p.type, (click.types.FloatParamType, click.FloatRange))]
    assert len(floats) >= 15
    assert all(isinstance(p.type, FiniteFloat) for c in cli.commands.values() for p in c.params
               if isinstance(p.type, (click.types.FloatParamType, click.FloatRange)))


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "NaN"])
def test_every_float_option_refuses_non_finite_values(tiny_dataset, value):
    cases = [(name, p.opts[0], p.nargs) for name, c in sorted(cli.commands.items()) for p in c.params
             if isinstance(p.type, FiniteFloat)]
    for command, option, nargs in cases:  # an option of two numbers (generate --tracking) gets the value twice
        result = CliRunner().invoke(cli, [command, *minimal_args(command, tiny_dataset), option, *[value] * nargs])
        assert result.exit_code == 2, (command, option, result.output)
        assert f"Invalid value for '{option}'" in result.output or "is not a finite number" in result.output, (
            command, option, result.output)
        assert "Traceback" not in result.output


def test_seeds_out_of_numpy_range_are_refused_at_parse_time(tiny_dataset):
    for seed in ("1180591620717411303424", "-1"):
        result = CliRunner().invoke(cli, ["train", str(tiny_dataset), "--seed", seed])
        assert result.exit_code == 2 and "--seed" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("field", ["lr", "momentum", "weight_decay", "lr_gamma", "clip_grad_norm", "warmup_factor",
                                   "val_fraction", "score_threshold", "scale_train", "scale_test"])
def test_the_python_api_refuses_non_finite_settings(field, tmp_path):
    for value in (math.nan, math.inf):
        with pytest.raises(ValueError, match=f"{field} must be a finite number"):
            TrainConfig(data_dir=str(tmp_path), **{field: value}).validate()


@pytest.mark.parametrize("field", ["scale_train", "scale_test"])
def test_the_python_api_refuses_a_page_scale_that_is_no_factor(field, tmp_path):
    for value in (-1.0, 9.0):
        with pytest.raises(ValueError, match=rf"{field} must be 0 \(resize to min_size\) or a factor in \(0, 8\]"):
            TrainConfig(data_dir=str(tmp_path), **{field: value}).validate()


def test_a_pickle_that_would_run_code_is_refused_in_plain_words(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))

    path = tmp_path / "evil.pth"
    with open(path, "wb") as fh:
        pickle.dump({"format": "charseg-checkpoint", "x": Payload()}, fh)
    before = path.read_bytes()
    with pytest.raises(CheckpointError) as info:
        ckpt.load_checkpoint(path)
    message = str(info.value)
    assert "holds Python objects that could run code" in message and "charseg loads tensors only" in message
    assert "weights_only set to False" not in message and "Re-running" not in message
    assert path.read_bytes() == before


def test_finetune_help_shows_one_default_for_lr_factor():
    result = CliRunner().invoke(cli, ["finetune", "--help"])
    line = " ".join(result.output.split("--lr-factor", 1)[1].split("--", 1)[0].split())
    assert line.count("[default:") == 1 and "[default: 0.2]" in line


# --- broken datasets: a table of cases, each a change to a one-page dataset -----------------

def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims WIDTHxHEIGHT (1-bit gray) with a cut-off image stream: what a
    decompression bomb looks like to a reader that checks sizes before decoding."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)[:20])


def _page(root, name="00001", size=(40, 30), rows=(("a", "[2,2,12,2,12,12,2,12]"),)):
    from PIL import Image

    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (255, 255, 255)).save(root / "images" / f"{name}.png")
    lines = ["char,polygon_json"] + [f'{c},"{p}"' for c, p in rows]
    (root / "annotations" / f"{name}.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")


def _circle(points: int) -> str:
    angles = [2 * math.pi * k / points for k in range(points)]
    return "[" + ",".join(f"{20 + 9 * math.cos(a):.4f},{15 + 9 * math.sin(a):.4f}" for a in angles) + "]"


def _case_truncated_png(root):
    path = root / "images" / "00002.png"
    _page(root, "00002")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _case_big(root, width, height, name="00002"):
    _page(root, name)
    (root / "images" / f"{name}.png").write_bytes(_png_header(width, height))


def _case_exif_rotated(root):
    from PIL import Image

    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned 90 degrees: 20 wide and 40 tall on screen
    Image.new("RGB", (40, 20), (250, 250, 250)).save(root / "images" / "00002.jpg", exif=exif)
    (root / "annotations" / "00002.csv").write_text('char,polygon_json\nb,"[2,25,18,25,18,38,2,38]"\n')


DATASET_CASES = {
    # name: (change to the dataset, kind of problem, text in its reason, instances left)
    "bow-tie polygon": (lambda r: _page(r, "00002", rows=(("x", "[0,0,10,10,10,0,0,10]"),)),
                        "skipped polygon", "crosses itself (its edges from point 1 and from point 3 intersect) and so "
                                           "encloses no area", 1),
    "one-sided crossing": (lambda r: _page(r, "00002", rows=(("x", "[1,1,10,1,10,10,4,0.5,1,10]"),)),
                           "self-crossing polygon", "crosses itself (its edges from point 1 and from point 3 "
                                                    "intersect); used as drawn", 2),
    "coordinate 1e18": (lambda r: _page(r, "00002", rows=(("x", "[1e18,0,10,0,10,10]"),)),
                        "skipped polygon", "coordinate of 1e+18 px", 1),
    "latin-1 CSV": (lambda r: (_page(r, "00002"), (r / "annotations" / "00002.csv").write_bytes(
        b'char,polygon_json\na,"[2,2,12,2,12,12]"\n\xe9,"[2,2,12,2,12,12]"\n')),
                    "skipped image", ":3: not UTF-8 text", 1),
    "100,000-point polygon": (lambda r: _page(r, "00002", rows=(("o", _circle(100_000)),)), None, None, 2),
    "truncated PNG": (_case_truncated_png, "skipped image", "damaged or cut short", 1),
    "12000x12000 PNG": (lambda r: _case_big(r, 12000, 12000), "skipped image", "over charseg's limit of 50 MP", 1),
    "30000x30000 PNG": (lambda r: _case_big(r, 30000, 30000), "skipped image", "image of more than", 1),
    "60000x1 PNG": (lambda r: _case_big(r, 60000, 1), "skipped image", "at most 100:1 between them", 1),
    "EXIF-rotated JPEG": (_case_exif_rotated, None, None, 2),
    "nested subfolder": (lambda r: _page(r / "images" / "batch2", "00009"), "file not used",
                         "subfolder not searched (2 files inside)", 1),
    "dangling symlink": (lambda r: (r / "images" / "00003.png").symlink_to(r / "nowhere.png"), "file not used",
                         "broken symbolic link", 1),
    "symlink loop": (lambda r: (r / "images" / "00004.png").symlink_to(r / "images" / "00004.png"), "file not used",
                     "broken symbolic link", 1),
    "GIF image": (lambda r: __import__("PIL.Image").Image.new("P", (20, 20)).save(r / "images" / "00005.gif"),
                  "file not used", "convert .gif images to PNG", 1),
    "PNG and JPEG of one name": (lambda r: (_page(r, "00002"), __import__("PIL.Image").Image.new("RGB", (40, 30)).save(
        r / "images" / "00002.jpg")), "skipped image", "00002.jpg and 00002.png would share", 1),
    "empty char cell": (lambda r: _page(r, "00002", rows=(("", "[2,2,12,2,12,12,2,12]"),)),
                        "polygon without a character", ":2: empty char cell; the polygon is used with char '?'", 2),
    "NUL char cell": (lambda r: _page(r, "00002", rows=(("\0", "[2,2,12,2,12,12,2,12]"),)),
                      "polygon without a character", "holds the control character U+0000", 2),
}


def _fingerprint(root) -> dict:
    return {str(p): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*")) if not p.is_symlink()}


@pytest.mark.parametrize("case", sorted(DATASET_CASES))
def test_broken_datasets_are_reported_with_file_and_reason_and_left_untouched(case, tmp_path):
    from charseg.data.dataset import scan_dataset

    change, kind, text, instances = DATASET_CASES[case]
    root = tmp_path / "data"
    _page(root)
    change(root)
    before = _fingerprint(root)
    report = scan_dataset(root)
    assert _fingerprint(root) == before  # never modified
    assert report.num_instances == instances, report.format()
    if kind is None:
        assert report.problems() == [], report.format()
    else:
        assert any(k == kind and text in str(p) for k, p in report.problems()), report.format()
    result = CliRunner().invoke(cli, ["validate-data", str(root)])
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output


def test_an_exif_rotated_page_is_read_upright(tmp_path):
    from charseg.data.dataset import scan_dataset
    from charseg.data.images import load_image_rgb

    root = tmp_path / "data"
    _page(root)
    _case_exif_rotated(root)
    sample = {s.name: s for s in scan_dataset(root).samples}["00002"]
    assert (sample.width, sample.height) == (20, 40)
    assert load_image_rgb(sample.image_path).shape == (40, 20, 3)


def test_predict_skips_pages_it_cannot_use_and_names_them(light_checkpoint, tiny_dataset, tmp_path):
    import shutil


    inputs = tmp_path / "in"
    inputs.mkdir()
    shutil.copy(tiny_dataset / "images" / "00001.png", inputs / "good.png")
    (inputs / "thin.png").write_bytes(_png_header(60000, 1))
    (inputs / "bomb.png").write_bytes(_png_header(30000, 30000))
    from PIL import Image

    Image.open(inputs / "good.png").save(inputs / "scan.tif")  # a scanner's format is read as a PNG is
    (inputs / "scan.pdf").write_bytes(b"%PDF-1.4")
    (inputs / "more").mkdir()
    (inputs / ".DS_Store").write_bytes(b"")
    result = CliRunner().invoke(cli, ["predict", str(inputs), "--model", str(light_checkpoint),
                                      "--out", str(tmp_path / "out")])
    assert result.exit_code == 0 and "Traceback" not in result.output
    assert f"skipped {inputs / 'thin.png'}: image is 60000x1" in result.stderr
    assert f"skipped {inputs / 'bomb.png'}: image of more than" in result.stderr
    assert f"not read in {inputs}: 2 entries that are not .png/" in result.stderr
    assert "(more/, scan.pdf)" in result.stderr
    assert "in 2 images" in result.stdout and "2 images skipped" in result.stdout
    assert sorted(p.name for p in (tmp_path / "out" / "images").iterdir()) == ["good.png", "scan.png"]


def test_training_prints_each_skip_but_counts_polygons_it_uses_all_the_same(tmp_path):
    from charseg.data.dataset import scan_dataset

    root = tmp_path / "data"
    _page(root, rows=(("a", "[1,1,10,1,10,10,4,0.5,1,10]"), ("b", "[1,1,10,1,10,10,4,0.5,1,10]"),
                      ("c", "[-5,2,12,2,12,12]"), ("d", "[1,2,3]")))
    report = scan_dataset(root)
    assert report.problem_lines(brief=True) == [
        f"skipped polygon: {root / 'annotations' / '00001.csv'}:5: polygon has an odd number of values (3); expected "
        "x,y pairs",
        f"1 clipped polygon, used all the same: run `charseg validate-data {root}` to list them",
        f"2 self-crossing polygons, used all the same: run `charseg validate-data {root}` to list them"]
    assert len(report.problem_lines()) == 4  # validate-data lists every one


def test_a_char_cell_that_names_no_character_is_exported_as_unknown(tmp_path):
    from charseg.data.coco import export_coco

    root = tmp_path / "data"
    _page(root, rows=(("a", "[2,2,12,2,12,12,2,12]"), ("", "[20,2,30,2,30,12]"), ("\0", "[2,15,12,15,12,25]")))
    counts, problems = export_coco(root, tmp_path / "coco.json")
    categories = [c["name"] for c in json.loads((tmp_path / "coco.json").read_text())["categories"]]
    assert sorted(categories) == ["?", "a"] and counts["annotations"] == 3
    assert len([p for p in problems if "polygon without a character" in p]) == 2


# --- options: every number has an upper bound its consumer can hold ------------------------

def _ranged_options():
    import click

    return [(name, p) for name, c in sorted(cli.commands.items()) for p in c.params
            if isinstance(p.type, (click.IntRange, click.FloatRange))]


def test_every_numeric_option_has_an_upper_bound_shown_in_help():
    import click

    numbers = [(name, p.opts[0]) for name, c in cli.commands.items() for p in c.params
               if isinstance(p.type, (click.types.IntParamType, click.types.FloatParamType))]
    unbounded = [(name, p.opts[0]) for name, p in _ranged_options() if p.type.max is None]
    assert len(_ranged_options()) == len(numbers) >= 40 and unbounded == []
    help_text = CliRunner().invoke(cli, ["train", "--help"]).output
    assert "--num-workers" in help_text and f"0<=x<={max(os.cpu_count(), 2)}" in help_text


@pytest.mark.parametrize("command", ["train", "resume", "finetune", "evaluate", "predict", "generate"])
def test_a_value_past_any_upper_bound_is_refused_at_parse_time(command, tiny_dataset):
    cases = [p for name, p in _ranged_options() if name == command]
    assert cases
    for param in cases:
        too_big = "1e300" if "float" in param.type.name else "1000000000000"
        result = CliRunner().invoke(cli, [command, *minimal_args(command, tiny_dataset), param.opts[0],
                                          *[too_big] * param.nargs])
        assert result.exit_code == 2, (command, param.opts[0], result.output)
        assert f"Invalid value for '{param.opts[0]}'" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("field, value, text", [
    ("lr", 1e300, "lr must be in (0, 1e+06] (the optimizer's float32; far past the rates that diverge at once), "
                  "got 1e+300"),
    ("weight_decay", 1e300, "weight_decay must be in [0, 1e+06]"),
    ("lr_gamma", 1e300, "lr_gamma must be in (0, 1]"),
    ("fpn_channels", 10**12, "fpn_channels must be in [32, 1024]"),
    ("num_workers", 10**12, "num_workers must be in [0, 256]"),
    ("detections_per_img", 10**12, "detections_per_img must be in [0, 100000]"),
])
def test_the_python_api_refuses_what_no_run_can_hold(field, value, text, tmp_path):
    with pytest.raises(ValueError) as info:
        TrainConfig(data_dir=str(tmp_path), **{field: value}).validate()
    assert text in str(info.value)


@pytest.mark.parametrize("args, text", [
    (["--size", "100000000x100000000"], "need 1 to 1000000 images of 8x8 to 8192x8192 pixels"),
    (["--font-size", "1000000000"], "font size must be 4 <= min <= max <= 1024"),
    (["--chars-per-image", "1000000000"], "chars per image must be 1 <= min <= max <= 100000"),
])
def test_generate_refuses_pages_it_cannot_draw(args, text, tmp_path):
    result = CliRunner().invoke(cli, ["generate", str(tmp_path / "g"), "--num-images", "1", *args])
    assert result.exit_code == 1 and f"Error: {text}" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "g").exists()


def test_a_scattered_page_stops_when_it_is_full(tmp_path):
    from charseg.data.generate import generate_dataset

    summary = generate_dataset(tmp_path / "g", num_images=1, width=32, height=32, chars_per_image=(100_000, 100_000),
                               font_size=(12, 12))
    assert 0 < summary.characters < 50


# --- files that are empty, garbage or hold nothing ------------------------------------------

def test_a_zero_byte_checkpoint_or_weights_file_is_one_line(tiny_dataset, tmp_path):
    empty = tmp_path / "model.pth"
    empty.write_bytes(b"")
    for args in (["predict", str(tiny_dataset / "images"), "--model", str(empty), "--out", str(tmp_path / "o")],
                 ["evaluate", str(tiny_dataset), "--model", str(empty)],
                 ["train", str(tiny_dataset), "--weights", str(empty), "--epochs", "1"]):
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 1 and "Traceback" not in result.output, (args, result.output)
        assert f"Error: {empty}: not a" in result.output and "the file is empty (0 bytes)" in result.output
    assert empty.read_bytes() == b""


def test_predict_refuses_two_inputs_that_would_write_the_same_files(tiny_dataset, tmp_path):
    import shutil

    inputs = tmp_path / "in"
    inputs.mkdir()
    shutil.copy(tiny_dataset / "images" / "00001.png", inputs / "page.png")
    from PIL import Image

    Image.open(inputs / "page.png").convert("RGB").save(inputs / "page.jpg")
    result = CliRunner().invoke(cli, ["predict", str(inputs), "--model", str(tmp_path / "none.pth"),
                                      "--out", str(tmp_path / "out")])
    assert result.exit_code == 1 and "would both be written as page.csv and page.png" in result.output
    assert not (tmp_path / "out").exists()


def _coco_file(tmp_path, annotations, images=None):
    from PIL import Image

    (tmp_path / "imgs").mkdir(exist_ok=True)
    Image.new("RGB", (40, 30), (255, 255, 255)).save(tmp_path / "imgs" / "p.png")
    images = [{"id": 1, "file_name": "p.png", "width": 40, "height": 30}] if images is None else images
    path = tmp_path / "coco.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations,
                                "categories": [{"id": 1, "name": "a"}]}))
    return path


def test_import_coco_lists_garbage_rle_and_foreign_entries_as_skipped(tmp_path):
    good = {"id": 1, "image_id": 1, "category_id": 1, "segmentation": [[2, 2, 12, 2, 12, 12, 2, 12]]}
    garbage = [{"id": 7, "image_id": 1, "category_id": 1, "segmentation": {"size": [30, 40], "counts": "garbage!!"}},
               {"id": 8, "image_id": 1, "category_id": 1, "segmentation": {"size": [30, 40], "counts": [1.5, 2]}},
               {"id": 9, "image_id": 1, "category_id": 1, "segmentation": {"size": [30, 40], "counts": [5, 3]}},
               {"id": 10, "image_id": 1, "category_id": 1, "segmentation": [[1e300, 2, 3, 4, 5, 6], [1, 1, 5, 1, 5, 5]]},
               "not an annotation"]
    coco = _coco_file(tmp_path, [good, *garbage])
    before = coco.read_bytes()
    result = CliRunner().invoke(cli, ["import-coco", str(coco), str(tmp_path / "imgs"), str(tmp_path / "out")])
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    assert "imported 1 images and 1 characters" in result.output and "5 problems" in result.output
    for text in ("annotation 7 (image 1): unreadable RLE (compressed RLE counts are not COCO's encoding",
                 "annotation 8 (image 1): unreadable RLE (RLE counts hold something other than non-negative",
                 "annotation 9 (image 1): unreadable RLE (RLE counts cover 8 pixels, the image 30x40 has 1200)",
                 "annotation 10 (image 1): polygon holds a coordinate of 1e+300 px (beyond +-1e+06); check its units",
                 'annotations[6]: "not an annotation" is not a JSON object; not imported'):
        assert text in result.output, result.output
    assert coco.read_bytes() == before


def test_import_coco_of_images_without_annotations_says_so_and_writes_nothing(tmp_path):
    coco = _coco_file(tmp_path, [])
    result = CliRunner().invoke(cli, ["import-coco", str(coco), str(tmp_path / "imgs"), str(tmp_path / "out")])
    assert result.exit_code == 1 and "1 images but no annotations, so nothing to train on" in result.output
    assert not (tmp_path / "out").exists() and "Traceback" not in result.output


def test_import_coco_that_imports_no_character_fails_and_counts_empty_pages(tmp_path):
    box_only = {"id": 3, "image_id": 1, "category_id": 1, "bbox": [1, 1, 5, 5]}
    coco = _coco_file(tmp_path, [box_only])
    result = CliRunner().invoke(cli, ["import-coco", str(coco), str(tmp_path / "imgs"), str(tmp_path / "out")])
    assert result.exit_code == 1 and "warning: 1 of 1 images have no character imported (p)" in result.output
    assert "Error: no character imported from" in result.output and "Traceback" not in result.output


def test_export_coco_of_a_dataset_with_no_usable_image_fails_and_writes_nothing(tmp_path):
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    result = CliRunner().invoke(cli, ["export-coco", str(root), str(tmp_path / "coco.json")])
    assert result.exit_code == 1 and "no usable image (0 found), nothing to export" in result.output
    assert not (tmp_path / "coco.json").exists()
