"""Model construction and initial weights: offline errors, local files written by the test."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from charseg import checkpoint as ckpt
from charseg.config import MAX_PAGE_SCALE, TrainConfig
from charseg.errors import WeightsError
from charseg.inference.predict import load_model_for_inference
from charseg.model.build import ModelSpec, build_model, build_model_from_state, create_model, spec_for_weights
from charseg.model.heads import FOLLOW_MAX_RATIO, PAGE_MAX_SIDE, page_scale_for


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No cached weights and every download refused (a closed local proxy port)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)


@pytest.mark.parametrize("weights, backbone", [("coco", "resnet50"), ("imagenet", "resnet18")])
def test_offline_pretrained_weights_fail_with_what_to_pass(offline, weights, backbone):
    with pytest.raises(WeightsError) as info:
        create_model(spec_for_weights(backbone, weights), weights)
    message = str(info.value)
    assert "--weights none" in message and "--weights PATH" in message
    assert "\n" not in message


def test_coco_needs_resnet50():
    with pytest.raises(WeightsError, match="only for resnet50"):
        create_model(spec_for_weights("resnet18", "coco"), "coco")


def test_none_builds_two_class_model_with_live_batchnorm():
    spec = spec_for_weights("resnet18", "none", min_size=64, max_size=64)
    model, how = create_model(spec, "none")
    assert how == "random initialisation"
    assert model.roi_heads.box_predictor.cls_score.out_features == 2
    assert model.roi_heads.mask_predictor.mask_fcn_logits.out_channels == 2
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.backbone.modules())


def _checkpoint_of(model: torch.nn.Module, spec: ModelSpec, path: Path) -> Path:
    ckpt.save_checkpoint(ckpt.make_checkpoint(
        epoch=1, model=model.state_dict(), optimizer={}, scheduler={}, warmup={}, seed=0, rng={},
        config=TrainConfig(min_size=spec.min_size, max_size=spec.max_size).to_dict(), model_spec=spec.to_dict(),
        num_classes=spec.num_classes, metrics={}, best={}), path)
    return path


@pytest.mark.parametrize("weights", ["none", "imagenet"])
def test_a_model_loaded_for_inference_predicts_as_its_source_and_leaves_the_random_stream(weights, tmp_path):
    """Inference builds the model and loads the checkpoint's state into it strictly: it must
    predict as the model whose state it loads, with the process's random stream and
    torch.nn.init as they were."""
    spec = spec_for_weights("resnet18", weights, min_size=96, max_size=96)
    torch.manual_seed(0)
    source = build_model(spec).eval()
    path = _checkpoint_of(source, spec, tmp_path / "model.pth")
    kaiming, rng = torch.nn.init.kaiming_uniform_, torch.get_rng_state()
    model, _, _ = load_model_for_inference(path, torch.device("cpu"), fixed_scale=True)
    assert torch.equal(torch.get_rng_state(), rng), "loading drew from the process's random stream"
    assert torch.nn.init.kaiming_uniform_ is kaiming, "torch.nn.init was patched"
    source.glyph_height = 0.0  # as fixed_scale: one reading of the page
    for m in (source, model):
        m.roi_heads.score_thresh = 0.0
    image = torch.rand(3, 96, 96, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = source([image])[0], model([image])[0]
    assert len(expected["boxes"]) > 0
    for key in ("boxes", "scores", "box_masks"):
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0)


def test_loading_a_model_for_inference_does_not_import_torch_dynamo(tmp_path):
    """A fresh predict process: building under torch.device("meta") with torch.nn.init's draws
    imported torch._dynamo (torch._refs' normal_), a large share of every start; the inference
    build skips the draws."""
    spec = spec_for_weights("resnet18", "none", min_size=96, max_size=96)
    path = _checkpoint_of(build_model(spec), spec, tmp_path / "model.pth")
    code = ("import sys, torch; from charseg.inference.predict import load_model_for_inference; "
            f"load_model_for_inference({str(path)!r}, torch.device('cpu')); print('torch._dynamo' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False"], "loading a model imported torch._dynamo"


def test_a_model_built_from_a_state_holds_its_tensors_in_the_built_layout_and_refuses_a_partial_one():
    """build_model_from_state assigns the state's tensors (no draw, no second copy): each in
    build_model's dtype and memory format, whatever the state's; a missing weight still fails
    as a strict load fails."""
    spec = spec_for_weights("resnet18", "none", min_size=96, max_size=96)
    built = build_model(spec)
    state = {key: value.contiguous().double() if value.is_floating_point() else value
             for key, value in built.state_dict().items()}
    model = build_model_from_state(spec, state)
    for key, value in model.state_dict().items():
        assert value.device.type == "cpu" and value.dtype == built.state_dict()[key].dtype, key
        torch.testing.assert_close(value, built.state_dict()[key], rtol=0, atol=0)
    conv = model.backbone.body.conv1.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    state.pop("roi_heads.box_predictor.cls_score.weight")
    with pytest.raises(RuntimeError, match="cls_score.weight"):
        build_model_from_state(spec, state)


def test_local_coco_style_state_dict_loads_with_heads_reinitialised(tmp_path):
    # A 91-class torchvision Mask R-CNN, as the COCO download would be, written by the test.
    torch.manual_seed(0)
    source = torchvision.models.detection.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91)
    path = tmp_path / "maskrcnn_coco_like.pth"
    torch.save(source.state_dict(), path)
    model, how = create_model(spec_for_weights("resnet50", str(path)), str(path))
    assert "class heads re-initialised" in how
    assert torch.equal(model.backbone.body.layer1[0].conv1.weight, source.backbone.body.layer1[0].conv1.weight)
    assert model.roi_heads.box_predictor.cls_score.out_features == 2


def test_coco_weights_go_into_the_model_the_spec_describes(monkeypatch):
    """--weights coco builds the spec's model (page scales, --mask-pixels, its mask frame) and
    loads COCO's weights into it, the predictors new. The download is replaced by a 91-class
    torchvision Mask R-CNN's state dict, as the COCO file is (no internet here)."""
    from torchvision.models.detection import MaskRCNN_ResNet50_FPN_Weights

    from charseg.model.heads import PixelMaskPredictor

    torch.manual_seed(0)
    source = torchvision.models.detection.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91)
    monkeypatch.setattr(MaskRCNN_ResNet50_FPN_Weights, "get_state_dict", lambda self, **kwargs: source.state_dict())
    spec = spec_for_weights("resnet50", "coco", scale_train=1.0, scale_test=1.25, mask_pixels=True)
    model, how = create_model(spec, "coco")
    assert how == "COCO Mask R-CNN weights, box and mask predictors re-initialised"
    assert model.transform.page_scales == (1.0, 1.25)
    assert isinstance(model.roi_heads.mask_predictor, PixelMaskPredictor) and model.roi_heads.mask_frame_offset == 0
    assert torch.equal(model.backbone.body.layer1[0].conv1.weight, source.backbone.body.layer1[0].conv1.weight)
    assert torch.equal(model.roi_heads.mask_head[0][0].weight, source.roi_heads.mask_head[0][0].weight)
    assert model.roi_heads.box_predictor.cls_score.out_features == 2
    # What a checkpoint of it rebuilds for inference is the same model.
    build_model(spec).load_state_dict(model.state_dict())


