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

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.mask_rcnn import MaskRCNN
from torchvision.models.detection.roi_heads import RoIHeads, fastrcnn_loss, maskrcnn_inference
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform, resize_boxes
from torchvision.ops import MultiScaleRoIAlign, roi_align
from torchvision.ops.misc import FrozenBatchNorm2d
# MultiScaleRoIAlign's own steps, so GatherRoIAlign keeps its levels and scales exactly.
from torchvision.ops.poolers import _convert_to_roi_format, _filter_input, _setup_scales

from ..data.loading import POLYGON_KEYS, SAMPLE_SEED
from ..polygons import PIXEL_CENTRE, polygon_mask_targets, unpack_polygons
from ..precision import autocast

# Anchors per chunk in the RPN's matching (compared with the GT boxes near them only).
ANCHOR_CHUNK = 512
# Detections sent through the mask head at once at inference (memory: MASK_CHUNK x 256 x 28^2).
MASK_CHUNK = 64
# The feature that carries the input pixels to a PixelMaskPredictor (PixelFPN).
PIXELS = "pixels"
# GroupNorm groups of a PixelMaskPredictor's refining blocks (32 channels: 4 per group).
REFINE_GROUPS = 8
# The salt of each sampler's seed (a page's SAMPLE_SEED plus the salt).
RPN_SALT, ROI_SALT = 0, 1
# Each loss is a mean over what one sampler drew in the batch: (sampler, "positive" or "sampled").
LOSS_DENOMINATORS = {"loss_objectness": ("rpn", "sampled"), "loss_rpn_box_reg": ("rpn", "sampled"),
                     "loss_classifier": ("roi", "sampled"), "loss_box_reg": ("roi", "sampled"),
                     "loss_mask": ("roi", "positive")}


class SeededSampler(BalancedPositiveNegativeSampler):
    """torchvision's balanced positive/negative sampler, drawing each page's sample from its
    own generator when the targets carry a `sample_seed` (training pages do): which anchors
    and proposals a page contributes then depends on (seed, epoch, page) only, not on the
    batch it is in, the process it runs in or the global RNG. Without seeds: stock sampling.

    Records what it drew (`drawn`: positives, all) for loss_denominators.
    """

    seeds: list[int] | None = None
    drawn: torch.Tensor | None = None

    def __call__(self, matched_idxs: list[torch.Tensor]):
        if self.seeds is None:
            pos, neg = super().__call__(matched_idxs)
        else:
            pos, neg = [], []
            for labels, seed in zip(matched_idxs, self.seeds):
                generator = torch.Generator().manual_seed(seed)
                positive = torch.where(labels >= 1)[0]
                negative = torch.where(labels == 0)[0]
                num_pos = min(positive.numel(), int(self.batch_size_per_image * self.positive_fraction))
                num_neg = min(negative.numel(), self.batch_size_per_image - num_pos)
                chosen_pos = positive[torch.randperm(positive.numel(), generator=generator)[:num_pos].to(labels.device)]
                chosen_neg = negative[torch.randperm(negative.numel(), generator=generator)[:num_neg].to(labels.device)]
                pos.append(torch.zeros_like(labels, dtype=torch.uint8).index_fill_(0, chosen_pos, 1))
                neg.append(torch.zeros_like(labels, dtype=torch.uint8).index_fill_(0, chosen_neg, 1))
        positives = sum(p.sum() for p in pos)
        self.drawn = torch.stack([positives, positives + sum(n.sum() for n in neg)]).float()
        return pos, neg

    def seed_from(self, targets: list[dict] | None, salt: int) -> None:
        """Seed the next draw from the targets' sample seeds (stock sampling when absent)."""
        if targets and all(SAMPLE_SEED in t for t in targets):
            self.seeds = [(int(t[SAMPLE_SEED]) + salt) % 2**63 for t in targets]
        else:
            self.seeds = None


