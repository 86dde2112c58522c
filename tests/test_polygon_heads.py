"""Polygon-native targets and paste-free outputs agree with stock torchvision on small inputs."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import light_config
from pycocotools import mask as mask_utils
from torch.utils._python_dispatch import TorchDispatchMode
from torchvision.models.detection.roi_heads import maskrcnn_loss, project_masks_on_boxes
from torchvision.models.detection.transform import paste_masks_in_image

from charseg.data.dataset import scan_dataset
from charseg.data.loading import CharacterDataset, collate
from charseg.model.architecture import resolve_spec
from charseg.model.build import ModelSpec, build_model, spec_for_weights
from charseg.model.heads import dice_loss, polygon_mask_loss
from charseg.polygons import PIXEL_CENTRE, box_mask_to_polygon, pack_polygons, polygon_mask_targets, polygons_to_masks


def glyph_polygons(rng: np.random.Generator, n: int, size: int) -> list[np.ndarray]:
    """Random convex-ish polygons (irregular octagons) inside a size x size image."""
    polygons = []
    for _ in range(n):
        cx, cy = rng.uniform(12, size - 12, 2)
        angles = np.sort(rng.uniform(0, 2 * np.pi, 8))
        radii = rng.uniform(4, 10, 8)
        polygons.append(np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], 1).astype(np.float32))
    return polygons


def jittered_boxes(polygons, rng) -> np.ndarray:
    boxes = np.stack([np.concatenate([p.min(0), p.max(0)]) for p in polygons])
    return (boxes + rng.uniform(-2, 2, boxes.shape)).astype(np.float32)


def test_targets_match_stock_projection():
    rng = np.random.default_rng(0)
    polygons = glyph_polygons(rng, 20, 96)
    boxes = jittered_boxes(polygons, rng)
    ours = polygon_mask_targets(polygons, boxes, 28)
    full = polygons_to_masks(polygons, 96, 96)
    stock = project_masks_on_boxes(full, torch.from_numpy(boxes), torch.arange(20), 28).numpy()
    assert ours.shape == stock.shape == (20, 28, 28)
    # Stock samples the full mask bilinearly; ours rasterises exactly: edges differ only.
    assert np.abs(ours - stock).mean() < 0.06
    inside, stock_inside = ours >= 0.5, stock >= 0.5
    assert (inside & stock_inside).sum() / (inside | stock_inside).sum() > 0.9


def test_mask_loss_matches_stock_on_a_sparse_page():
    rng = np.random.default_rng(1)
    polygons = glyph_polygons(rng, 12, 128)
    boxes = torch.from_numpy(jittered_boxes(polygons, rng))
    labels = torch.ones(12, dtype=torch.int64)
    logits = torch.randn(12, 2, 28, 28, generator=torch.Generator().manual_seed(0)) * 3
    full = polygons_to_masks(polygons, 128, 128)
    stock = maskrcnn_loss(logits, [boxes], [full], [labels], [torch.arange(12)])
    points, lengths = pack_polygons(polygons)
    target = {"polygon_points": points, "polygon_lengths": lengths, "image_size": torch.tensor([128, 128]),
              "labels": labels}
    ours = polygon_mask_loss(logits, [boxes], [target], [torch.arange(12)], [(128, 128)])
    assert float(ours) == pytest.approx(float(stock), rel=0.03)


def test_the_dice_term_scores_overlap_and_adds_to_bce_only_when_asked(tiny_dataset):
    target = torch.zeros(2, 28, 28)
    target[:, 8:20, 10:16] = 1.0
    sure = (target * 2 - 1) * 20  # logits of the target itself
    assert float(dice_loss(sure, target)) < 0.01
    assert float(dice_loss(-sure, target)) > 0.99
    half = target.clone()
    half[:, 8:14] = 0  # half the character
    assert 0.2 < float(dice_loss((half * 2 - 1) * 20, target)) < 0.5
    rng = np.random.default_rng(2)
    polygons = glyph_polygons(rng, 6, 96)
    boxes = torch.from_numpy(jittered_boxes(polygons, rng))
    points, lengths = pack_polygons(polygons)
    labels = torch.ones(6, dtype=torch.int64)
    page = {"polygon_points": points, "polygon_lengths": lengths, "image_size": torch.tensor([96, 96]),
            "labels": labels}
    logits = torch.randn(6, 2, 28, 28, generator=torch.Generator().manual_seed(1))
    args = (logits, [boxes], [page], [torch.arange(6)], [(96, 96)], 0.0)
    targets = torch.from_numpy(polygon_mask_targets(polygons, boxes.numpy(), 28, 0.0))
    bce = polygon_mask_loss(*args)
    assert float(polygon_mask_loss(*args, dice=0.5)) == pytest.approx(
        float(bce) + 0.5 * float(dice_loss(logits[:, 1], targets)), rel=1e-5)
    # The weight travels from the training options through the spec into the model's heads; a
    # spec written before it existed means BCE alone.
    config = light_config(tiny_dataset, "unused", mask_dice=0.5)
    samples = scan_dataset(tiny_dataset).samples
    spec = resolve_spec(config, samples, samples)
    assert spec.mask_dice == 0.5 and build_model(spec).roi_heads.mask_dice == 0.5
    assert ModelSpec.from_dict({k: v for k, v in spec.to_dict().items() if k != "mask_dice"}).mask_dice == 0.0
    tuned = resolve_spec(dataclasses.replace(config, mode="finetune", mask_dice=2.0), samples, samples, spec)
    assert tuned.mask_dice == 2.0


def test_whole_model_losses_match_stock(tiny_dataset):
    """Same weights, same batch, same RNG: box and RPN losses equal (RoI pooling sums in another
    order), mask loss close."""
    samples = scan_dataset(tiny_dataset).samples[:2]
    spec = spec_for_weights("resnet18", "none", min_size=96, max_size=96, roi_samples=64, rpn_proposals_train=200)
    torch.manual_seed(0)
    ours = build_model(spec).train()
    stock = build_model(spec, polygon_native=False).train()
    stock.load_state_dict(ours.state_dict())
    stock.to(memory_format=torch.channels_last)  # as ours: the same proposals, bit for bit
    images, targets, _ = collate([CharacterDataset(samples, full_masks=True)[i] for i in range(2)])
    stock_targets = [{k: v for k, v in t.items() if not k.startswith(("polygon", "image_size"))} for t in targets]
    torch.manual_seed(0)
    a = ours(list(images), [{k: v for k, v in t.items() if k != "masks"} for t in targets])
    torch.manual_seed(0)
    b = stock(list(images), stock_targets)
    for key in ("loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"):
        assert float(a[key]) == pytest.approx(float(b[key]), rel=1e-5), key
    assert float(a["loss_mask"]) == pytest.approx(float(b["loss_mask"]), rel=0.05)


def test_box_mask_polygon_is_as_faithful_as_the_pasted_mask():
    """Masks known to come from GT polygons: the outline traced from the box-sized mask fits
    the GT at least as well as stock torchvision's full-image paste does."""
    rng = np.random.default_rng(2)
    polygons = glyph_polygons(rng, 15, 120)
    boxes = jittered_boxes(polygons, rng)
    probs = polygon_mask_targets(polygons, boxes, 28)
    pasted = paste_masks_in_image(torch.from_numpy(probs)[:, None], torch.from_numpy(boxes), (120, 120))[:, 0]
    ours_iou, stock_iou = [], []
    for polygon, prob, box, full in zip(polygons, probs, boxes, pasted.numpy() >= 0.5):
        gt = mask_utils.frPyObjects([polygon.reshape(-1).astype(float).tolist()], 120, 120)
        ours = mask_utils.frPyObjects([box_mask_to_polygon(prob, box + PIXEL_CENTRE)], 120, 120)
        stock = [mask_utils.encode(np.asfortranarray(full.astype(np.uint8)))]
        ours_iou.append(mask_utils.iou(ours, gt, [0])[0, 0])
        stock_iou.append(mask_utils.iou(stock, gt, [0])[0, 0])
    assert np.mean(ours_iou) > 0.85
    assert np.mean(ours_iou) >= np.mean(stock_iou) - 0.01