def test_local_resnet_state_dict_loads_into_backbone(tmp_path):
    source = torchvision.models.resnet18()
    path = tmp_path / "resnet18.pth"
    torch.save(source.state_dict(), path)
    model, how = create_model(spec_for_weights("resnet18", str(path)), str(path))
    assert how.startswith("backbone weights")
    assert torch.equal(model.backbone.body.conv1.weight, source.conv1.weight)


def test_weights_for_another_backbone_are_refused(tmp_path):
    path = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    with pytest.raises(WeightsError, match="check --backbone"):
        create_model(spec_for_weights("resnet34", str(path)), str(path))


def test_foreign_file_is_refused(tmp_path):
    path = tmp_path / "notes.pth"
    path.write_text("not weights")
    with pytest.raises(WeightsError, match="not a PyTorch weights file"):
        create_model(ModelSpec(backbone="resnet18"), str(path))
    with pytest.raises(WeightsError, match="not found"):
        create_model(ModelSpec(backbone="resnet18"), str(tmp_path / "missing.pth"))


def test_a_spec_of_an_older_checkpoint_builds_torchvisions_layout():
    old = {k: v for k, v in ModelSpec(backbone="resnet18").to_dict().items() if k not in ("norm", "fpn_channels")}
    spec = ModelSpec.from_dict(old)
    assert (spec.norm, spec.fpn_channels) == ("batch", 256)
    stock = torchvision.models.detection.MaskRCNN(
        torchvision.models.detection.backbone_utils.resnet_fpn_backbone(backbone_name="resnet18", weights=None),
        num_classes=2)
    ours = build_model(spec).state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in stock.state_dict().items()}


