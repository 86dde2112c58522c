"""Bad values on the command line and in files: refused at once with one clear line, never a
traceback, and nothing is run or modified."""

from __future__ import annotations

import math
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
    cases = [(name, p.opts[0]) for name, c in sorted(cli.commands.items()) for p in c.params
             if isinstance(p.type, FiniteFloat)]
    for command, option in cases:
        result = CliRunner().invoke(cli, [command, *minimal_args(command, tiny_dataset), option, value])
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
}


def _fingerprint(root) -> dict:
    return {str(p): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*")) if not p.is_symlink()}


@pytest.mark.parametrize("case", sorted(DATASET_CASES))
def test_broken_datasets_are_reported_with_file_and_reason_and_left_untouched(case, tmp_path):
    from charseg.data import scan_dataset

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
    from charseg.data import load_image_rgb, scan_dataset

    root = tmp_path / "data"
    _page(root)
    _case_exif_rotated(root)
    sample = {s.name: s for s in scan_dataset(root).samples}["00002"]
    assert (sample.width, sample.height) == (20, 40)
    assert load_image_rgb(sample.image_path).shape == (40, 20, 3)


def test_predict_skips_pages_it_cannot_use_and_names_them(tiny_dataset, tmp_path):
    import shutil

    from charseg import runner
    from conftest import light_config

    trained = runner.train(light_config(tiny_dataset, tmp_path / "run", epochs=1))
    inputs = tmp_path / "in"
    inputs.mkdir()
    shutil.copy(tiny_dataset / "images" / "00001.png", inputs / "good.png")
    (inputs / "thin.png").write_bytes(_png_header(60000, 1))
    (inputs / "bomb.png").write_bytes(_png_header(30000, 30000))
    result = CliRunner().invoke(cli, ["predict", str(inputs), "--model", str(trained.final_checkpoint),
                                      "--out", str(tmp_path / "out")])
    assert result.exit_code == 0 and "Traceback" not in result.output
    assert f"skipped {inputs / 'thin.png'}: image is 60000x1" in result.stderr
    assert f"skipped {inputs / 'bomb.png'}: image of more than" in result.stderr
    assert "in 1 images" in result.stdout and "2 images skipped" in result.stdout


def test_training_prints_each_skip_but_counts_polygons_it_uses_all_the_same(tmp_path):
    from charseg.data import scan_dataset

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