def traced_ious(model, polygons: list[np.ndarray], scale: float, margins: np.ndarray) -> list[float]:
    """Mask IoU against POLYGONS (on a 120 px page) of the outlines MODEL's post-processing
    traces from masks that equal its training targets (in its mask frame), for boxes MARGINS
    px (of the page the model resized by SCALE) around the characters."""
    from charseg.inference.predict import output_to_instances

    resized = [p * scale for p in polygons]  # as polygon_mask_loss scales them
    bounds = np.stack([np.concatenate([p.min(0), p.max(0)]) for p in resized])
    boxes = (bounds + margins * [-1, -1, 1, 1]).astype(np.float32)
    masks = polygon_mask_targets(resized, boxes, 28, model.roi_heads.mask_frame_offset)
    output = {"boxes": torch.from_numpy(boxes), "labels": torch.ones(len(boxes), dtype=torch.int64),
              "scores": torch.ones(len(boxes)), "masks": torch.from_numpy(masks)[:, None]}
    side = round(120 * scale)
    [output] = model.transform.postprocess([output], [(side, side)], [(120, 120)])
    instances = output_to_instances(output, 0.0, np.zeros((120, 120, 3), np.uint8))
    assert len(instances) == len(polygons)
    ious = []
    for polygon, inst in zip(polygons, instances):
        gt = mask_utils.frPyObjects([polygon.reshape(-1).astype(float).tolist()], 120, 120)
        ious.append(mask_utils.iou(mask_utils.frPyObjects([inst.polygon], 120, 120), gt, [0])[0, 0])
    return ious