def test_group_norm_model_is_normalised_and_narrower():
    model, _ = create_model(spec_for_weights("resnet18", "none", min_size=64, max_size=64, norm="group",
                                             fpn_channels=128), "none")
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert sum(isinstance(m, torch.nn.GroupNorm) for m in model.roi_heads.mask_head.modules()) == 4
    assert model.backbone.out_channels == 128
    assert model.roi_heads.mask_predictor.conv5_mask.in_channels == 128
    with pytest.raises(WeightsError, match="--norm group trains from scratch"):
        spec_for_weights("resnet18", "imagenet", norm="group")
    with pytest.raises(WeightsError, match="--fpn-channels must be a multiple of 32, got 100"):
        spec_for_weights("resnet18", "none", norm="group", fpn_channels=100)


def test_mask_head_convs_sets_the_mask_heads_depth_and_older_checkpoints_keep_four():
    spec = spec_for_weights("resnet18", "none", min_size=64, max_size=64, norm="group", fpn_channels=64,
                            mask_pixels=True, mask_head_convs=2)
    head = build_model(spec).roi_heads.mask_head
    assert sum(isinstance(m, torch.nn.Conv2d) for m in head.modules()) == 2
    assert sum(isinstance(m, torch.nn.GroupNorm) for m in head.modules()) == 2
    assert ModelSpec.from_dict(spec.to_dict()).mask_head_convs == 2
    old = {k: v for k, v in spec.to_dict().items() if k != "mask_head_convs"}
    older = build_model(ModelSpec.from_dict(old)).roi_heads.mask_head
    assert sum(isinstance(m, torch.nn.Conv2d) for m in older.modules()) == 4
    # torchvision's own head (256 channels, no norm, no pixels) has the depth asked too
    stock_width = build_model(spec_for_weights("resnet18", "none", mask_head_convs=3)).roi_heads.mask_head
    assert [m.out_channels for m in stock_width.modules() if isinstance(m, torch.nn.Conv2d)] == [256] * 3
    with pytest.raises(WeightsError, match="mask head of 4 convolutions"):
        spec_for_weights("resnet50", "coco", mask_head_convs=2)


def test_mask_head_channels_sets_the_mask_heads_width_and_older_checkpoints_keep_the_fpns():
    spec = spec_for_weights("resnet18", "none", min_size=64, max_size=64, norm="group", fpn_channels=64,
                            mask_pixels=True, mask_head_channels=32)
    model = build_model(spec).eval()
    convs = [m for m in model.roi_heads.mask_head.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(64, 32)] + [(32, 32)] * 3  # reads the FPN's 64
    assert model.roi_heads.mask_predictor.conv5_mask.in_channels == 32
    with torch.no_grad():
        [out] = model([torch.rand(3, 64, 64)])
    assert out["box_masks"].shape[1:] == (28, 28) and len(out["box_masks"]) == len(out["boxes"])
    assert ModelSpec.from_dict(spec.to_dict()).mask_head_channels == 32
    old = {k: v for k, v in spec.to_dict().items() if k != "mask_head_channels"}
    older = build_model(ModelSpec.from_dict(old)).roi_heads.mask_head
    assert {m.out_channels for m in older.modules() if isinstance(m, torch.nn.Conv2d)} == {64}
    # torchvision's own head is kept where the width asked is its 256
    stock = build_model(spec_for_weights("resnet18", "none", mask_head_channels=256)).roi_heads.mask_head
    assert [m.out_channels for m in stock.modules() if isinstance(m, torch.nn.Conv2d)] == [256] * 4
    with pytest.raises(WeightsError, match="multiple of 32, got 48"):
        spec_for_weights("resnet18", "none", norm="group", mask_head_channels=48)
    with pytest.raises(WeightsError, match="mask head of 256 channels"):
        spec_for_weights("resnet50", "coco", mask_head_channels=64)


def test_pixel_mask_predictor_trains_and_predicts(tiny_dataset):
    from charseg.data.dataset import scan_dataset
    from charseg.data.loading import CharacterDataset, collate

    spec = spec_for_weights("resnet18", "none", min_size=64, max_size=64, norm="group", fpn_channels=64,
                            mask_pixels=True)
    model = build_model(spec)
    images, targets, _ = collate([CharacterDataset(scan_dataset(tiny_dataset).samples)[i] for i in (0, 1)])
    losses = model(list(images), list(targets))
    sum(losses.values()).backward()
    assert spec.pixel_dilations == (2, 4, 8, 1)
    assert model.roi_heads.mask_predictor.pixel_refine[0][0].weight.grad.abs().sum() > 0
    model.eval()
    with torch.inference_mode():
        out = model(list(images))
    assert out[0]["box_masks"].shape[1:] == (28, 28)
    with pytest.raises(ValueError, match="polygon-native"):
        build_model(spec, polygon_native=False)


