"""The command line as a user meets it: help, errors, validate-data, a real train and resume."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
from click.testing import CliRunner
from conftest import LIGHT_ARGS

from charseg.cli import cli
from charseg.config import TrainConfig


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


START_UP = """
import sys, torch
import charseg.cli
assert "torch._dynamo" not in sys.modules, "importing charseg imported torch._dynamo"
assert "torch._dynamo.utils" not in sys.modules, "the stand-in stayed in sys.modules"
roi_align = sys.modules["torchvision.ops.roi_align"]
assert roi_align.is_compile_supported("cpu") is True
import torch._dynamo.utils
assert torch._dynamo.utils.is_compile_supported("cpu") is True
assert torch.compile(lambda x: x + 1, backend="eager")(torch.ones(1)).item() == 2
print("ok")
"""


def test_a_charseg_process_starts_without_torch_dynamo_and_can_still_compile():
    """charseg.startup: torchvision imported without dynamo (1.1 s of every process's start);
    what torchvision asks of dynamo, and torch.compile, still work afterwards."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", START_UP], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


@pytest.mark.parametrize("command", ["train", "finetune"])
def test_help_lists_every_training_option(command):
    text = invoke(command, "--help").output
    skip = {"mode", "data_dir", "init_checkpoint", "lr_factor", "weights", "backbone",
            "world_size"}  # set from torchrun's WORLD_SIZE, not an option
    if command == "finetune":
        # the architecture the source weights were trained with
        skip |= {"anchor_sizes", "norm", "fpn_channels", "mask_pixels", "mask_head_convs", "mask_head_channels"}
    for name in TrainConfig.__dataclass_fields__:
        if name not in skip:
            assert f"--{name.replace('_', '-')}" in text, name
    assert "[default: 15107]" in text


def test_validate_data_on_broken_dataset(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "annotations").mkdir()
    from PIL import Image
    Image.new("L", (20, 20)).save(tmp_path / "images" / "p1.png")
    (tmp_path / "annotations" / "p1.csv").write_text('char,polygon_json\na,"[1,2,3,4,5]"\nb,"[0,0,0,0,0,0]"\n')
    result = CliRunner().invoke(cli, ["validate-data", str(tmp_path)])
    assert result.exit_code == 1
    assert "images usable:            0" in result.output
    assert re.search(r"skipped polygon: .*p1\.csv:2: polygon has an odd number of values \(5\)", result.output)
    assert re.search(r"skipped polygon: .*p1\.csv:3: polygon has zero area", result.output)
    assert "Error: " in result.output and "no usable image" in result.output


def test_validate_data_on_good_dataset(tiny_dataset):
    result = invoke("validate-data", str(tiny_dataset))
    assert result.exit_code == 0 and "images usable:            4" in result.output


def test_wrong_data_path_is_one_clear_error(tmp_path):
    result = CliRunner().invoke(cli, ["train", str(tmp_path / "nope")])
    assert result.exit_code == 2 and "does not exist" in result.output


def test_wrong_device_is_one_clear_error(tiny_dataset, tmp_path):
    result = CliRunner().invoke(cli, ["train", str(tiny_dataset), *LIGHT_ARGS, "--device", "tpu",
                                      "--output-dir", str(tmp_path)])
    assert result.exit_code == 1 and "--device 'tpu' is not a device" in result.output


def test_generate_writes_the_dataset_format(tmp_path):
    result = invoke("generate", str(tmp_path / "g"), "--num-images", "2", "--size", "80x60", "--seed", "1")
    assert result.exit_code == 0, result.output
    lines = (tmp_path / "g" / "annotations" / "00001.csv").read_text().splitlines()
    assert lines[0] == "char,polygon_json"
    points = json.loads(lines[1].split(",", 1)[1].strip('"'))
    assert len(points) >= 6 and len(points) % 2 == 0
    assert invoke("validate-data", str(tmp_path / "g")).exit_code == 0


@pytest.mark.slow
def test_train_then_resume_via_cli(tiny_dataset, tmp_path):
    out = tmp_path / "run"
    result = invoke("train", str(tiny_dataset), *LIGHT_ARGS, "--epochs", "1", "--output-dir", str(out))
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == [".charseg.lock", "model_epoch_001.pth", "model_final.pth"]
    result = invoke("resume", str(out / "model_final.pth"), "--epochs", "2")
    assert result.exit_code == 0, result.output
    assert (out / "model_epoch_002.pth").is_file()
    result = invoke("resume", str(out / "model_epoch_002.pth"))
    assert result.exit_code == 0 and "already finished all 2 epochs" in result.output
    # A folder resumes from its latest checkpoint that loads, in that folder (the seed script's way).
    (out / "model_epoch_009.pth").write_bytes(b"cut short by a killed writer")
    result = invoke("resume", str(out), "--epochs", "3")
    assert result.exit_code == 0, result.output
    assert f"resuming {out}" in result.output and "at epoch 3 of 3" in result.output
    assert (out / "model_epoch_003.pth").is_file()
    empty = tmp_path / "empty"
    empty.mkdir()
    result = CliRunner().invoke(cli, ["resume", str(empty)])
    assert result.exit_code == 1 and f"{empty}: no charseg checkpoint here" in result.output
    result = CliRunner().invoke(cli, ["resume", str(out), "--epoch", "7"])
    assert result.exit_code == 1 and "no model_epoch_007.pth" in result.output