@pytest.mark.parametrize("scale", [0.5, 1.0, 3.0])
def test_outlines_come_back_where_the_characters_are_at_any_page_scale(scale):
    """The model resizes a page by SCALE and learns masks in a frame half a pixel of the
    resized page off each box (checkpoints before mask_in_box). A mask head that predicts
    exactly its training targets must give back the annotated outlines on the original page,
    at every scale."""
    spec = spec_for_weights("resnet18", "none", fpn_channels=32)
    model = build_model(dataclasses.replace(spec, mask_in_box=False)).eval()
    rng = np.random.default_rng(3)
    polygons = glyph_polygons(rng, 15, 120)
    # Boxes 1-2 px around each character: its mask can cover it in that frame too.
    ious = traced_ious(model, polygons, scale, rng.uniform(1, 2, (15, 4)))
    assert np.mean(ious) > 0.9, (scale, np.mean(ious))


def test_a_new_model_s_masks_cover_whole_characters_at_any_scale():
    """New models train each mask in its box itself (and read its pixels there): a tight box's
    exact mask outlines its character to IoU 0.93 at every page scale. Checkpoints before
    mask_in_box keep stock torchvision's frame, half a pixel past the box, which cuts off each
    character's left and top half pixel: 0.90 on the same characters at scale 1."""
    spec = spec_for_weights("resnet18", "none", fpn_channels=32, mask_pixels=True)
    model = build_model(spec).eval()
    assert spec.mask_in_box and model.roi_heads.mask_predictor.aligned
    polygons = [p * 0.8 + 10 for p in glyph_polygons(np.random.default_rng(3), 15, 120)]  # 6-16 px
    tight = np.zeros((15, 4))
    for scale in (0.5, 1.0, 1.25, 3.0):
        assert np.mean(traced_ious(model, polygons, scale, tight)) > 0.93, scale
    earlier = build_model(dataclasses.replace(spec, mask_in_box=False)).eval()
    assert not earlier.roi_heads.mask_predictor.aligned
    assert np.mean(traced_ious(earlier, polygons, 1.0, tight)) < 0.91