def test_a_mask_pixels_checkpoint_without_pixel_dilations_keeps_its_two_plain_convolutions():
    """Checkpoints of the first --mask-pixels version have no pixel_dilations: they rebuild the
    5x5-view refine their weights were trained for, and load strictly."""
    old = {k: v for k, v in spec_for_weights("resnet18", "none", norm="group", fpn_channels=64,
                                             mask_pixels=True).to_dict().items() if k != "pixel_dilations"}
    spec = ModelSpec.from_dict(old)
    assert spec.pixel_dilations == ()
    refine = build_model(spec).roi_heads.mask_predictor.pixel_refine
    assert [type(m).__name__ for m in refine] == ["Conv2d", "ReLU", "Conv2d", "ReLU"]
    first_version = {"pixel_refine.0.weight", "pixel_refine.0.bias", "pixel_refine.2.weight", "pixel_refine.2.bias"}
    assert {k for k in refine.state_dict()} == {k.removeprefix("pixel_refine.") for k in first_version}
    assert ModelSpec.from_dict({**old, "pixel_dilations": [2, 4]}).pixel_dilations == (2, 4)


def test_page_scales_resize_by_a_factor_of_each_pages_own_size():
    """--scale-train / --scale-test: a page is resized by the factor of its own size (not its
    short side to min_size), boxes with it; max_size caps the long side in training, and at
    inference PAGE_MAX_SIDE or max_size, whichever is larger (predict's --max-size instead)."""
    spec = spec_for_weights("resnet18", "none", min_size=64, max_size=400, norm="group", fpn_channels=64,
                            mask_pixels=True, scale_train=1.0, scale_test=1.5)
    transform = build_model(spec).transform
    image = torch.rand(3, 100, 160)
    target = {"boxes": torch.tensor([[10.0, 20.0, 30.0, 60.0]])}
    transform.train()
    resized, moved = transform.resize(image, dict(target))
    assert resized.shape[-2:] == (100, 160) and torch.equal(moved["boxes"], target["boxes"])
    assert transform.resize(torch.rand(3, 100, 500))[0].shape[-2:] == (80, 400)  # long side capped at 400
    transform.eval()
    assert transform.resize(image)[0].shape[-2:] == (150, 240)
    wide = torch.rand(3, 100, 300)
    assert transform.resize(wide)[0].shape[-2:] == (150, 450) and transform.shrunk_by_cap(100, 300) is None
    assert transform.inference_cap() == PAGE_MAX_SIDE > 400
    long_side = PAGE_MAX_SIDE // 1.5 + 10  # a page the inference cap shrinks
    assert transform.shrunk_by_cap(100, long_side) == pytest.approx(PAGE_MAX_SIDE / long_side)
    transform.max_input_side = 300  # load_model_for_inference(max_size=300)
    assert transform.resize(wide)[0].shape[-2:] == (100, 300) and transform.shrunk_by_cap(100, 300) == 1.0
    assert transform.min_size == (64,) and transform.max_size == 400  # the training rule is left as it was
    plain = build_model(spec_for_weights("resnet18", "none", min_size=64, max_size=400)).transform.eval()
    assert plain.resize(image)[0].shape[-2:] == (64, 102) and plain.inference_cap() == 400
    assert plain.shrunk_by_cap(100, 1000) is None  # stock's resize: min_size, capped at max_size
    plain.max_input_side = 80
    assert plain.resize(image)[0].shape[-2:] == (50, 80)
    old = {k: v for k, v in spec.to_dict().items() if k not in ("scale_train", "scale_test")}
    assert (ModelSpec.from_dict(old).scale_train, ModelSpec.from_dict(old).scale_test) == (0.0, 0.0)
    with pytest.raises(ValueError, match="scale_train / scale_test need charseg's transform"):
        build_model(spec_for_weights("resnet18", "none", scale_test=1.5), polygon_native=False)