def loss_denominators(model: nn.Module) -> dict[str, torch.Tensor]:
    """How many samples each loss of the last training forward averaged over (a 0-d tensor
    per loss name): multi-process training weighs each process's losses by these so that the
    averaged gradients equal one process's over the whole batch."""
    samplers = {"rpn": model.rpn.fg_bg_sampler, "roi": model.roi_heads.fg_bg_sampler}
    return {name: samplers[which].drawn[0 if kind == "positive" else 1]
            for name, (which, kind) in LOSS_DENOMINATORS.items()}


def polygon_mask_loss(mask_logits: torch.Tensor, proposals: list[torch.Tensor], targets: list[dict],
                      matched_idxs: list[torch.Tensor], image_shapes: list[tuple[int, int]],
                      frame_offset: float = PIXEL_CENTRE) -> torch.Tensor:
    """Mask R-CNN mask loss with targets rasterised from polygons inside each positive proposal
    (moved by `frame_offset`: polygon_mask_targets)."""
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
    return F.binary_cross_entropy_with_logits(logits, targets_t)


class PolygonRoIHeads(RoIHeads):
    """RoIHeads whose mask loss reads polygon targets (`polygon_points`, `polygon_lengths`,
    `image_size`) instead of full-image masks. Targets with `masks` take the stock path.
    `mask_frame_offset`: where each mask lies against its box (polygon_mask_targets)."""

    def __init__(self, *args, mask_frame_offset: float = PIXEL_CENTRE, **kwargs):
        super().__init__(*args, **kwargs)
        self.fg_bg_sampler = SeededSampler(self.fg_bg_sampler.batch_size_per_image,
                                           self.fg_bg_sampler.positive_fraction)
        self.mask_frame_offset = mask_frame_offset

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
        features = float32_features(features)
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
                                      self.mask_frame_offset)
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
        dense page its activations for 2,000 detections at once take gigabytes."""
        box_features = self.box_head(self.box_roi_pool(features, proposals, image_shapes))
        class_logits, box_regression = (t.float() for t in self.box_predictor(box_features))
        boxes, scores, labels = self.postprocess_detections(class_logits, box_regression, proposals, image_shapes)
        results = [{"boxes": b, "labels": lab, "scores": sc} for b, sc, lab in zip(boxes, scores, labels)]
        for i, result in enumerate(results):
            chunks = []
            for start in range(0, len(result["boxes"]), MASK_CHUNK):
                chunk = result["boxes"][start:start + MASK_CHUNK]
                # MultiScaleRoIAlign reads the image index from the list position.
                per_image = [chunk if j == i else chunk[:0] for j in range(len(results))]
                logits = self.mask_logits(features, per_image, image_shapes)
                chunks.append(maskrcnn_inference(logits, [result["labels"][start:start + MASK_CHUNK]])[0])
            size = 2 * self.mask_roi_pool.output_size[0]  # the predictor's deconvolution doubles it
            result["masks"] = torch.cat(chunks) if chunks else result["boxes"].new_zeros((0, 1, size, size))
        return results


def roi_align_taps(rois: torch.Tensor, spatial_scale: float, height: int, width: int,
                   output_size: tuple[int, int], sampling_ratio: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each output bin of roi_align (aligned=False) reads a feature map of HEIGHT x WIDTH
    and with what weight: (index, weight), each (rois x bins, sampling_ratio² x 4 corners).
    index counts pixels over the batch (image, y, x). The sample points, the clamping at the
    borders and the bilinear weights are those of torchvision's CPU kernel
    (roi_align_common.h), in the same float32 operations; samples outside the map weigh 0."""
    (bins_h, bins_w), grid = output_size, sampling_ratio
    start_w, start_h = rois[:, 1] * spatial_scale, rois[:, 2] * spatial_scale
    roi_w = (rois[:, 3] * spatial_scale - start_w).clamp(min=1.0)
    roi_h = (rois[:, 4] * spatial_scale - start_h).clamp(min=1.0)

    def axis(start, roi_size, bins, size):
        """Each bin's sample points along one axis: low/high pixel and their weights, (R, bins, grid)."""
        bin_size = (roi_size / bins)[:, None, None]
        steps = torch.arange(bins, dtype=rois.dtype, device=rois.device)[None, :, None]
        offsets = (torch.arange(grid, dtype=rois.dtype, device=rois.device) + 0.5)[None, None, :]
        pos = start[:, None, None] + steps * bin_size + offsets * bin_size / grid
        outside = (pos < -1.0) | (pos > size)
        pos = pos.clamp(min=0.0)
        low = pos.long()
        last = low >= size - 1
        low = low.clamp(max=size - 1)
        high = torch.where(last, low, low + 1)
        frac = torch.where(last, 0.0, pos - low)
        return low, high, 1.0 - frac, frac, outside

    y_low, y_high, y_w0, y_w1, y_out = (t[:, :, :, None, None] for t in axis(start_h, roi_h, bins_h, height))
    x_low, x_high, x_w0, x_w1, x_out = (t[:, None, None, :, :] for t in axis(start_w, roi_w, bins_w, width))
    image = rois[:, 0].long()[:, None, None, None, None] * (height * width)
    rows_low, rows_high = image + y_low * width, image + y_high * width
    # (R, bin y, sample y, bin x, sample x, corner), corners in the kernel's order
    index = torch.stack([rows_low + x_low, rows_low + x_high, rows_high + x_low, rows_high + x_high], -1)
    weight = torch.stack([y_w0 * x_w0, y_w0 * x_w1, y_w1 * x_w0, y_w1 * x_w1], -1)
    weight = weight.masked_fill((y_out | x_out)[..., None], 0.0)
    taps = grid * grid * 4
    return (index.transpose(2, 3).reshape(-1, taps), weight.transpose(2, 3).reshape(-1, taps))