def test_an_outline_at_the_page_edge_stays_on_the_page():
    """A mask that fills its box up to the page's edge: its outline ends at the edge, as
    annotations do (validate-data would otherwise clip what predict wrote)."""
    from charseg.inference.predict import output_to_instances
    from charseg.model.heads import PasteFreeTransform

    boxes = torch.tensor([[100.0, 0.0, 128.0, 30.0], [0.0, 90.0, 20.0, 128.0]])
    output = {"boxes": boxes, "labels": torch.ones(2, dtype=torch.int64), "scores": torch.ones(2),
              "masks": torch.ones(2, 1, 28, 28)}
    transform = PasteFreeTransform(800, 1333, [0.0] * 3, [1.0] * 3).eval()
    [output] = transform.postprocess([output], [(128, 128)], [(128, 128)])
    for inst in output_to_instances(output, 0.0, np.zeros((128, 128, 3), np.uint8)):
        points = np.array(inst.polygon).reshape(-1, 2)
        assert points.min() >= 0 and points.max() <= 128, inst.polygon
        assert points.max() == 128, inst.polygon


def test_banded_anchor_matching_equals_stock_on_random_boxes(monkeypatch):
    from charseg.model import rpn
    monkeypatch.setattr(rpn, "ANCHOR_CHUNK", 100)  # many chunks on a small problem
    spec = spec_for_weights("resnet18", "none", min_size=64, max_size=64)
    ours, stock = build_model(spec).rpn, build_model(spec, polygon_native=False).rpn
    gen = torch.Generator().manual_seed(0)
    xy = torch.rand(1000, 2, generator=gen) * 200
    anchors = torch.cat([xy, xy + torch.rand(1000, 2, generator=gen) * 40 + 2], 1)
    gxy = torch.rand(37, 2, generator=gen) * 200
    gt = torch.cat([gxy, gxy + torch.rand(37, 2, generator=gen) * 30 + 2], 1)
    targets = [{"boxes": gt}]
    a_labels, a_boxes = ours.assign_targets_to_anchors([anchors], targets)
    b_labels, b_boxes = stock.assign_targets_to_anchors([anchors], targets)
    assert torch.equal(a_labels[0], b_labels[0]) and torch.equal(a_boxes[0], b_boxes[0])
    assert int((a_labels[0] == 1).sum()) > 0 and int((a_labels[0] == -1).sum()) > 0


def test_anchor_matching_on_the_real_anchor_grid_equals_stock(monkeypatch):
    from torchvision.models.detection.image_list import ImageList

    from charseg.model import rpn
    monkeypatch.setattr(rpn, "ANCHOR_CHUNK", 32)  # tight chunk extents: pruning matters
    spec = spec_for_weights("resnet18", "none", min_size=128, max_size=128)
    ours, stock = build_model(spec).rpn, build_model(spec, polygon_native=False).rpn
    sizes = [(32, 32), (16, 16), (8, 8), (4, 4), (2, 2)]  # FPN levels of a 128 px image
    anchors = ours.anchor_generator(ImageList(torch.zeros(1, 3, 128, 128), [(128, 128)]),
                                    [torch.zeros(1, 8, h, w) for h, w in sizes])
    gen = torch.Generator().manual_seed(1)
    gxy = torch.rand(60, 2, generator=gen) * 110
    gt = torch.cat([gxy, gxy + torch.rand(60, 2, generator=gen) * 14 + 4], 1)  # glyph-sized boxes
    a_labels, a_boxes = ours.assign_targets_to_anchors(anchors, [{"boxes": gt}])
    b_labels, b_boxes = stock.assign_targets_to_anchors(anchors, [{"boxes": gt}])
    assert torch.equal(a_labels[0], b_labels[0]) and torch.equal(a_boxes[0], b_boxes[0])


def test_anchor_matching_with_a_box_off_every_anchor_equals_stock():
    spec = spec_for_weights("resnet18", "none", min_size=64, max_size=64)
    ours, stock = build_model(spec).rpn, build_model(spec, polygon_native=False).rpn
    anchors = torch.tensor([[0.0, 0, 10, 10], [5, 5, 20, 20], [30, 30, 40, 40]])
    gt = torch.tensor([[6.0, 6, 19, 19], [500, 500, 510, 510]])  # the second overlaps no anchor
    a_labels, a_boxes = ours.assign_targets_to_anchors([anchors], [{"boxes": gt}])
    b_labels, b_boxes = stock.assign_targets_to_anchors([anchors], [{"boxes": gt}])
    assert torch.equal(a_labels[0], b_labels[0]) and torch.equal(a_boxes[0], b_boxes[0])


