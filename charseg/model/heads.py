"""Polygon-native Mask R-CNN parts for dense pages.

Stock torchvision gives every instance a full-image mask: in training, targets of N x H x W
that `project_masks_on_boxes` casts to float; at inference, every mask pasted into a
full-image float tensor. On a 1024x1024 page with 1,700 characters that is gigabytes.
Here, as in detectron2's `PolygonMasks.crop_and_resize`, polygons travel from the dataset
to the loss and each mask target is rasterised at the mask head's resolution (28x28)
inside its proposal only; at inference, masks stay box-sized (`box_masks`) and become
polygons directly. Memory grows with instances x 28^2, not instances x H x W.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.mask_rcnn import MaskRCNN
from torchvision.models.detection.roi_heads import RoIHeads, fastrcnn_loss, maskrcnn_inference
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.models.detection.transform import (GeneralizedRCNNTransform, _fake_cast_onnx, _get_shape_onnx,
                                                    resize_boxes)
from torchvision.ops import boxes as box_ops
from torchvision.ops import roi_align

from ..config import MAX_PAGE_SCALE
from ..data.loading import POLYGON_KEYS
from ..polygons import PIXEL_CENTRE, polygon_mask_targets, unpack_polygons
from .recompute import RecomputingFPN
from .roi_pool import float32_features
from .sampling import ROI_SALT, SeededSampler

log = logging.getLogger("charseg")

# Detections sent through the mask head at once at inference (memory: MASK_CHUNK x 256 x 28^2).
MASK_CHUNK = 64
# The feature that carries the input pixels to a PixelMaskPredictor (PixelFPN).
PIXELS = "pixels"
# GroupNorm groups of a PixelMaskPredictor's refining blocks (32 channels: 4 per group).
REFINE_GROUPS = 8
# px: at inference, a page-scaled model (ModelSpec.scale_test) caps the long side of its input at
# this or its training max_size, whichever is larger (PasteFreeTransform.inference_cap).
PAGE_MAX_SIDE = 4096
# PolygonMaskRCNN's second reading of a page of small characters (page_scale_for): detections
# of at least this score measure the page, at least this many of them, and their median height
# must be this factor below the training median. Measured on the demo's model, docs/QUALITY.md.
FOLLOW_SCORE = 0.5
FOLLOW_MIN_BOXES = 5
FOLLOW_BAND = 1.15
FOLLOW_MAX_RATIO = 2.0  # at most this much larger than the first reading


def polygon_mask_loss(mask_logits: torch.Tensor, proposals: list[torch.Tensor], targets: list[dict],
                      matched_idxs: list[torch.Tensor], image_shapes: list[tuple[int, int]],
                      frame_offset: float = PIXEL_CENTRE, dice: float = 0.0) -> torch.Tensor:
    """Mask R-CNN mask loss with targets rasterised from polygons inside each positive proposal
    (moved by `frame_offset`: polygon_mask_targets): per-pixel BCE, plus `dice` x dice_loss."""
    size = mask_logits.shape[-1]
    mask_targets, labels = [], []
    for props, target, idxs, shape in zip(proposals, targets, matched_idxs, image_shapes):
        polygons = unpack_polygons(target["polygon_points"], target["polygon_lengths"])
        orig_h, orig_w = target["image_size"].tolist()
        # The transform resized the image and boxes, not the polygons: scale them the same way.
        ratio = np.array([shape[1] / orig_w, shape[0] / orig_h], dtype=np.float32)
        idx = idxs.cpu().numpy()
        matched = [polygons[i] * ratio for i in idx]
        mask_targets.append(torch.from_numpy(polygon_mask_targets(matched, props.detach().cpu().numpy(), size,
                                                                  frame_offset)))
        labels.append(target["labels"][idxs])
    labels_t = torch.cat(labels)
    targets_t = torch.cat(mask_targets).to(mask_logits.device)
    if targets_t.numel() == 0:
        return mask_logits.sum() * 0
    logits = mask_logits[torch.arange(labels_t.shape[0], device=labels_t.device), labels_t]
    loss = F.binary_cross_entropy_with_logits(logits, targets_t)
    return loss + dice * dice_loss(logits, targets_t) if dice else loss


def dice_loss(logits: torch.Tensor, targets: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """1 - Dice coefficient of each mask's probabilities against its (soft) target, averaged
    over masks (Milletari et al., V-Net; the mask loss of SOLO and CondInst); `smooth` keeps a
    mask with an empty target defined."""
    probs = logits.sigmoid().flatten(1)
    targets = targets.flatten(1)
    overlap = (probs * targets).sum(1)
    return (1 - (2 * overlap + smooth) / (probs.sum(1) + targets.sum(1) + smooth)).mean()


class PolygonRoIHeads(RoIHeads):
    """RoIHeads whose mask loss reads polygon targets (`polygon_points`, `polygon_lengths`,
    `image_size`) instead of full-image masks. Targets with `masks` take the stock path.
    `mask_frame_offset`: where each mask lies against its box (polygon_mask_targets);
    `mask_dice`: the weight of the mask loss's Dice term (polygon_mask_loss); `outline`: how
    inference outlines each mask (ModelSpec.outline), read by whoever turns the output into
    polygons (inference/predict.output_to_instances)."""

    def __init__(self, *args, mask_frame_offset: float = PIXEL_CENTRE, mask_dice: float = 0.0,
                 mask_box_margin: float = 0.0, outline: str = "mask", **kwargs):
        super().__init__(*args, **kwargs)
        self.fg_bg_sampler = SeededSampler(self.fg_bg_sampler.batch_size_per_image,
                                           self.fg_bg_sampler.positive_fraction)
        self.mask_frame_offset = mask_frame_offset
        self.mask_dice = mask_dice
        self.mask_box_margin = mask_box_margin
        self.outline = outline
        # Set by PolygonMaskRCNN.forward around a first reading: inference then keeps what the
        # masks need (`deferred`) instead of computing them, for `page_masks` on the pages kept.
        self.defer_masks = False
        self.deferred: tuple | None = None
        # False while a caller reads pages that reach detections_per_img again with a higher
        # limit (inference/predict.unoutlined_at_limit): their masks would be thrown away.
        self.outline_full_pages = True

    def check_targets(self, targets):
        if targets is None:
            raise ValueError("targets should not be None")
        needed = ("boxes", "labels") if "masks" in targets[0] else ("boxes", "labels", *POLYGON_KEYS)
        for key in needed:
            if not all(key in t for t in targets):
                raise ValueError(f"every target needs a {key!r} key")
        if "masks" in targets[0]:
            super().check_targets(targets)

    def forward(self, features, proposals, image_shapes, targets=None):
        features = float32_features(features, {*self.box_roi_pool.featmap_names, *self.mask_roi_pool.featmap_names})
        if not self.training:
            return self._infer(features, proposals, image_shapes), {}
        self.fg_bg_sampler.seed_from(targets, ROI_SALT)
        if targets is None or "masks" in targets[0]:
            return super().forward(features, proposals, image_shapes, targets)
        proposals, matched_idxs, labels, regression_targets = self.select_training_samples(proposals, targets)
        box_features = self.box_head(self.box_roi_pool(features, proposals, image_shapes))
        class_logits, box_regression = (t.float() for t in self.box_predictor(box_features))
        loss_classifier, loss_box_reg = fastrcnn_loss(class_logits, box_regression, labels, regression_targets)
        positives = [torch.where(lab > 0)[0] for lab in labels]
        mask_proposals = [p[pos] for p, pos in zip(proposals, positives)]
        pos_matched = [m[pos] for m, pos in zip(matched_idxs, positives)]
        mask_logits = self.mask_logits(features, mask_proposals, image_shapes)
        loss_mask = polygon_mask_loss(mask_logits, mask_proposals, targets, pos_matched, image_shapes,
                                      self.mask_frame_offset, self.mask_dice)
        return [], {"loss_classifier": loss_classifier, "loss_box_reg": loss_box_reg, "loss_mask": loss_mask}


    def mask_logits(self, features, boxes: list[torch.Tensor], image_shapes) -> torch.Tensor:
        """Mask logits of `boxes` (one tensor per image); a PixelMaskPredictor also reads the
        input's pixels inside each box."""
        x = self.mask_head(self.mask_roi_pool(features, boxes, image_shapes))
        if isinstance(self.mask_predictor, PixelMaskPredictor):
            return self.mask_predictor(x, features[PIXELS], boxes).float()
        return self.mask_predictor(x).float()

    def _infer(self, features, proposals, image_shapes) -> list[dict[str, torch.Tensor]]:
        """Stock inference, but the mask head runs over MASK_CHUNK detections at a time: on a
        dense page its activations for 2,000 detections at once take gigabytes. Traced for
        export, in one go: a trace would fix the number of chunks to its example's."""
        box_features = self.box_head(self.box_roi_pool(features, proposals, image_shapes))
        class_logits, box_regression = (t.float() for t in self.box_predictor(box_features))
        boxes, scores, labels = self.postprocess_detections(class_logits, box_regression, proposals, image_shapes)
        results = [{"boxes": b, "labels": lab, "scores": sc} for b, sc, lab in zip(boxes, scores, labels)]
        mask_boxes = [self.grown_for_masks(b, shape) for b, shape in zip(boxes, image_shapes)]
        if self.mask_box_margin:
            for result, grown in zip(results, mask_boxes):
                result["mask_boxes"] = grown  # PasteFreeTransform.postprocess: the masks' frames
        if torchvision._is_tracing():
            # One box more, dropped after: ONNX Runtime cannot run GroupNorm over no boxes (a page
            # without characters), its reshape of zero elements fails.
            spare = [*mask_boxes[:-1], torch.cat([mask_boxes[-1], mask_boxes[-1].new_tensor([[0.0, 0.0, 1.0, 1.0]])])]
            logits = self.mask_logits(features, spare, image_shapes)[:-1]
            for result, masks in zip(results, maskrcnn_inference(logits, labels)):
                result["masks"] = masks
            return results
        if self.defer_masks:
            self.deferred = (features, mask_boxes, [r["labels"] for r in results], image_shapes)
            return results
        for i, result in enumerate(results):
            if self.outlines(result):
                result["masks"] = self.page_masks(features, mask_boxes, result["labels"], image_shapes, i)
        return results

    def outlines(self, result: dict) -> bool:
        """Whether a page's detections (RESULT) get masks: not when they reach the limit while
        outline_full_pages is off."""
        return self.outline_full_pages or len(result["labels"]) < self.detections_per_img

    def page_masks(self, features, mask_boxes: list[torch.Tensor], labels: torch.Tensor, image_shapes,
                   page: int) -> torch.Tensor:
        """The masks (N x 1 x 28 x 28) of PAGE's detections (their MASK_BOXES and LABELS), MASK_CHUNK
        at a time."""
        chunks = []
        for start in range(0, len(labels), MASK_CHUNK):
            chunk = mask_boxes[page][start:start + MASK_CHUNK]
            # MultiScaleRoIAlign reads the image index from the list position.
            per_image = [chunk if j == page else chunk[:0] for j in range(len(mask_boxes))]
            logits = self.mask_logits(features, per_image, image_shapes)
            chunks.append(maskrcnn_inference(logits, [labels[start:start + MASK_CHUNK]])[0])
        size = 2 * self.mask_roi_pool.output_size[0]  # the predictor's deconvolution doubles it
        return torch.cat(chunks) if chunks else mask_boxes[page].new_zeros((0, 1, size, size))

    def grown_for_masks(self, boxes: torch.Tensor, image_shape: tuple[int, int]) -> torch.Tensor:
        """BOXES grown by mask_box_margin px on every side (inside the image): the boxes the mask
        head outlines in at inference. A detected box is as often a little inside the character's
        edge as outside it, and a mask ends at its box: the margin keeps the edge's pixels."""
        if not self.mask_box_margin:
            return boxes
        margin = self.mask_box_margin
        return box_ops.clip_boxes_to_image(boxes + boxes.new_tensor([-margin, -margin, margin, margin]), image_shape)


