"""Anchor sizes fitted to the characters: exact IoU against the real anchor grid, the choice,
and how a run records it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import light_config
from torchvision.ops import box_iou

from charseg import checkpoint as ckpt
from charseg.cli import cli
from charseg.data.dataset import scan_dataset
from charseg.data.generate import generate_dataset
from charseg.model.anchors import POSITIVE_IOU, best_anchor_iou, character_boxes, fit_anchor_sizes
from charseg.model.architecture import choose_anchor_sizes
from charseg.model.build import ANCHOR_RATIOS, STOCK_ANCHOR_SIZES, ModelSpec, build_model, spec_for_weights
from charseg.training import runner


@pytest.mark.parametrize("sizes", [STOCK_ANCHOR_SIZES, (6, 12, 24, 48, 96)])
@pytest.mark.parametrize("height, width", [(160, 224), (100, 75)])
def test_best_anchor_iou_equals_the_real_anchor_grid(sizes, height, width):
    spec = spec_for_weights("resnet18", "none", min_size=min(height, width), max_size=max(height, width),
                            anchor_sizes=sizes)
    model = build_model(spec).eval()
    images, _ = model.transform([torch.zeros(3, height, width)])
    anchors = model.rpn.anchor_generator(images, list(model.backbone(images.tensors).values()))[0]
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 1, size=(300, 2)) * [width - 3, height - 3]
    boxes = np.minimum(np.concatenate([xy, xy + rng.uniform(2, 60, size=(300, 2))], axis=1),
                       [width, height, width, height])
    shapes = np.tile([images.image_sizes[0]], (len(boxes), 1))
    expected = box_iou(torch.tensor(boxes, dtype=torch.float32), anchors).max(dim=1).values.numpy()
    np.testing.assert_allclose(best_anchor_iou(boxes, shapes, sizes, ANCHOR_RATIOS), expected, atol=1e-5)


def test_fit_picks_smaller_anchors_for_smaller_characters(tmp_path):
    fits = {}
    for name, font in (("small", (10, 12)), ("large", (30, 40))):
        generate_dataset(tmp_path / name, num_images=4, width=256, height=256, chars_per_image=(8, 12),
                         font_size=font, seed=0)
        samples = scan_dataset(tmp_path / name).samples
        fit = fits[name] = fit_anchor_sizes(samples, 256, 256, ANCHOR_RATIOS)
        boxes, shapes = character_boxes(samples, 256, 256)
        stock_share = (best_anchor_iou(boxes, shapes, STOCK_ANCHOR_SIZES, ANCHOR_RATIOS) >= POSITIVE_IOU).mean()
        assert fit.characters == len(boxes) >= 32
        assert fit.positive_share >= stock_share  # never worse than torchvision's anchors
    assert fits["small"].sizes[0] < fits["large"].sizes[0]
    assert fits["small"].median_iou > 0.4  # torchvision's anchors: about 0.04 on these 8 px glyphs


@pytest.mark.slow
def test_training_records_the_fitted_anchor_sizes(tiny_dataset, tmp_path):
    samples = scan_dataset(tiny_dataset).samples
    expected = fit_anchor_sizes(samples, 64, 64, ANCHOR_RATIOS).sizes
    result = runner.train(light_config(tiny_dataset, tmp_path / "auto", epochs=1))
    state = ckpt.load_checkpoint(result.final_checkpoint)
    assert tuple(state["model_spec"]["anchor_sizes"]) == expected
    assert state["config"]["anchor_sizes"] is None  # the config keeps the request: auto
    model = build_model(ModelSpec(**state["model_spec"]))
    assert model.rpn.anchor_generator.sizes == tuple((s,) for s in expected)


@pytest.mark.slow
def test_given_anchor_sizes_are_used_and_kept_by_finetune(tiny_dataset, tmp_path):
    source = runner.train(light_config(tiny_dataset, tmp_path / "src", epochs=1, anchor_sizes="8,16,32,64,128"))
    assert tuple(ckpt.load_checkpoint(source.final_checkpoint)["model_spec"]["anchor_sizes"]) == (8, 16, 32, 64, 128)
    tuned = runner.finetune(source.final_checkpoint, {"data_dir": str(tiny_dataset), "epochs": 1,
                                                      "output_dir": str(tmp_path / "ft"), "num_workers": 0})
    state = ckpt.load_checkpoint(tuned.final_checkpoint)
    assert tuple(state["model_spec"]["anchor_sizes"]) == (8, 16, 32, 64, 128)


def test_a_spec_without_anchor_sizes_means_torchvision_anchors():
    old = {k: v for k, v in ModelSpec().to_dict().items() if k != "anchor_sizes"}  # checkpoints before the field
    assert ModelSpec(**old).anchor_sizes == STOCK_ANCHOR_SIZES


@pytest.mark.parametrize("bad", ["16,32", "32,16,64,128,256", "a,b,c,d,e", "0,1,2,3,4",
                                 "16,32,64,128,1000000000000"])
def test_bad_anchor_sizes_are_one_clear_error(tiny_dataset, tmp_path, bad):
    result = CliRunner().invoke(cli, ["train", str(tiny_dataset), "--anchor-sizes", bad, "--weights", "none",
                                      "--output-dir", str(tmp_path / "out")])
    assert result.exit_code != 0
    assert "anchor_sizes must be 'auto' or 5 increasing positive integers" in result.output
    assert "Traceback" not in result.output


def test_tiny_characters_warn_to_raise_min_size(tmp_path, caplog):
    generate_dataset(tmp_path / "data", num_images=2, width=256, height=256, chars_per_image=(6, 8),
                     font_size=(10, 12), seed=0)
    with caplog.at_level("WARNING", logger="charseg"):
        choose_anchor_sizes(scan_dataset(tmp_path / "data").samples, 128, 128)
    assert "raise --min-size" in caplog.text