def test_chunked_mask_head_gives_stock_masks(tiny_dataset, monkeypatch):
    from charseg.model import heads as polygon_heads
    monkeypatch.setattr(polygon_heads, "MASK_CHUNK", 7)  # several chunks, the last one short
    spec = spec_for_weights("resnet18", "none", min_size=64, max_size=64)
    torch.manual_seed(0)
    ours = build_model(spec).eval()
    stock = build_model(spec, polygon_native=False).eval()
    stock.load_state_dict(ours.state_dict())
    stock.transform = ours.transform  # compare before pasting
    stock.to(memory_format=torch.channels_last)  # as ours: the same convolution kernels, bit for bit
    images = [CharacterDataset(scan_dataset(tiny_dataset).samples)[i][0] for i in range(2)]
    with torch.inference_mode():
        a, b = ours(images), stock(images)
    for x, y in zip(a, b):  # RoI pooling sums in another order: float32 rounding
        assert len(x["boxes"]) > 7
        torch.testing.assert_close(x["boxes"], y["boxes"], rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(x["box_masks"], y["box_masks"], rtol=0, atol=1e-4)


def test_frozen_norms_folded_into_convolutions_compute_the_same():
    from torchvision.ops.misc import FrozenBatchNorm2d

    from charseg.model.frozen_norm import FrozenBNConv2d
    spec = spec_for_weights("resnet18", "coco", min_size=64, max_size=64)  # pretrained layout: frozen norms
    torch.manual_seed(0)
    stock = build_model(spec, polygon_native=False)
    for norm in (m for m in stock.modules() if isinstance(m, FrozenBatchNorm2d)):  # norms that do something
        for buffer in (norm.weight, norm.bias, norm.running_mean):
            buffer.normal_()
        norm.running_var.uniform_(0.5, 2.0)
    ours = build_model(spec)
    ours.load_state_dict(stock.state_dict())  # the same keys: the norms keep their buffers
    assert list(ours.state_dict()) == list(stock.state_dict())
    assert sum(isinstance(m, FrozenBNConv2d) for m in ours.modules()) == 20  # stem, 8 blocks x 2, 3 downsamples
    assert ours.backbone.body.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.rand(2, 3, 64, 64)
    a, b = stock.backbone(x), ours.backbone(x)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-4)
    sum(v.square().sum() for v in a.values()).backward()
    sum(v.square().sum() for v in b.values()).backward()
    trained = ours.backbone.body.layer4[0].conv1.weight  # a trainable layer's weight, scaled by its norm
    expected = stock.backbone.body.layer4[0].conv1.weight.grad
    assert (trained.grad - expected).norm() < 1e-4 * expected.norm()  # float32 rounding, summed in another order


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_folded_convolutions_keep_no_scaled_weight_for_backward_and_give_the_same_gradients(precision):
    """The scaled weight of a trainable FrozenBNConv2d is recomputed in backward, not kept from
    forward: a copy of every trainable backbone weight (94 MB for ResNet-50) less at the peak."""
    import weakref

    from charseg.model.frozen_norm import FrozenBNConv2d
    from charseg.precision import autocast
    spec = spec_for_weights("resnet18", "coco", min_size=64, max_size=64)
    torch.manual_seed(0)
    model = build_model(spec).train()
    conv_forward, scaled = FrozenBNConv2d._conv_forward, []

    def spy(self, x, weight, bias):
        if weight.requires_grad:
            scaled.append((weakref.ref(weight), weight.dtype))
        return conv_forward(self, x, weight, bias)

    x = torch.rand(2, 3, 64, 64)
    with pytest.MonkeyPatch.context() as patch, autocast(precision, "cpu"):
        patch.setattr(FrozenBNConv2d, "_conv_forward", spy)
        features = model.backbone(x)
    assert len(scaled) == 15  # trainable layers 2-4: 6 blocks x 2 convolutions, 3 downsamples
    # Freed while the graph that needs them lives; already in autocast's dtype, so autocast
    # makes (and the graph keeps) no copy of its own.
    assert all(ref() is None and dtype == (torch.bfloat16 if precision == "bf16" else torch.float32)
               for ref, dtype in scaled)
    sum(v.float().square().sum() for v in features.values()).backward()

    conv = model.backbone.body.layer4[0].conv1  # against the plain formula, autograd keeping the weight
    norm = conv.frozen_norm[0]
    scale = norm.weight * (norm.running_var + norm.eps).rsqrt()
    inputs = torch.rand(2, conv.in_channels, 8, 8).to(memory_format=torch.channels_last).requires_grad_()
    with autocast(precision, "cpu"):
        ours = conv(inputs)
        plain = F.conv2d(inputs, conv.weight * scale.reshape(-1, 1, 1, 1), norm.bias - norm.running_mean * scale,
                         conv.stride, conv.padding)
    assert torch.equal(ours, plain)
    grads = [torch.autograd.grad(y.float().square().sum(), (inputs, conv.weight)) for y in (ours, plain)]
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_inference_returns_box_sized_masks_unlike_stock(tiny_dataset):
    spec = spec_for_weights("resnet18", "none", min_size=64, max_size=64)
    model = build_model(spec).eval()
    stock = build_model(spec, polygon_native=False).eval()
    stock.load_state_dict(model.state_dict())
    image = CharacterDataset(scan_dataset(tiny_dataset).samples)[0][0]
    with torch.inference_mode():
        out = model([image])[0]
        assert "masks" not in out and out["box_masks"].shape[1:] == (28, 28)
        assert stock([image])[0]["masks"].shape[-2:] == (64, 64)