class PixelMaskPredictor(nn.Module):
    """MaskRCNNPredictor that also sees the image: after the deconvolution to 28x28, the
    input's pixels inside each box (roi_align at 28x28) are concatenated to the features and
    a small refining network turns both into the logits.

    A character is its pixels: at stride 4, a 20 px glyph spans 5x5 feature cells, too coarse
    for its strokes, while its own pixels draw them at full resolution. `dilations`: 3x3
    blocks (GroupNorm, ReLU) after the first convolution, whose view must span the box to fill
    a glyph's outline, not only trace its strokes; () gives the first version's two plain
    convolutions (checkpoints trained with it keep loading). `aligned`: the pixels are read in
    the box itself (roi_align aligned=True), else half a pixel past it, as the masks' frame.
    """

    def __init__(self, in_channels: int, dim_reduced: int, num_classes: int, refine: int = 32,
                 image_channels: int = 3, dilations: tuple[int, ...] = (), aligned: bool = False):
        super().__init__()
        self.aligned = aligned
        self.conv5_mask = nn.ConvTranspose2d(in_channels, dim_reduced, 2, 2, 0)
        if dilations:
            blocks = [_refine_block(dim_reduced + image_channels, refine, 1)]
            blocks += [_refine_block(refine, refine, d) for d in dilations]
            self.pixel_refine = nn.Sequential(*blocks)
        else:
            self.pixel_refine = nn.Sequential(nn.Conv2d(dim_reduced + image_channels, refine, 3, padding=1),
                                              nn.ReLU(inplace=True), nn.Conv2d(refine, refine, 3, padding=1),
                                              nn.ReLU(inplace=True))
        self.mask_fcn_logits = nn.Conv2d(refine, num_classes, 1)
        for module in self.modules():  # as torchvision's MaskRCNNPredictor
            if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                nn.init.constant_(module.bias, 0)

    def forward(self, x: torch.Tensor, pixels: torch.Tensor, boxes: list[torch.Tensor]) -> torch.Tensor:
        x = F.relu(self.conv5_mask(x), inplace=True)
        size = x.shape[-1]
        crops = roi_align(pixels, boxes, (size, size), spatial_scale=1.0, sampling_ratio=2, aligned=self.aligned)
        # in x's layout (channels-last from the deconvolution), so that the concatenation is too
        # and the refine's first convolution reads it without a reorder
        crops = crops.to(x.dtype).contiguous(memory_format=_layout_of(x))
        return self.mask_fcn_logits(self.pixel_refine(torch.cat([x, crops], 1)))


