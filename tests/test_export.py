"""charseg export: ONNX (run by onnxruntime) and TorchScript (torch.jit) give predict's detections."""

from __future__ import annotations

import mlflow
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import light_config, run_cli

from charseg.cli import cli
from charseg.data.heldout import generate_heldout
from charseg.data.images import load_image_rgb
from charseg.inference.export import ExportedModel, ExportError, agreement
from charseg.inference.predict import load_model_for_inference, predict_arrays
from charseg.polygons import polygons_to_masks

# Low enough that even a briefly trained model keeps many detections, so every comparison has some.
THRESHOLD = 0.05


@pytest.fixture(scope="session")  # once per pytest-xdist worker
def demo_shaped_checkpoint(tiny_dataset, tmp_path_factory):
    """One light epoch of the demo's architecture: GroupNorm, the pixel mask head, page scales."""
    from charseg.training import runner

    config = light_config(tiny_dataset, tmp_path_factory.mktemp("export-run"), epochs=1, norm="group",
                          fpn_channels=64, mask_pixels=True, scale_train=1.0, scale_test=1.25, max_size=400,
                          detections_per_img=60, rpn_proposals_test=120)
    return runner.train(config).final_checkpoint


@pytest.fixture(scope="session")  # once per pytest-xdist worker
def heldout_pages(tmp_path_factory):
    """Pages of the held-out generator (other fonts, sizes from 96 to 200 px, not square), a
    tiny one and one without characters."""
    out = tmp_path_factory.mktemp("export-heldout")
    generate_heldout(out, num_images=3, min_side=96, max_side=200, seed=5)
    pages = [load_image_rgb(p) for p in sorted((out / "images").glob("*.png"))]
    return pages + [pages[0][:40, :57], np.full((120, 90, 3), 230, np.uint8)]


def polygon_iou(a: list[float], b: list[float], height: int, width: int) -> float:
    masks = polygons_to_masks([np.array(p, np.float32).reshape(-1, 2) for p in (a, b)], height, width)
    union = (masks[0] | masks[1]).sum()
    return float((masks[0] & masks[1]).sum() / union) if union else 1.0


@pytest.mark.slow
@pytest.mark.parametrize("fmt,suffix", [("onnx", "onnx"), ("torchscript", "pt")])
def test_an_exported_model_finds_what_predict_finds(fmt, suffix, demo_shaped_checkpoint, heldout_pages, tmp_path):
    out = tmp_path / f"model.{suffix}"
    text = run_cli("export", "--model", str(demo_shaped_checkpoint), "--format", fmt, "--out", str(out))
    assert f"exported to {out}" in text
    exported = ExportedModel(out)
    assert exported.metadata["detections_per_img"] == 60
    # An exported graph reads each page once, at the checkpoint's scale (no second reading of small characters).
    model, _, _ = load_model_for_inference(demo_shaped_checkpoint, torch.device("cpu"), fixed_scale=True)
    compared = 0
    for page in heldout_pages:
        expected = predict_arrays(model, [page], torch.device("cpu"), THRESHOLD)[0]
        found = exported.predict(page, THRESHOLD)
        assert len(found) == len(expected), page.shape
        for want, got in zip(sorted(expected, key=lambda i: i.box), sorted(found, key=lambda i: i.box)):
            assert np.abs(np.array(want.box) - np.array(got.box)).max() <= 1.0
            assert polygon_iou(want.polygon, got.polygon, *page.shape[:2]) >= 0.95
            compared += 1
    assert compared >= 20  # the pages gave detections to compare
    # No detection at all: the mask head gets no box (torchvision's ONNX test leaves this case out).
    blank = heldout_pages[-1]
    assert exported.predict(blank, 1.0) == predict_arrays(model, [blank], torch.device("cpu"), 1.0)[0] == []


@pytest.mark.slow
def test_an_onnx_export_is_registered_and_served_by_mlflow(demo_shaped_checkpoint, heldout_pages, tmp_path):
    out = tmp_path / "model.onnx"
    text = run_cli("export", "--model", str(demo_shaped_checkpoint), "--format", "onnx", "--out", str(out),
                   "--register-as", "charseg-onnx", "--detections-per-img", "80")
    assert "registered charseg-onnx version 1" in text
    version = mlflow.MlflowClient().get_model_version("charseg-onnx", "1")
    assert version.tags["charseg.format"] == "onnx"
    served = mlflow.pyfunc.load_model("models:/charseg-onnx/1")
    page = heldout_pages[0]
    outputs = served.predict({"image": page, "score_threshold": np.array(THRESHOLD, np.float32)})
    direct = ExportedModel(out).detect(page, THRESHOLD)
    result = agreement(direct, outputs)
    assert result.expected > 0 and result.ok, result
    run = mlflow.get_run(version.run_id)
    assert run.data.tags["charseg.mode"] == "export" and run.data.params["detections_per_img"] == "80"


def test_export_refuses_what_it_cannot_do(light_checkpoint, tmp_path):
    runner = CliRunner()
    for args, message in [
        (["--format", "onnx", "--out", str(tmp_path / "m.pt")], "a onnx file ends in .onnx"),
        (["--format", "torchscript", "--out", str(tmp_path / "m.pt"), "--register-as", "x"], "pass --format onnx"),
    ]:
        result = runner.invoke(cli, ["export", "--model", str(light_checkpoint), *args])
        assert result.exit_code == 2 and message in result.output, result.output
    (tmp_path / "foreign.onnx").write_bytes(b"not a model")
    with pytest.raises(ExportError, match="not a model `charseg export` wrote"):
        ExportedModel(tmp_path / "foreign.onnx")
    assert not list(tmp_path.glob(".*partial*"))


def test_detections_agree_up_to_the_tail_of_a_page_at_the_limit():
    boxes = np.array([[x, 10.0, x + 8, 20.0] for x in range(0, 400, 20)], np.float32)
    masks = np.ones((len(boxes), 28, 28), np.float32)
    expected = {"boxes": boxes, "box_masks": masks}
    moved = boxes.copy()
    moved[-1] += 3.0  # the last detection in differs
    found = {"boxes": moved, "box_masks": masks}
    assert agreement(expected, {"boxes": boxes + 0.5, "box_masks": masks}).ok
    assert not agreement(expected, found).ok
    assert agreement(expected, found, limit=len(boxes)).ok  # at the limit, a twentieth may differ
    holed = masks.copy()
    holed[0, :, :14] = 0
    assert not agreement(expected, {"boxes": boxes, "box_masks": holed}).ok