@pytest.mark.parametrize("command", ["evaluate", "predict", "resume", "finetune"])
def test_checkpoint_with_foreign_nested_keys_is_one_clear_error(tiny_dataset, tmp_path, command):
    import torch

    from charseg import checkpoint as ckpt

    state = ckpt.make_checkpoint(epoch=1, model={}, optimizer={}, scheduler={}, warmup={}, seed=1, rng={},
                                 config={}, model_spec={"backbone": "resnet18", "neck": "bifpn"}, num_classes=2,
                                 metrics={}, best={})
    path = str(ckpt.save_checkpoint(state, tmp_path / "foreign.pth"))
    args = {"evaluate": ["evaluate", str(tiny_dataset), "--model", path],
            "predict": ["predict", str(tiny_dataset / "images"), "--model", path, "--out", str(tmp_path / "out")],
            "resume": ["resume", path],
            "finetune": ["finetune", path, str(tiny_dataset)]}[command]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "foreign.pth: its model_spec does not fit this charseg" in errors[0]
    assert "'neck'" in errors[0] and "Traceback" not in result.output
    assert torch.load(path, weights_only=True)["model_spec"]["neck"] == "bifpn"  # the file is left alone


def test_generate_lines_and_held_out_pages(tmp_path):
    result = invoke("generate", str(tmp_path / "lines"), "--layout", "lines", "--num-images", "2", "--size", "96x96",
                    "--chars-per-image", "10-20", "--font-size", "12-20")
    assert result.exit_code == 0 and "wrote 2 images" in result.output
    result = invoke("generate", str(tmp_path / "held"), "--held-out", "--num-images", "2")
    assert result.exit_code == 0 and "wrote 2 held-out pages" in result.output
    assert invoke("validate-data", str(tmp_path / "held")).exit_code == 0


@pytest.mark.parametrize("value, code, message", [
    ("-1", 2, "Invalid value for '--scale-test': -1.0 is not in the range 0<=x<=8.0"),
    ("9", 2, "Invalid value for '--scale-test': 9.0 is not in the range 0<=x<=8.0"),
    ("nan", 2, "Invalid value for '--scale-test': 'nan' is not a finite number"),
    ("inf", 2, "Invalid value for '--scale-test': inf is not in the range 0<=x<=8.0")])
def test_a_page_scale_that_is_no_factor_is_one_clear_error(tiny_dataset, tmp_path, value, code, message):
    result = CliRunner().invoke(cli, ["train", str(tiny_dataset), *LIGHT_ARGS, "--scale-test", value,
                                      "--output-dir", str(tmp_path)])
    assert result.exit_code == code and message in result.output
    assert "Traceback" not in result.output and not list(tmp_path.iterdir())


def test_a_second_training_on_a_busy_output_folder_is_one_clear_error(tiny_dataset, tmp_path):
    from charseg import checkpoint as ckpt

    out = tmp_path / "run"
    with ckpt.exclusive_output_dir(out, "PID 4242 on box (MLflow run abc)"):
        result = CliRunner().invoke(cli, ["train", str(tiny_dataset), *LIGHT_ARGS, "--epochs", "1",
                                          "--output-dir", str(out)])
    assert result.exit_code == 1 and f"{out} is being written by PID 4242 on box (MLflow run abc)" in result.output
    assert "Traceback" not in result.output
    assert [p.name for p in out.iterdir()] == [".charseg.lock"]  # nothing of the refused run


def _on_a_terminal(args: list[str], cwd) -> str:
    """stderr of `charseg ARGS` when it is a terminal (a pseudo-terminal here), as a user sees it."""
    import fcntl
    import pty
    import struct
    import termios

    main, secondary = pty.openpty()
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a new pty is 0 columns wide
    try:
        done = subprocess.run([sys.executable, "-m", "charseg", *args], stderr=secondary, stdout=subprocess.DEVNULL,
                              cwd=cwd, timeout=300)
        os.close(secondary)
        chunks = []
        while True:
            try:
                chunk = os.read(main, 65536)
            except OSError:  # the terminal's other end is closed and drained
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(main)
    assert done.returncode == 0, b"".join(chunks)[-2000:]
    return b"".join(chunks).decode(errors="replace")


@pytest.mark.slow  # four charseg processes
def test_long_commands_draw_a_progress_bar_on_a_terminal_only(tiny_dataset, light_checkpoint, tmp_path):
    cases = [(["validate-data", str(tiny_dataset)], "reading the dataset"),
             (["export-coco", str(tiny_dataset), str(tmp_path / "coco.json")], "reading the dataset"),
             (["evaluate", str(tiny_dataset), "--model", str(light_checkpoint), "--out", str(tmp_path / "m.json")],
              "evaluating")]
    for args, bar in cases:
        assert bar in _on_a_terminal(args, tmp_path), args
    piped = subprocess.run([sys.executable, "-m", "charseg", *cases[1][0]], capture_output=True, text=True, cwd=tmp_path,
                           timeout=300)
    assert piped.returncode == 0 and cases[1][1] not in piped.stderr  # logs of batch jobs stay readable