def test_a_page_of_small_characters_is_read_again_enlarged_to_the_training_height():
    """The page scale follows the page: boxes whose median height is more than FOLLOW_BAND
    under the training pages' median ask for a reading at the scale that brings them up to it
    (at most FOLLOW_MAX_RATIO times larger, and MAX_PAGE_SCALE); characters near or above it,
    or too few boxes to measure, keep the first reading."""
    def boxes(*heights):
        return torch.tensor([[0.0, 0.0, 5.0, h] for h in heights])

    assert page_scale_for(boxes(8, 8, 8, 9, 7), glyph_height=12.0, scale=1.25) == pytest.approx(1.875)
    assert page_scale_for(boxes(11, 11, 11, 11, 11), glyph_height=12.0, scale=1.25) is None  # within the band
    assert page_scale_for(boxes(30, 30, 30, 30, 30), glyph_height=12.0, scale=1.25) is None  # never shrinks
    assert page_scale_for(boxes(8, 8, 8, 8), glyph_height=12.0, scale=1.25) is None  # too few to measure
    assert page_scale_for(boxes(3, 3, 3, 3, 3), glyph_height=12.0, scale=1.25) == 1.25 * FOLLOW_MAX_RATIO
    assert page_scale_for(boxes(3, 3, 3, 3, 3), glyph_height=12.0, scale=6.0) == MAX_PAGE_SCALE


def test_the_second_reading_is_the_model_at_the_followed_scale():
    """PolygonMaskRCNN reads a page again at page_scale_for's scale when it asks for one: the
    result is the model's own reading at that scale. glyph_height 0 (checkpoints without the
    field, a --scale-test given, an export) reads once."""
    torch.manual_seed(0)
    spec = spec_for_weights("resnet18", "none", min_size=64, max_size=400, norm="group", fpn_channels=64,
                            mask_pixels=True, scale_train=1.0, scale_test=1.0, glyph_height=1000.0)
    model = build_model(spec).eval()
    model.roi_heads.score_thresh = 0.0
    image = torch.rand(3, 96, 128)
    with torch.no_grad():
        followed = model([image])[0]
        model.glyph_height = 0.0
        first = model([image])[0]
        scale = page_scale_for(first["boxes"][first["scores"] >= 0.5], 1000.0, 1.0)
        assert scale == FOLLOW_MAX_RATIO  # the untrained model's boxes are far below 1000 px
        model.transform.page_scales = (1.0, scale)
        again = model([image])[0]
    assert torch.equal(followed["boxes"], again["boxes"]) and not torch.equal(followed["boxes"], first["boxes"])
    assert ModelSpec.from_dict({k: v for k, v in spec.to_dict().items() if k != "glyph_height"}).glyph_height == 0.0


def test_the_first_reading_outlines_only_the_pages_it_keeps(monkeypatch):
    """In a batch where one page is kept and one read again, the mask head runs over the kept
    page's detections only, and both results are what reading each once would give, to the bit."""
    import charseg.model.heads as heads

    torch.manual_seed(0)
    spec = spec_for_weights("resnet18", "none", min_size=64, max_size=400, norm="group", fpn_channels=64,
                            mask_pixels=True, scale_train=1.0, scale_test=1.0, glyph_height=1000.0,
                            mask_box_margin=1.0)
    model = build_model(spec).eval()
    model.roi_heads.score_thresh = 0.0
    pages = [torch.rand(3, 96, 128, generator=torch.Generator().manual_seed(i)) for i in (1, 2)]
    decisions = iter([None, 1.5])
    monkeypatch.setattr(heads, "page_scale_for", lambda *args: next(decisions))
    outlined, mask_logits = [], model.roi_heads.mask_logits

    def counting(features, boxes, image_shapes):
        outlined.append([len(b) for b in boxes])
        return mask_logits(features, boxes, image_shapes)

    monkeypatch.setattr(model.roi_heads, "mask_logits", counting)
    with torch.no_grad():
        followed = model(pages)
        first_reading_calls = [c for c in outlined if len(c) == 2]
        model.glyph_height = 0.0
        once = model(pages)[0]
        model.transform.page_scales = (1.0, 1.5)
        again = model([pages[1]])[0]
    assert first_reading_calls and all(second == 0 for _, second in first_reading_calls)
    assert sum(first for first, _ in first_reading_calls) == len(once["boxes"]) > 0
    for got, expected in ((followed[0], once), (followed[1], again)):
        assert set(got) == set(expected)
        for key in expected:
            torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0)