def _layout_of(x: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format


def _refine_block(in_channels: int, out_channels: int, dilation: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, padding=dilation, dilation=dilation),
                         nn.GroupNorm(REFINE_GROUPS, out_channels), nn.ReLU(inplace=True))


class PixelFPN(RecomputingFPN):
    """RecomputingFPN (torchvision's BackboneWithFPN) that also hands on its input (the normalised,
    batched images) as the feature PIXELS, for a PixelMaskPredictor; RoI pooling reads only its
    named levels."""

    def forward(self, x: torch.Tensor):
        features = super().forward(x)
        features[PIXELS] = x
        return features


class PasteFreeTransform(GeneralizedRCNNTransform):
    """Leaves masks box-sized at inference (`box_masks`, N x 28 x 28 probabilities, each
    covering its `mask_frames` rectangle of the page) instead of pasting each into a
    full-image tensor (build_model(polygon_native=False) pastes).

    `page_scales` (training, inference): a factor > 0 resizes each image by that factor of its
    own size, not its short side to min_size; the long side is still capped (inference_cap).
    `max_input_side`: that cap at inference, instead of inference_cap's rule (predict and
    evaluate's --max-size).
    """

    def __init__(self, *args, page_scales: tuple[float, float] = (0.0, 0.0),
                 mask_frame_offset: float = PIXEL_CENTRE, **kwargs):
        super().__init__(*args, **kwargs)
        self.page_scales = page_scales
        self.mask_frame_offset = mask_frame_offset
        self.max_input_side: int | None = None

    def inference_cap(self) -> int:
        """The long side's cap at inference. max_size (the training cap) for a model that
        resizes to min_size, as torchvision's. A page-scaled model learned glyphs at the
        page's own size times its scale: its training cap only bounded the memory of its
        training pages, and shrinking a larger page (a 2048 px document) by it would make
        every glyph smaller than any it learned; at inference it caps at PAGE_MAX_SIDE or
        max_size, whichever is larger."""
        if self.max_input_side:
            return self.max_input_side
        return max(self.max_size, PAGE_MAX_SIDE) if self.page_scales[1] else self.max_size

    def shrunk_by_cap(self, height: int, width: int) -> float | None:
        """At inference, the factor a page-scaled model resizes an image of this size by when
        the cap made it smaller than the page scale asks; None otherwise."""
        scale = self.page_scales[1]
        if not scale:
            return None
        wanted = max(1, round(min(height, width) * scale)) / min(height, width)
        applied = min(wanted, self.inference_cap() / max(height, width))
        return applied if applied < wanted else None

    def resize(self, image, target=None):
        scale = self.page_scales[0] if self.training else self.page_scales[1]
        if not scale:
            if self.training or not self.max_input_side:
                return super().resize(image, target)
            with _swapped(self, max_size=self.max_input_side):
                return super().resize(image, target)
        if torchvision._is_tracing() and target is None:
            return self._traced_resize(image, scale), None
        # torchvision's resize with this image's own short side times `scale` as the target.
        short = (max(1, round(min(image.shape[-2:]) * scale)),)
        with _swapped(self, min_size=short, max_size=self.max_size if self.training else self.inference_cap()):
            return super().resize(image, target)

    def _traced_resize(self, image: torch.Tensor, scale: float) -> torch.Tensor:
        """resize() in tensor operations for export (inference/export.py): the page's own size is
        an input of the traced graph, not the example's (float64 as Python's arithmetic)."""
        size = _get_shape_onnx(image).to(torch.float64)
        short, long = size.min(), size.max()
        factor = torch.minimum(torch.round(short * scale) / short, self.inference_cap() / long)
        return F.interpolate(image[None], scale_factor=_fake_cast_onnx(factor.float()), mode="bilinear",
                             recompute_scale_factor=True, align_corners=False)[0]

    def postprocess(self, result, image_shapes, original_image_sizes):
        if self.training:
            return super().postprocess(result, image_shapes, original_image_sizes)
        for pred, im_s, o_im_s in zip(result, image_shapes, original_image_sizes):
            boxes = pred["boxes"]
            pred["boxes"] = resize_boxes(boxes, im_s, o_im_s)
            frames = pred.pop("mask_boxes", boxes)
            if "masks" in pred:
                self.place_masks(pred, pred.pop("masks"), frames, im_s, o_im_s)
        return result

    def place_masks(self, pred: dict, masks: torch.Tensor, frames: torch.Tensor, image_shape, original_size) -> None:
        """PRED's box masks (MASKS, N x 1 x h x w) and the rectangle of the page each covers, in
        the polygons' convention: FRAMES (the boxes grown by the heads' mask margin, on the
        resized page of IMAGE_SHAPE) moved by the frame offset its masks were trained with
        (polygon_mask_targets), then to the ORIGINAL_SIZE page."""
        pred["box_masks"] = masks[:, 0]
        pred["mask_frames"] = resize_boxes(frames + self.mask_frame_offset, image_shape, original_size)