def gather_roi_align(features: torch.Tensor, rois: torch.Tensor, output_size: tuple[int, int],
                     spatial_scale: float, sampling_ratio: int) -> torch.Tensor:
    """roi_align (aligned=False, as MultiScaleRoIAlign) in float32. On a CPU, one weighted
    gather of channel vectors (embedding_bag over the channels-last feature map, rows
    `roi_align_taps`): all channels of a sample point at once and on every core, where
    torchvision's CPU kernel recomputes each point per channel on one core, and its backward
    scatters per channel too (a third of a 256² training step). The same values up to the
    order of float additions. On other devices, or with an adaptive sampling ratio, the op itself."""
    features, rois = features.float(), rois.float()  # its kernels are float32 (autocast casts so too)
    if features.device.type != "cpu" or sampling_ratio <= 0:
        return roi_align(features, rois, output_size, spatial_scale, sampling_ratio)
    n, channels, height, width = features.shape
    index, weight = roi_align_taps(rois, spatial_scale, height, width, tuple(output_size), sampling_ratio)
    table = features.permute(0, 2, 3, 1).reshape(n * height * width, channels)  # a view when channels-last
    pooled = F.embedding_bag(index, table, per_sample_weights=weight / (sampling_ratio * sampling_ratio), mode="sum")
    return pooled.view(len(rois), *output_size, channels).permute(0, 3, 1, 2)


class GatherRoIAlign(MultiScaleRoIAlign):
    """MultiScaleRoIAlign whose per-level pooling is gather_roi_align: the same levels, scales
    and outputs (channels-last, as the heads' convolutions read them)."""

    def forward(self, x, boxes, image_shapes):
        features = _filter_input(x, self.featmap_names)
        if self.scales is None or self.map_levels is None:
            self.scales, self.map_levels = _setup_scales(features, image_shapes, self.canonical_scale,
                                                         self.canonical_level)
        rois = _convert_to_roi_format(boxes)
        if len(features) == 1:
            return gather_roi_align(features[0], rois, self.output_size, self.scales[0], self.sampling_ratio)
        levels = self.map_levels(boxes)
        channels = features[0].shape[1]
        result = rois.new_zeros((len(rois), *self.output_size, channels), dtype=torch.float32).permute(0, 3, 1, 2)
        for level, (feature, scale) in enumerate(zip(features, self.scales)):
            in_level = torch.where(levels == level)[0]
            result[in_level] = gather_roi_align(feature, rois[in_level], self.output_size, scale,
                                                self.sampling_ratio)
        return result