DENSE_STEP = textwrap.dedent("""
    import sys, torch
    from charseg.data.dataset import scan_dataset
    from charseg.data.loading import CharacterDataset, collate
    from charseg.model.build import build_model, spec_for_weights
    stock = sys.argv[2] == "stock"
    torch.manual_seed(0)
    samples = scan_dataset(sys.argv[1]).samples
    spec = spec_for_weights("resnet18", "none", min_size=512, max_size=512, detections_per_img=1000)
    model = build_model(spec, polygon_native=not stock).train()
    images, targets, _ = collate([CharacterDataset(samples, full_masks=stock)[0]])
    if not stock:
        targets = [{k: v for k, v in t.items() if k != "masks"} for t in targets]
    sum(model(list(images), list(targets)).values()).backward()
    model.eval()
    with torch.inference_mode():
        model(list(images))
    # VmHWM: this program's own peak (ru_maxrss would also count pytest's RSS at the fork).
    hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    print(len(targets[0]["boxes"]), int(hwm.split()[1]) / 1024)
""")


@pytest.mark.slow
def test_dense_page_trains_and_predicts_without_full_image_masks(tmp_path):
    from charseg.data.generate import generate_dataset
    generate_dataset(tmp_path, num_images=1, width=512, height=512, chars_per_image=(500, 500), font_size=(10, 14),
                     seed=0)
    peak_mb = {}
    for path in ("charseg", "stock"):  # each in a fresh process: peak RSS of one train step + inference
        done = subprocess.run([sys.executable, "-c", DENSE_STEP, str(tmp_path), path], capture_output=True,
                              text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        characters, peak_mb[path] = int(done.stdout.split()[0]), float(done.stdout.split()[1])
    assert characters >= 300
    # Measured 1.6 GB vs 2.8 GB (0.57x); the imported libraries (~0.5 GB) are in both.
    assert peak_mb["charseg"] < 0.7 * peak_mb["stock"], peak_mb


class FullImageMaskWatch(TorchDispatchMode):
    """Records every operator output shaped like a stack of full-image masks: (N, H, W) or
    (N, 1, H, W) at the model's input size H x W, N >= 10 (the RGB image is (3, H, W))."""

    def __init__(self, height: int, width: int):
        super().__init__()
        self.size, self.seen = (height, width), []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.dim() in (3, 4) and tuple(t.shape[-2:]) == self.size \
                    and t.shape[0] >= 10 and (t.dim() == 3 or t.shape[1] == 1):
                self.seen.append((str(func), tuple(t.shape)))
        return out


@pytest.mark.parametrize("path", ["charseg", "stock"])
def test_no_full_image_mask_stack_in_training_or_inference(tmp_path, path):
    from charseg.data.generate import generate_dataset
    generate_dataset(tmp_path, num_images=1, width=160, height=128, chars_per_image=(30, 30), font_size=(12, 16),
                     seed=0)
    stock = path == "stock"
    spec = spec_for_weights("resnet18", "none", min_size=128, max_size=160)
    torch.manual_seed(0)
    model = build_model(spec, polygon_native=not stock).train()
    images, targets, _ = collate([CharacterDataset(scan_dataset(tmp_path).samples, full_masks=stock)[0]])
    with FullImageMaskWatch(128, 160) as watch:
        sum(model(list(images), list(targets)).values()).backward()
        model.eval()
        with torch.inference_mode():
            detections = model(list(images))[0]
    assert len(detections["boxes"]) >= 2
    if stock:  # the check sees torchvision's target resize and mask pasting
        assert len(watch.seen) >= 2, watch.seen
    else:
        assert watch.seen == []


def test_anchor_matching_with_an_image_without_characters_equals_stock():
    spec = spec_for_weights("resnet18", "none", min_size=64, max_size=64)
    ours, stock = build_model(spec).rpn, build_model(spec, polygon_native=False).rpn
    anchors = torch.tensor([[0.0, 0, 10, 10], [5, 5, 20, 20], [30, 30, 40, 40]])
    targets = [{"boxes": torch.zeros((0, 4))}, {"boxes": torch.tensor([[6.0, 6, 19, 19]])}]
    a_labels, a_boxes = ours.assign_targets_to_anchors([anchors, anchors], targets)
    b_labels, b_boxes = stock.assign_targets_to_anchors([anchors, anchors], targets)
    for a, b in zip(a_labels + a_boxes, b_labels + b_boxes):
        assert torch.equal(a, b)
    assert int(a_labels[0].abs().sum()) == 0 and int((a_labels[1] == 1).sum()) == 1


def test_gather_roi_align_pools_what_the_stock_op_pools_forward_and_backward():
    """RoI pooling as a weighted gather of channel vectors (embedding_bag) must give the stock
    op's values and the features' gradient, whatever the features' memory layout, for RoIs
    across the page's borders, smaller than a pixel of the level, and images without any."""
    from torchvision.ops import MultiScaleRoIAlign

    from charseg.model import roi_pool

    torch.manual_seed(0)
    features = {"0": torch.randn(2, 8, 64, 64), "1": torch.randn(2, 8, 32, 32), "2": torch.randn(2, 8, 16, 16)}
    boxes = []
    for n in (70, 45):
        corner = torch.rand(n, 2) * 280 - 20  # some start left of or above the page, some end past it
        boxes.append(torch.cat([corner, corner + 0.5 + torch.rand(n, 2) * 50], 1))
    boxes[0][:3] = torch.tensor([[-30.0, -30, -5, -5], [250, 250, 300, 290], [100, 100, 100.5, 100.2]])
    shapes = [(256, 256), (256, 256)]
    weights = torch.randn(115, 8, 7, 7)

    def pooled_and_gradients(pooler, boxes, memory_format):
        inputs = {k: v.clone(memory_format=memory_format).requires_grad_(True) for k, v in features.items()}
        out = pooler(inputs, boxes, shapes)
        (out * weights[:len(out)]).sum().backward()
        return out.detach(), [inputs[k].grad for k in inputs]

    stock = MultiScaleRoIAlign(["0", "1", "2"], 7, 2)
    gather = roi_pool.GatherRoIAlign(["0", "1", "2"], 7, 2)
    no_box_first = [boxes[0][:0], boxes[1]]  # an image without boxes
    for case in (boxes, no_box_first):
        expected, expected_grads = pooled_and_gradients(stock, case, torch.contiguous_format)
        assert expected.abs().sum() > 0
        for memory_format in (torch.contiguous_format, torch.channels_last):
            got, grads = pooled_and_gradients(gather, case, memory_format)
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
            for g, e in zip(grads, expected_grads):
                torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)
        with torch.inference_mode():
            torch.testing.assert_close(gather(features, case, shapes), expected, rtol=1e-5, atol=1e-6)