def test_a_page_at_the_limit_is_not_outlined_while_it_is_to_be_read_again():
    """unoutlined_at_limit: a page whose detections reach the limit gets no masks (it is read
    again with a higher one, predict_following_page), a page under it keeps them; at
    MAX_DETECTIONS every page is outlined, since none can be read again."""
    from charseg.inference.predict import MAX_DETECTIONS, detection_limit, output_to_instances, unoutlined_at_limit

    torch.manual_seed(0)
    spec = spec_for_weights("resnet18", "none", min_size=64, max_size=400, norm="group", fpn_channels=64,
                            mask_pixels=True, mask_box_margin=1.0)
    model = build_model(spec).eval()
    model.roi_heads.score_thresh = 0.0
    page = torch.rand(3, 96, 128, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        outlined = model([page])[0]
        found = len(outlined["boxes"])
        with detection_limit(model, found - 1), unoutlined_at_limit(model):
            full = model([page])[0]
        with detection_limit(model, found + 1), unoutlined_at_limit(model):
            under = model([page])[0]
        with detection_limit(model, MAX_DETECTIONS), unoutlined_at_limit(model):
            assert model.roi_heads.outline_full_pages
    assert 1 < found < spec.detections_per_img and model.roi_heads.outline_full_pages
    assert len(full["boxes"]) == found - 1 and not {"box_masks", "mask_frames", "mask_boxes"} & set(full)
    assert output_to_instances(full, 0.0, np.zeros((96, 128, 3), np.uint8)) == []
    for key in ("boxes", "box_masks", "mask_frames"):
        torch.testing.assert_close(under[key], outlined[key], rtol=0, atol=0)


def test_a_raised_limit_lets_each_level_offer_more_anchors_to_nms_than_it_keeps():
    """detection_limit: PRE_NMS_PER_DETECTION anchors per detection from each level before NMS,
    PROPOSALS_PER_DETECTION after it, the model's own counts where larger; restored after."""
    from charseg.inference.predict import detection_limit
    from charseg.model.architecture import PRE_NMS_PER_DETECTION, PROPOSALS_PER_DETECTION

    model = build_model(spec_for_weights("resnet18", "none", min_size=64, max_size=64, detections_per_img=100,
                                         rpn_proposals_test=1000)).eval()
    rpn = model.rpn
    with detection_limit(model, 5000):
        assert (model.roi_heads.detections_per_img, rpn.pre_nms_top_n(), rpn.post_nms_top_n()) == (
            5000, PRE_NMS_PER_DETECTION * 5000, PROPOSALS_PER_DETECTION * 5000)
        assert PRE_NMS_PER_DETECTION > PROPOSALS_PER_DETECTION
    with detection_limit(model, 200):
        assert (rpn.pre_nms_top_n(), rpn.post_nms_top_n()) == (1000, 1000)
    assert (model.roi_heads.detections_per_img, rpn.pre_nms_top_n(), rpn.post_nms_top_n()) == (100, 1000, 1000)


def test_masks_are_outlined_in_their_box_grown_by_the_margin_and_the_box_stays():
    """ModelSpec.mask_box_margin: the mask head reads each detected box grown by the margin (px
    at the model's input, inside the image); the reported box is the detector's, the mask's
    frame the grown box on the page. Checkpoints without the field (0) outline in the box."""
    torch.manual_seed(0)
    spec = spec_for_weights("resnet18", "none", min_size=64, max_size=400, norm="group", fpn_channels=64,
                            mask_pixels=True, scale_train=1.0, scale_test=2.0)
    plain = build_model(spec).eval()
    grown = build_model(dataclasses.replace(spec, mask_box_margin=1.0)).eval()
    grown.load_state_dict(plain.state_dict())
    for model in (plain, grown):
        model.roi_heads.score_thresh = 0.0
    image = torch.rand(3, 48, 64)
    with torch.no_grad():
        before, after = plain([image])[0], grown([image])[0]
    assert len(before["boxes"]) > 0 and torch.equal(before["boxes"], after["boxes"])
    assert torch.allclose(before["mask_frames"], before["boxes"])  # mask_in_box: the frame is the box
    # 1 px at the input is 0.5 px of this page (scale 2), clipped to the page.
    expected = (before["boxes"] + torch.tensor([-0.5, -0.5, 0.5, 0.5])).clamp(min=0)
    expected[:, 0::2], expected[:, 1::2] = expected[:, 0::2].clamp(max=64), expected[:, 1::2].clamp(max=48)
    assert torch.allclose(after["mask_frames"], expected, atol=1e-4)
    assert not torch.equal(before["box_masks"], after["box_masks"])
    assert ModelSpec.from_dict({k: v for k, v in spec.to_dict().items() if k != "mask_box_margin"}).mask_box_margin == 0