def float32_features(features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The feature maps RoI pooling reads, in float32, cast once per forward: roi_align runs in
    float32 under autocast (torchvision's CPU kernel has no bfloat16), and each level it is
    given would otherwise be cast on every call (once per mask chunk, 4 levels each). On a CPU
    a no-op outside autocast; elsewhere, where torchvision's roi_align reads NCHW, the
    channels-last maps are also reordered once."""

    def cast(v: torch.Tensor) -> torch.Tensor:
        if not v.is_floating_point():
            return v
        return v.float() if v.device.type == "cpu" else v.float().contiguous()

    return {k: cast(v) for k, v in features.items()}


_RECOMPUTE = object()  # FrozenBNConv2d's saved weight, recomputed in backward


class FrozenBNConv2d(nn.Conv2d):
    """A convolution and the FrozenBatchNorm2d after it, computed as one convolution whose
    weight and bias are scaled by the norm (weight * scale, shift): the same function, one
    pass over the feature map instead of three. The norm's buffers stay in the norm (state
    dicts unchanged) and are read on every call, so loading or moving the model is seen;
    gradients reach the weight through the scaling, and in training the scaled weight the
    convolution's backward needs is recomputed then instead of kept from forward (a copy of
    every trainable weight less at the peak). Under bf16 autocast this also keeps the
    backbone in bfloat16: FrozenBatchNorm2d's float32 scale promotes its output to float32."""

    @classmethod
    def folding(cls, conv: nn.Conv2d, norm: "FoldedFrozenBatchNorm2d") -> "FrozenBNConv2d":
        """CONV, holding its own parameters (no copy), applying NORM (the module that follows
        it and holds the norm's buffers)."""
        folded = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                     conv.groups, conv.bias is not None, conv.padding_mode, device="meta")  # no fill drawn
        folded.weight, folded.bias = conv.weight, conv.bias
        folded.frozen_norm = (norm,)  # a tuple: not registered as a child, so no second state-dict entry
        return folded

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm = self.frozen_norm[0]
        scale = norm.weight * (norm.running_var + norm.eps).rsqrt()
        shift = norm.bias - norm.running_mean * scale
        if self.bias is not None:
            shift = shift + self.bias * scale
        scale = scale.reshape(-1, 1, 1, 1)
        if not (torch.is_grad_enabled() and self.weight.requires_grad):
            return self._conv_forward(x, self.weight * scale, shift)
        # Training: the convolution's backward needs its (scaled) weight; recompute it then
        # rather than keep a copy of every trainable weight from forward to backward.
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else None

        def scaled() -> torch.Tensor:
            weight = self.weight * scale
            return weight if dtype is None else weight.to(dtype)  # the cast autocast would make

        weight = scaled()
        address = weight.data_ptr()  # the hooks must not hold the weight itself

        with torch.autograd.graph.saved_tensors_hooks(
                lambda t: _RECOMPUTE if t.data_ptr() == address and t.shape == self.weight.shape else t,
                lambda t: scaled().detach() if t is _RECOMPUTE else t):
            return self._conv_forward(x, weight, shift)


