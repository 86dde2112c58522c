"""Resolve the ModelSpec a run trains: from what the user asked (TrainConfig), the data and,
for resume and fine-tune, the source checkpoint's spec.

ModelSpec is the only home of the architecture. TrainConfig keeps the request (None = fit
to the data); `resolve_spec` turns it into a spec once, and everything downstream (model,
checkpoint, validation, tracking) reads the spec.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

from ..config import LIMITS, TrainConfig
from ..data.dataset import Sample
from .anchors import POSITIVE_IOU, SMALL_CHARACTER_PX, fit_anchor_sizes
from .build import ANCHOR_RATIOS, STOCK_ANCHOR_SIZES, ModelSpec, spec_for_weights

log = logging.getLogger("charseg")

# Limits left to fit: detections cover the densest image with a margin (never below
# MIN_DETECTIONS); the RPN keeps PROPOSALS_PER_DETECTION proposals per detection (never below
# torchvision's 2000 in training and 1000 at inference), as NMS and the score threshold drop many.
MIN_DETECTIONS = 500
DETECTION_MARGIN = 1.2
PROPOSALS_PER_DETECTION = 2
# A limit raised at inference (predict.detection_limit) also lets each FPN level offer NMS this
# many of its best anchors per detection: on a dense page most anchors of the finest level lie on
# characters, and cut at PROPOSALS_PER_DETECTION they left characters without a proposal
# (docs/DENSE_PAGES.md, "Proposals on a dense page").
PRE_NMS_PER_DETECTION = 4
MIN_PROPOSALS_TRAIN, MIN_PROPOSALS_TEST = 2000, 1000
# Input size, sampler and outline settings a fine-tune may change (given again); the rest of the
# architecture is the source's, which its weights need. Limits are fitted to the new data.
FINETUNE_CHANGEABLE = ("min_size", "max_size", "scale_train", "scale_test", "roi_samples", "mask_dice", "outline")
# Requests a fine-tune takes from the source's spec, as its weights were built for them.
FINETUNE_FIXED = ("backbone", "norm", "fpn_channels", "mask_pixels", "mask_head_convs", "mask_head_channels")
# px at the model's input: new runs outline each mask in its box grown by this
# (ModelSpec.mask_box_margin); measured on the demo's pages in docs/FROM_SCRATCH.md.
MASK_BOX_MARGIN = 1.0


def resolve_spec(config: TrainConfig, samples: list[Sample], train: list[Sample],
                 source: ModelSpec | None = None) -> ModelSpec:
    """The architecture of a run of `config.mode`.

    samples: every image of the run (limits cover the densest); train: the training images
    (anchor sizes fit their characters); source: the checkpoint's spec (resume, fine-tune).
    resume: the source spec unchanged. finetune: the source spec with FINETUNE_CHANGEABLE
    from `config` and the limits refitted. train: torchvision's layout for `config.weights`
    with the asked or fitted limits and anchor sizes.
    """
    if config.mode == "resume":
        return source
    most = max((len(s.polygons) for s in samples), default=0)
    fitted = {**fit_limits(config, most), "glyph_height": median_glyph_height(train),
              "mask_box_margin": MASK_BOX_MARGIN}
    if config.mode == "finetune":
        return dataclasses.replace(source, **{k: getattr(config, k) for k in FINETUNE_CHANGEABLE}, **fitted)
    sizes = config.anchor_sizes or choose_anchor_sizes(train, config.min_size, config.max_size, config.scale_train)
    return spec_for_weights(config.backbone, config.weights, min_size=config.min_size, max_size=config.max_size,
                            scale_train=config.scale_train, scale_test=config.scale_test,
                            roi_samples=config.roi_samples, anchor_sizes=tuple(sizes), norm=config.norm,
                            fpn_channels=config.fpn_channels, mask_pixels=config.mask_pixels,
                            mask_head_convs=config.mask_head_convs, mask_head_channels=config.mask_head_channels,
                            mask_dice=config.mask_dice, outline=config.outline, **fitted)


def median_glyph_height(train: list[Sample]) -> float:
    """The median height of the training characters, px, at their pages' own size (0.0: none)."""
    heights = [float(np.ptp(polygon[:, 1])) for sample in train for polygon in sample.polygons]
    return round(float(np.median(heights)), 2) if heights else 0.0


def fit_limits(config: TrainConfig, most_characters: int) -> dict[str, int]:
    """The LIMITS for an image of `most_characters`: those `config` gives, the rest fitted.
    Warns when a given detection limit is below the character count."""
    detections = config.detections_per_img or max(
        MIN_DETECTIONS, -(-int(most_characters * DETECTION_MARGIN) // 100) * 100)
    fitted = {"detections_per_img": detections,
              "rpn_proposals_train": max(MIN_PROPOSALS_TRAIN, PROPOSALS_PER_DETECTION * detections),
              "rpn_proposals_test": max(MIN_PROPOSALS_TEST, PROPOSALS_PER_DETECTION * detections)}
    limits = {k: getattr(config, k) or fitted[k] for k in LIMITS}
    chosen = [k for k in LIMITS if getattr(config, k) is None]
    if chosen:
        log.info("limits for up to %d characters per image: %s", most_characters,
                 ", ".join(f"{k} {limits[k]}" for k in chosen))
    if most_characters > limits["detections_per_img"]:
        log.warning("warning: an image holds %d characters but --detections-per-img is %d: raise it (or pass 0), "
                    "or detections and COCO maxDets cap below the true count", most_characters,
                    limits["detections_per_img"])
    return limits


def choose_anchor_sizes(train: list[Sample], min_size: int, max_size: int,
                        page_scale: float = 0.0) -> tuple[int, ...]:
    """`--anchor-sizes auto`: the ladder that fits the training characters best (anchors.py)."""
    if not any(sample.polygons for sample in train):
        log.warning("warning: no training characters to fit anchor sizes to; using torchvision's %s",
                    STOCK_ANCHOR_SIZES)
        return STOCK_ANCHOR_SIZES
    fit = fit_anchor_sizes(train, min_size, max_size, ANCHOR_RATIOS, page_scale)
    log.info("anchor sizes %s fitted to %d training characters: %.0f%% have an anchor of IoU >= %.1f "
             "(median best IoU %.2f)", ",".join(map(str, fit.sizes)), fit.characters, fit.positive_share * 100,
             POSITIVE_IOU, fit.median_iou)
    if fit.median_height < SMALL_CHARACTER_PX:
        option = "--scale-train" if page_scale else "--min-size"
        log.warning("warning: characters are %.1f px tall (median) at the model's input; raise %s so they "
                    "are at least %d px", fit.median_height, option, SMALL_CHARACTER_PX)
    return fit.sizes