@contextlib.contextmanager
def _swapped(obj: object, **values) -> Iterator[None]:
    """OBJ's attributes set to VALUES inside the block, restored after."""
    saved = {name: getattr(obj, name) for name in values}
    for name, value in values.items():
        setattr(obj, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(obj, name, value)


class PolygonMaskRCNN(MaskRCNN):
    """charseg's Mask R-CNN: torchvision's, assembled from the polygon-native parts above
    (model.build_model builds them). Under a caller's autocast (precision.Compute), what must
    stay exact stays float32: anchors (Float32Anchors), the RPN's and the box predictor's
    outputs before box decoding, mask logits, every loss. Its state dict is stock torchvision's."""

    def __init__(self, backbone: nn.Module, rpn: RegionProposalNetwork, roi_heads: RoIHeads,
                 transform: PasteFreeTransform, glyph_height: float = 0.0):
        # MaskRCNN's and FasterRCNN's constructors build torchvision's own parts from arguments;
        # these parts are built by the caller, so only GeneralizedRCNN's is run.
        GeneralizedRCNN.__init__(self, backbone, rpn, roi_heads, transform)
        # The scale follows the page: at inference a page-scaled model reads a page whose
        # characters come out smaller than its training pages' median (ModelSpec.glyph_height)
        # again, enlarged by the ratio (page_scale_for). 0: every page at the model's scale.
        self.glyph_height = glyph_height

    def forward(self, images, targets=None):
        base = self.transform.page_scales[1]
        if self.training or not (self.glyph_height and base) or torchvision._is_tracing():
            return super().forward(images, targets)
        # The first reading's masks are computed only for the pages it keeps: a page read again
        # would throw them away, and on a dense page they are a large share of a reading's time.
        try:
            with _swapped(self.roi_heads, defer_masks=True):
                outputs = super().forward(images, targets)
            features, mask_boxes, labels, image_shapes = self.roi_heads.deferred
        finally:
            self.roi_heads.deferred = None
        scales = [page_scale_for(o["boxes"][o["scores"] >= FOLLOW_SCORE], self.glyph_height, base) for o in outputs]
        for index, (output, scale) in enumerate(zip(outputs, scales)):
            if scale is None and self.roi_heads.outlines(output):
                masks = self.roi_heads.page_masks(features, mask_boxes, labels[index], image_shapes, index)
                self.transform.place_masks(output, masks, mask_boxes[index], image_shapes[index],
                                           images[index].shape[-2:])
        del features, mask_boxes
        for index, scale in enumerate(scales):
            if scale is not None:
                log.debug("characters smaller than the training pages' %.1f px: page read again at scale %.2f",
                          self.glyph_height, scale)
                with _swapped(self.transform, page_scales=(self.transform.page_scales[0], scale)):
                    outputs[index] = super().forward([images[index]])[0]
        return outputs


def page_scale_for(boxes: torch.Tensor, glyph_height: float, scale: float) -> float | None:
    """The page scale to read a page at again, given the BOXES found on it at SCALE: the scale
    that brings their median height up to GLYPH_HEIGHT (the training pages' median), at most
    FOLLOW_MAX_RATIO times SCALE and MAX_PAGE_SCALE; None to keep the first reading (too few
    boxes to measure, characters no more than FOLLOW_BAND smaller). Only enlarges: on a page of
    characters much larger than any in training the boxes are strokes and parts, not
    characters, and measure nothing."""
    if len(boxes) < FOLLOW_MIN_BOXES:
        return None
    ratio = min(glyph_height / float((boxes[:, 3] - boxes[:, 1]).median()), FOLLOW_MAX_RATIO)
    return min(scale * ratio, MAX_PAGE_SCALE) if ratio > FOLLOW_BAND and scale < MAX_PAGE_SCALE else None