class FoldedFrozenBatchNorm2d(FrozenBatchNorm2d):
    """A FrozenBatchNorm2d whose FrozenBNConv2d applies it: passes its input through."""

    @classmethod
    def taking_over(cls, norm: FrozenBatchNorm2d) -> "FoldedFrozenBatchNorm2d":
        """A folded norm holding NORM's own buffers (no copy)."""
        folded = cls(norm.weight.shape[0], eps=norm.eps)
        for name in ("weight", "bias", "running_mean", "running_var"):
            setattr(folded, name, getattr(norm, name))
        return folded

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def frozen_norm_pairs(module: nn.Module):
    """(parent, convolution's name, its norm's name) for each convolution followed by a
    FrozenBatchNorm2d in torchvision's ResNets: `convN` / `bnN` of the stem and of each block,
    and a downsample's Sequential(conv, norm)."""
    for parent in module.modules():
        children = dict(parent.named_children())
        for name, conv in children.items():
            norm_name = "bn" + name[4:] if name.startswith("conv") else ""
            if isinstance(parent, nn.Sequential) and name.isdigit():
                norm_name = str(int(name) + 1)
            if type(conv) is nn.Conv2d and type(children.get(norm_name)) is FrozenBatchNorm2d:
                yield parent, name, norm_name


def fold_frozen_norms(module: nn.Module) -> nn.Module:
    """Each FrozenBatchNorm2d of MODULE applied by the convolution before it: both replaced by
    a FrozenBNConv2d and a FoldedFrozenBatchNorm2d holding the same parameters and buffers
    under the same names (state dicts unchanged)."""
    for parent, conv_name, norm_name in list(frozen_norm_pairs(module)):
        norm = FoldedFrozenBatchNorm2d.taking_over(getattr(parent, norm_name))
        setattr(parent, norm_name, norm)
        setattr(parent, conv_name, FrozenBNConv2d.folding(getattr(parent, conv_name), norm))
    return module


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
        x = F.relu(self.conv5_mask(x))
        size = x.shape[-1]
        crops = roi_align(pixels, boxes, (size, size), spatial_scale=1.0, sampling_ratio=2, aligned=self.aligned)
        return self.mask_fcn_logits(self.pixel_refine(torch.cat([x, crops.to(x.dtype)], 1)))


def _refine_block(in_channels: int, out_channels: int, dilation: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, padding=dilation, dilation=dilation),
                         nn.GroupNorm(REFINE_GROUPS, out_channels), nn.ReLU(inplace=True))


class PixelFPN(BackboneWithFPN):
    """BackboneWithFPN that also hands on its input (the normalised, batched images) as the
    feature PIXELS, for a PixelMaskPredictor; RoI pooling reads only its named levels."""

    def forward(self, x: torch.Tensor):
        features = super().forward(x)
        features[PIXELS] = x
        return features


