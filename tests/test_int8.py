"""--precision int8: the CPU's quantised backbone and heads, calibrated on pages, close to float32."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner
from conftest import light_config
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from charseg.cli import cli
from charseg.data.dataset import scan_dataset
from charseg.data.images import load_image_rgb
from charseg.data.loading import image_to_tensor
from charseg.errors import CharsegError
from charseg.inference.int8 import page_calibration, quantizable_parts, quantize_model
from charseg.inference.int8_cache import CalibrationCacheError
from charseg.inference.predict import load_model_for_inference
from charseg.inference.serving import CharsegPredictor
from charseg.model.architecture import resolve_spec
from charseg.model.build import build_model
from charseg.model.frozen_norm import fold_frozen_norms, plain_convolutions
from charseg.precision import PrecisionError, resolve

# Three layouts whose layers quantise differently: live BatchNorm (fused into the convolutions),
# frozen BatchNorm (already folded into FrozenBNConv2d), GroupNorm with the pixel mask predictor.
LAYOUTS = {"from scratch": {}, "pretrained": {"weights": "imagenet"},
           "demo": {"norm": "group", "fpn_channels": 64, "mask_pixels": True}}


def _model(tiny_dataset, layout: str):
    samples = scan_dataset(tiny_dataset).samples
    spec = resolve_spec(light_config(tiny_dataset, "unused", **LAYOUTS[layout]), samples, samples)
    torch.manual_seed(0)
    return build_model(spec).eval(), samples


def _mask_logits(model, images, boxes):
    with torch.inference_mode():
        batch, _ = model.transform(images)
        features = model.backbone(batch.tensors)
        return model.roi_heads.mask_logits(features, boxes, batch.image_sizes)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_int8_quantises_backbone_and_heads_and_stays_close_to_fp32(tiny_dataset, layout):
    model, samples = _model(tiny_dataset, layout)
    images = [image_to_tensor(load_image_rgb(s.image_path)) for s in samples]
    boxes = []
    for sample in samples:
        points = torch.as_tensor(sample.polygons[0]).float()
        boxes.append(torch.cat([points.min(0).values, points.max(0).values])[None])
    float32 = _mask_logits(model, images, boxes)
    parts = quantizable_parts(model)
    what = quantize_model(model, page_calibration([s.image_path for s in samples]))
    assert what.startswith("int8 backbone.body, backbone.fpn, roi_heads.box_head, roi_heads.mask_head")
    assert "calibrated on 4 pages" in what
    for name in parts:  # each part now computes with int8 kernels
        ops = {type(m).__module__ for m in model.get_submodule(name).modules()}
        assert any(module.startswith("torch.ao.nn.") and ".quantized." in module for module in ops), name
    int8 = _mask_logits(model, images, boxes)
    # Random weights, logits of +-20 and more: int8 moves some pixels near the boundary a lot, the
    # mask as a whole little. Measured: logit correlation 0.97-0.99, mean change 0.04-0.06 in
    # probability (a trained model's scores: docs/PRECISION.md).
    correlation = torch.corrcoef(torch.stack([float32.flatten(), int8.flatten()]))[0, 1]
    change = (int8.sigmoid() - float32.sigmoid()).abs().mean()
    assert correlation > 0.95 and change < 0.1
    with torch.inference_mode():
        outputs = model(images)
    assert all(o["boxes"].dtype == o["box_masks"].dtype == torch.float32 for o in outputs)


def test_plain_convolutions_compute_what_the_folded_frozen_norms_do():
    torch.manual_seed(0)
    conv, norm = nn.Conv2d(3, 8, 3, bias=False), FrozenBatchNorm2d(8)
    for name in ("weight", "bias", "running_mean"):
        getattr(norm, name).normal_()
    norm.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        expected = norm(conv(x))
        module = plain_convolutions(fold_frozen_norms(nn.Sequential(conv, norm)))
        assert [type(m) for m in module] == [nn.Conv2d, nn.Identity]
        torch.testing.assert_close(module(x), expected)


def test_predict_and_evaluate_run_int8_calibrated_on_the_pages_or_a_folder(light_checkpoint, tiny_dataset, tmp_path):
    result = CliRunner().invoke(cli, ["predict", str(tiny_dataset / "images"), "--model", str(light_checkpoint),
                                      "--out", str(tmp_path / "out"), "--precision", "int8"])
    assert result.exit_code == 0, result.output
    assert "in 4 images" in result.output
    assert "inference precision int8 backbone.body" in result.output and "(calibrated on 4 pages)" in result.output
    assert len(list((tmp_path / "out" / "annotations").glob("*.csv"))) == 4
    result = CliRunner().invoke(cli, ["evaluate", str(tiny_dataset), "--model", str(light_checkpoint), "--precision",
                                      "int8", "--calibration-dir", str(tiny_dataset / "images"),
                                      "--out", str(tmp_path / "metrics.json")])
    assert result.exit_code == 0, result.output
    assert "segm_AP50" in result.output and "(calibrated on 4 pages)" in result.output


def test_int8_is_refused_where_it_cannot_run(light_checkpoint, tiny_dataset, tmp_path):
    with pytest.raises(PrecisionError, match="int8 is for inference"):
        resolve("int8", torch.device("cpu"), training=True)
    with pytest.raises(PrecisionError, match="runs on the CPU"):
        resolve("int8", torch.device("cuda"), training=False)
    result = CliRunner().invoke(cli, ["train", str(tiny_dataset), "--precision", "int8"])
    assert result.exit_code == 2 and "'int8' is not one of" in result.output
    with pytest.raises(CharsegError, match="a served model runs auto, fp32, bf16 or fp16"):
        CharsegPredictor(str(light_checkpoint), "cpu", precision="int8")
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(cli, ["predict", str(tiny_dataset / "images"), "--model", str(light_checkpoint),
                                      "--out", str(tmp_path / "out"), "--precision", "int8",
                                      "--calibration-dir", str(tmp_path / "empty")])
    assert result.exit_code == 1 and "--calibration-dir" in result.output and "no .png/.jpg/.jpeg/" in result.output
    model, _, _ = load_model_for_inference(light_checkpoint, torch.device("cpu"))
    with pytest.raises(CharsegError, match="no calibration page could be read"):
        quantize_model(model, page_calibration([tmp_path / "missing.png"]))
    assert not any(type(m).__module__.startswith("torch.ao") for m in model.modules())  # left as it was


def _no_calibration(_):
    raise AssertionError("the cache should have been read")


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_a_calibration_cache_gives_the_calibrated_model_without_calibrating_again(tiny_dataset, tmp_path, layout):
    model, samples = _model(tiny_dataset, layout)
    fresh = _model(tiny_dataset, layout)[0]  # the same weights (seed 0)
    images = [image_to_tensor(load_image_rgb(s.image_path)) for s in samples]
    boxes = [torch.tensor([[4.0, 4.0, 30.0, 40.0]])] * len(images)
    cache = tmp_path / "calibration" / "int8.pt"
    what = quantize_model(model, page_calibration([s.image_path for s in samples]), cache)
    assert cache.is_file() and f"calibrated on 4 pages, written to {cache}" in what
    what = quantize_model(fresh, _no_calibration, cache)
    assert f"calibration read from {cache}, made on 4 pages" in what
    # The parts were traced on small examples: pages of other sizes and other numbers of boxes
    # must give what the converted parts give, to the bit.
    torch.testing.assert_close(_mask_logits(fresh, images, boxes), _mask_logits(model, images, boxes),
                               rtol=0, atol=0)
    for m in (model, fresh):
        m.roi_heads.score_thresh = 0.0
    with torch.inference_mode():
        expected, got = model(images[:2]), fresh(images[:2])
    assert len(expected[0]["boxes"]) > 1
    for want, have in zip(expected, got):
        for key in ("boxes", "scores", "box_masks"):
            torch.testing.assert_close(have[key], want[key], rtol=0, atol=0)


def test_a_calibration_cache_is_refused_for_other_weights_pages_torch_or_format(tiny_dataset, tmp_path):
    model, samples = _model(tiny_dataset, "demo")
    cache = tmp_path / "int8.pt"
    quantize_model(model, page_calibration([s.image_path for s in samples]), cache)
    other = _model(tiny_dataset, "demo")[0]
    with torch.no_grad():
        other.roi_heads.mask_predictor.conv5_mask.weight.add_(0.01)  # other weights
    with pytest.raises(CalibrationCacheError, match="made for another model"):
        quantize_model(other, _no_calibration, cache)
    assert not any(isinstance(m, torch.jit.ScriptModule) or type(m).__module__.startswith("torch.ao")
                   for m in other.modules())  # left as it was
    with pytest.raises(CalibrationCacheError, match=r"calibrated on other pages \(00001.png"):
        quantize_model(_model(tiny_dataset, "demo")[0], _no_calibration, cache, chosen_pages=["other.png"])
    saved = torch.load(cache, weights_only=True)
    for change, message in (({"torch": "2.0.0"}, "made by torch 2.0.0"),
                            ({"format": "charseg-int8-calibration/1"}, "written by another charseg version"),
                            ({"parts": {"backbone.body": saved["parts"]["backbone.body"]}}, "holds other parts"),
                            ({"parts": dict.fromkeys(saved["parts"], torch.zeros(8, dtype=torch.uint8))},
                             "a part does not load")):
        torch.save({**saved, **change}, tmp_path / "changed.pt")
        with pytest.raises(CalibrationCacheError, match=message):
            quantize_model(_model(tiny_dataset, "demo")[0], _no_calibration, tmp_path / "changed.pt")
    (tmp_path / "foreign.pt").write_bytes(b"not a calibration")
    with pytest.raises(CalibrationCacheError, match="foreign.pt: not a charseg int8 calibration file"):
        quantize_model(_model(tiny_dataset, "demo")[0], _no_calibration, tmp_path / "foreign.pt")


# A predict process that prints, at exit, whether it imported torch._dynamo.
REPORTS_DYNAMO = ("import atexit, runpy, sys; "
                  "atexit.register(lambda: print('torch._dynamo imported:', 'torch._dynamo' in sys.modules)); "
                  "sys.argv = ['charseg', *sys.argv[1:]]; runpy.run_module('charseg', run_name='__main__')")


def test_predict_writes_then_reads_a_calibration_cache_and_refuses_it_without_int8(light_checkpoint, tiny_dataset,
                                                                                   tmp_path):
    cache = tmp_path / "int8.pt"
    args = ["predict", str(tiny_dataset / "images"), "--model", str(light_checkpoint), "--precision", "int8",
            "--calibration-cache", str(cache)]
    result = CliRunner().invoke(cli, [*args, "--out", str(tmp_path / "out0")])
    assert result.exit_code == 0 and "written to" in result.output, result.output
    # A later process loads the int8 parts: no calibration, no FX work (whose tracing imports torch._dynamo).
    done = subprocess.run([sys.executable, "-c", REPORTS_DYNAMO, *args, "--out", str(tmp_path / "out1")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "calibration read from" in done.stdout + done.stderr
    assert "torch._dynamo imported: False" in done.stdout
    outputs = [sorted((p.name, p.read_text()) for p in (tmp_path / out / "annotations").glob("*.csv"))
               for out in ("out0", "out1")]
    assert outputs[0] and outputs[0] == outputs[1]
    result = CliRunner().invoke(cli, ["evaluate", str(tiny_dataset), "--model", str(light_checkpoint),
                                      "--calibration-cache", str(cache), "--out", str(tmp_path / "m.json")])
    assert result.exit_code == 2 and "--calibration-cache set int8's calibration; add --precision int8" in result.output
