"""Fit the RPN's anchor sizes to the characters of a dataset.

torchvision's anchors (32-512 px) are sized for COCO objects; characters at the model's
input are often 5-40 px, and a character whose best anchor has IoU < 0.7 gets no true RPN
positive (only torchvision's low-quality fallback). `--anchor-sizes auto` measures every
character box of the training set against candidate ladders of sizes (one size per FPN
level, doubling per level, as torchvision's) and keeps the ladder with the most characters
at IoU >= 0.7. The IoU is computed exactly against the anchor grid, without building it:
for a fixed anchor shape the best anchor is the grid cell nearest the box.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from torchvision.models.detection.anchor_utils import AnchorGenerator

from ..config import ANCHOR_LEVELS
from ..data.dataset import Sample
from ..polygons import polygon_boxes

POSITIVE_IOU = 0.7  # the RPN's fg_iou_thresh: an anchor at least this close is a true positive
# Smallest anchor of each candidate ladder: sqrt(2) steps from 4 to 64 px (a ladder doubles per level).
BASE_SIZES = (4, 6, 8, 11, 16, 23, 32, 45, 64)
# Below this height at the model's input, a stride-4 feature map can hardly outline a character.
SMALL_CHARACTER_PX = 8


@dataclass(frozen=True)
class AnchorFit:
    """The chosen ladder and how well it fits."""

    sizes: tuple[int, ...]
    positive_share: float  # characters with an anchor of IoU >= POSITIVE_IOU
    median_iou: float  # median over characters of the best anchor IoU
    median_height: float  # median character height at the model's input, px
    characters: int


def model_input_scale(height: int, width: int, min_size: int, max_size: int, page_scale: float = 0.0) -> float:
    """The resize factor of the model's transform for this image: torchvision's (short side
    to min_size), or `page_scale` of its own size when > 0; the long side at most max_size."""
    short = page_scale * min(height, width) if page_scale else min_size
    return min(short / min(height, width), max_size / max(height, width))


def character_boxes(samples: list[Sample], min_size: int, max_size: int,
                    page_scale: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Every character's box (N, 4: x1, y1, x2, y2) in the model's input frame, and the
    (N, 2: height, width) of its resized image."""
    boxes, shapes = [], []
    for sample in samples:
        scale = model_input_scale(sample.height, sample.width, min_size, max_size, page_scale)
        boxes.extend(polygon_boxes(sample.polygons) * scale)
        shapes.extend([(int(sample.height * scale), int(sample.width * scale))] * len(sample.polygons))
    return np.asarray(boxes, dtype=np.float64).reshape(-1, 4), np.asarray(shapes, dtype=np.int64).reshape(-1, 2)


def level_grids(shapes: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per FPN level P2-P6, the (N, 2) anchor strides and grid sizes (y, x) torchvision uses
    for images of these shapes: padded to multiples of 32, stride = padded size // grid size."""
    padded = -(-shapes // 32) * 32
    grids = [padded // 4, padded // 8, padded // 16, padded // 32]
    grids.append(-(-grids[-1] // 2))  # P6: max-pool of P5 with stride 2
    return [(padded // grid, grid) for grid in grids]


def _overlap(lo: np.ndarray, hi: np.ndarray, anchor_lo: float, anchor_hi: float, stride: np.ndarray,
             cells: np.ndarray) -> np.ndarray:
    """Largest 1-D overlap of [lo, hi] with [k*stride + anchor_lo, k*stride + anchor_hi], 0 <= k < cells."""
    k = np.floor(((lo + hi) - (anchor_lo + anchor_hi)) / 2 / stride)
    best = np.zeros_like(lo)
    for cell in (k, k + 1):  # the two grid cells around the box centre
        cell = np.clip(cell, 0, cells - 1)
        a_lo, a_hi = cell * stride + anchor_lo, cell * stride + anchor_hi
        best = np.maximum(best, np.clip(np.minimum(hi, a_hi) - np.maximum(lo, a_lo), 0, None))
    return best


def best_anchor_iou(boxes: np.ndarray, shapes: np.ndarray, sizes: tuple[int, ...],
                    ratios: tuple[float, ...]) -> np.ndarray:
    """Each box's best IoU with torchvision's anchors of these sizes (one per level) and ratios.

    shapes: (N, 2) height, width of each box's image at the model's input.
    """
    best = np.zeros(len(boxes))
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    generator = AnchorGenerator()
    for size, (stride, cells) in zip(sizes, level_grids(shapes)):
        for x1, y1, x2, y2 in generator.generate_anchors((size,), ratios).tolist():
            inter = (_overlap(boxes[:, 0], boxes[:, 2], x1, x2, stride[:, 1], cells[:, 1])
                     * _overlap(boxes[:, 1], boxes[:, 3], y1, y2, stride[:, 0], cells[:, 0]))
            best = np.maximum(best, inter / (area + (x2 - x1) * (y2 - y1) - inter))
    return best


def ladder(base: int, levels: int = ANCHOR_LEVELS) -> tuple[int, ...]:
    """Anchor sizes doubling per FPN level from `base`."""
    return tuple(base * 2 ** level for level in range(levels))


def fit_anchor_sizes(samples: list[Sample], min_size: int, max_size: int,
                     ratios: tuple[float, ...], page_scale: float = 0.0) -> AnchorFit:
    """The ladder of BASE_SIZES with the most characters at IoU >= POSITIVE_IOU (ties: higher
    median IoU), at the model's input (model_input_scale). Raises ValueError when the samples
    hold no character."""
    boxes, shapes = character_boxes(samples, min_size, max_size, page_scale)
    if not len(boxes):
        raise ValueError("no characters to fit anchor sizes to")
    fits = []
    for base in BASE_SIZES:
        iou = best_anchor_iou(boxes, shapes, ladder(base), ratios)
        fits.append(AnchorFit(ladder(base), float((iou >= POSITIVE_IOU).mean()), float(np.median(iou)),
                              float(np.median(boxes[:, 3] - boxes[:, 1])), len(boxes)))
    return max(fits, key=lambda fit: (fit.positive_share, fit.median_iou))