class BandedMatchingRPN(RegionProposalNetwork):
    """RPN whose anchor-to-GT matching computes IoU only where boxes can overlap.

    Stock matching builds a G x A IoU matrix (and box_iou's G x A x 2 intermediates): on a
    1024x1024 page with 1,700 characters and 262k anchors that is 445M pairs, gigabytes and
    most of a training step. Almost all of those pairs are zero: a glyph overlaps only the
    anchors around it. Anchors are sorted into compact chunks (same height, nearby rows) and
    each chunk is compared only with the GT boxes that touch its extent; the matches are
    exactly the stock ones (incl. low-quality matches and their ties).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fg_bg_sampler = SeededSampler(self.fg_bg_sampler.batch_size_per_image,
                                           self.fg_bg_sampler.positive_fraction)

    def forward(self, images, features, targets=None):
        self.fg_bg_sampler.seed_from(targets, RPN_SALT)
        # The RPN has one anchor size per FPN level: the input pixels are not a level.
        return super().forward(images, {k: v for k, v in features.items() if k != PIXELS}, targets)

    def assign_targets_to_anchors(self, anchors, targets):
        labels, matched_gt_boxes = [], []
        for anchors_per_image, target in zip(anchors, targets):
            gt_boxes = target["boxes"]
            if gt_boxes.numel() == 0:  # an image without characters: every anchor is background (as stock)
                matched_gt_boxes.append(torch.zeros(anchors_per_image.shape, dtype=torch.float32,
                                                    device=anchors_per_image.device))
                labels.append(torch.zeros(anchors_per_image.shape[0], dtype=torch.float32,
                                          device=anchors_per_image.device))
                continue
            matched_idxs = self._match(gt_boxes, anchors_per_image)
            matched_gt_boxes.append(gt_boxes[matched_idxs.clamp(min=0)])
            labels_per_image = (matched_idxs >= 0).to(dtype=torch.float32)
            labels_per_image[matched_idxs == self.proposal_matcher.BELOW_LOW_THRESHOLD] = 0.0
            labels_per_image[matched_idxs == self.proposal_matcher.BETWEEN_THRESHOLDS] = -1.0
            labels.append(labels_per_image)
        return labels, matched_gt_boxes

    def _match(self, gt_boxes: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
        """torchvision's Matcher over overlapping (GT, anchor-chunk) pairs; same result as the full matrix."""
        matcher = self.proposal_matcher
        n = anchors.shape[0]
        # Anchors that overlap no GT keep value 0 (below any threshold), as in the full matrix.
        matched_vals = anchors.new_zeros(n)
        matches = torch.zeros(n, dtype=torch.int64, device=anchors.device)
        best_per_gt = gt_boxes.new_zeros(gt_boxes.shape[0])
        pairs = list(overlapping_chunks(gt_boxes, anchors, ANCHOR_CHUNK))
        for anchor_idx, gt_idx in pairs:
            quality = self.box_similarity(gt_boxes[gt_idx], anchors[anchor_idx])
            vals, idx = quality.max(dim=0)
            matched_vals[anchor_idx], matches[anchor_idx] = vals, gt_idx[idx]
            best_per_gt[gt_idx] = torch.maximum(best_per_gt[gt_idx], quality.max(dim=1).values)
        if matcher.allow_low_quality_matches and bool((best_per_gt == 0).any()):
            # A GT that overlaps no anchor at all: stock then "matches" it to every zero-IoU
            # anchor. Rare (a box off the anchor grid); reproduce it with the full matrix.
            return matcher(self.box_similarity(gt_boxes, anchors))
        all_matches = matches.clone()
        below = matched_vals < matcher.low_threshold
        between = (matched_vals >= matcher.low_threshold) & (matched_vals < matcher.high_threshold)
        matches[below] = matcher.BELOW_LOW_THRESHOLD
        matches[between] = matcher.BETWEEN_THRESHOLDS
        if matcher.allow_low_quality_matches:
            # Each GT keeps its best anchors (ties included), even below the threshold.
            for anchor_idx, gt_idx in pairs:
                quality = self.box_similarity(gt_boxes[gt_idx], anchors[anchor_idx])
                update = anchor_idx[torch.where(quality == best_per_gt[gt_idx, None])[1]]
                matches[update] = all_matches[update]
        return matches


def overlapping_chunks(boxes: torch.Tensor, anchors: torch.Tensor, chunk: int):
    """Yield (anchor indices, indices of the boxes that touch those anchors' extent).

    Anchors are ordered by rounded height, then top edge, so a chunk is a band of one
    anchor size and its extent is tight; a box outside the extent overlaps none of them.
    """
    order = torch.argsort(anchors[:, 1], stable=True)
    heights = torch.round(anchors[order, 3] - anchors[order, 1])
    order = order[torch.argsort(heights, stable=True)]
    for start in range(0, anchors.shape[0], chunk):
        anchor_idx = order[start:start + chunk]
        part = anchors[anchor_idx]
        x1, y1 = part[:, 0].min(), part[:, 1].min()
        x2, y2 = part[:, 2].max(), part[:, 3].max()
        near = (boxes[:, 0] <= x2) & (boxes[:, 2] >= x1) & (boxes[:, 1] <= y2) & (boxes[:, 3] >= y1)
        box_idx = near.nonzero().squeeze(1)
        if box_idx.numel():
            yield anchor_idx, box_idx


class PasteFreeTransform(GeneralizedRCNNTransform):
    """Leaves masks box-sized at inference (`box_masks`, N x 28 x 28 probabilities, each
    covering its `mask_frames` rectangle of the page) instead of pasting each into a
    full-image tensor (build_model(polygon_native=False) pastes).

    `page_scales` (training, inference): a factor > 0 resizes each image by that factor of its
    own size, not its short side to min_size; max_size still caps the long side.
    """

    def __init__(self, *args, page_scales: tuple[float, float] = (0.0, 0.0),
                 mask_frame_offset: float = PIXEL_CENTRE, **kwargs):
        super().__init__(*args, **kwargs)
        self.page_scales = page_scales
        self.mask_frame_offset = mask_frame_offset

    def resize(self, image, target=None):
        scale = self.page_scales[0] if self.training else self.page_scales[1]
        if not scale:
            return super().resize(image, target)
        # torchvision's resize with this image's own short side times `scale` as the target.
        min_size = self.min_size
        self.min_size = (max(1, round(min(image.shape[-2:]) * scale)),)
        try:
            return super().resize(image, target)
        finally:
            self.min_size = min_size

    def postprocess(self, result, image_shapes, original_image_sizes):
        if self.training:
            return super().postprocess(result, image_shapes, original_image_sizes)
        for pred, im_s, o_im_s in zip(result, image_shapes, original_image_sizes):
            boxes = pred["boxes"]
            pred["boxes"] = resize_boxes(boxes, im_s, o_im_s)
            if "masks" in pred:
                pred["box_masks"] = pred.pop("masks")[:, 0]
                # The rectangle of the page each box mask covers, in the polygons' convention:
                # the box moved by the frame offset (of the resized page) its masks were
                # trained with (polygon_mask_targets).
                pred["mask_frames"] = resize_boxes(boxes + self.mask_frame_offset, im_s, o_im_s)
        return result


class PolygonMaskRCNN(MaskRCNN):
    """charseg's Mask R-CNN: torchvision's, assembled from the polygon-native parts above
    (model.build_model builds them), whose forward runs under autocast at `precision`
    (precision.py: fp32, bf16, fp16). What must stay exact stays float32: anchors
    (Float32Anchors), the RPN's and the box predictor's outputs before box decoding, mask
    logits, every loss. Its state dict is stock torchvision's."""

    precision = "fp32"

    def __init__(self, backbone: nn.Module, rpn: RegionProposalNetwork, roi_heads: RoIHeads,
                 transform: GeneralizedRCNNTransform):
        # MaskRCNN's and FasterRCNN's constructors build torchvision's own parts from arguments;
        # these parts are built by the caller, so only GeneralizedRCNN's is run.
        GeneralizedRCNN.__init__(self, backbone, rpn, roi_heads, transform)

    def forward(self, images, targets=None):
        device_type = images[0].device.type if len(images) else "cpu"
        with autocast(self.precision, device_type):
            return super().forward(images, targets)


class Float32Anchors(AnchorGenerator):
    """Anchors in float32 whatever the features' dtype (torchvision takes it from them: in
    bfloat16 a 1024 px page's anchor corners would be off by up to 4 px)."""

    def forward(self, image_list, feature_maps):
        shapes = [f.new_empty((0, 0, *f.shape[-2:]), dtype=torch.float32) for f in feature_maps]
        return super().forward(image_list, shapes)

    def set_cell_anchors(self, dtype: torch.dtype, device: torch.device):
        # A model built on the meta device for a checkpoint to fill (inference.load_model_for_inference)
        # holds meta cell anchors: they are no parameter the load sets, so make them now.
        if any(anchors.is_meta for anchors in self.cell_anchors):
            self.cell_anchors = [self.generate_anchors(size, ratios)
                                 for size, ratios in zip(self.sizes, self.aspect_ratios)]
        super().set_cell_anchors(dtype, device)


class Float32RPNHead(RPNHead):
    """torchvision's RPN head whose objectness and box deltas come out in float32 (they are
    decoded into boxes)."""

    def forward(self, x):
        logits, deltas = super().forward(x)
        return [t.float() for t in logits], [t.float() for t in deltas]
