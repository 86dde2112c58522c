"""Where a detected character's outline runs: along its mask, or along the ink's edge.

The mask head draws each character's mask at 28x28 over its box, and its contour at 0.5
(polygons.box_mask_to_polygon) is right to about a pixel: enough for IoU 0.5, not for 0.75 on a
glyph of 10-15 px whose strokes are 1-2 px wide. The page itself shows where the ink is. With
the `ink` rule each outline is snapped to the ink: inside the box (grown by a pixel), the
pixels darker than a level between the paper's colour and the ink's (measured around and
inside the mask, along the colour difference between them, so coloured ink and light-on-dark
text work alike) are outlined on their pixels' edges, as the dataset format outlines a glyph
(its outer outline, holes filled). Of a few levels, the one whose outline agrees best with the
mask's is kept, and only when it agrees at IoU AGREEMENT at least: where the ink cannot be told
from the paper (faint, textured, touching a neighbour) the mask's own outline stays.
The `learned` rule outlines the ink at more levels (CHOSEN_LEVELS) and keeps the one a small
network scores highest (choose_level: from features of each level's outline, such as its
agreement with the mask, its area, the ink's gradient along it and whether the level splits the
glyph, beside features of the window, such as its size, blur and noise). The chooser's weights were
learned against annotated pages of the training generator (ink_chooser_weights.py, written by
bench/outline_chooser.py); the outline it picks must agree with the mask at AGREEMENT too.
(docs/FROM_SCRATCH.md measures both; ModelSpec.outline says which rule a model uses.)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np

from ..polygons import edge_outlines, filled, flat_polygon, polygons_to_masks
from . import ink_chooser_weights

# Thresholds tried, as a share of the way from the paper's level to the ink's.
INK_LEVELS = (0.3, 0.4, 0.5, 0.6, 0.7)
AGREEMENT = 0.5  # least IoU between the ink's outline and the mask's for the ink's to be kept
INK_PERCENTILE = 90  # the ink's level: this percentile of the mask's pixels (the paper's: its ring's median)
MIN_CONTRAST = 8.0  # RGB distance (of 255) between the mask's mean colour and the paper's, below which no ink is seen
WINDOW = 2  # px around the box read for the paper; the ink's outline stays within 1 px of the box
CHOSEN_LEVELS = ink_chooser_weights.LEVELS  # the learned rule's levels, as its weights were learned
# The chooser: features (level_features, then window_features) -> tanh(x @ HIDDEN + HIDDEN_BIAS) @ OUTPUT
_HIDDEN = np.asarray(ink_chooser_weights.HIDDEN, np.float32)
_HIDDEN_BIAS = np.asarray(ink_chooser_weights.HIDDEN_BIAS, np.float32)
_OUTPUT = np.asarray(ink_chooser_weights.OUTPUT, np.float32)


@dataclass
class InkWindow:
    """The page around one detection, as snap_to_ink reads it: `origin` (left, top) of the
    window on the page, the mask's outline rasterised in it (`mask`), and the ink's outline at
    each of the levels (`candidates`: level, binary of the window's size). The fields after
    those are what choose_level reads; ink_window fills them only when asked (`parts`)."""

    origin: tuple[int, int]
    mask: np.ndarray
    candidates: list[tuple[float, np.ndarray]]
    coverage: np.ndarray | None = None  # the ink's share at each pixel: the paper's level 0, the ink's 1
    ring: np.ndarray | None = None  # the paper around the mask
    contrast: float = 0.0  # RGB distance (of 255) between the paper's level and the ink's
    part_shares: list[float] = field(default_factory=list)  # per candidate: its largest part's share of the ink
    part_areas: list[int] = field(default_factory=list)  # per candidate: that part's pixels, holes not filled
    gradient: np.ndarray | None = None  # the gradient's magnitude of `coverage`


def snap_to_ink(rgb: np.ndarray, box: list[float], polygon: list[float], learned: bool = False) -> list[float]:
    """POLYGON (a flat outline from the mask of a character detected in BOX, x1 y1 x2 y2) moved
    onto the ink's edge on RGB (H x W x 3 uint8, the page), or POLYGON itself where the ink
    does not agree with it; LEARNED: at the level choose_level picks (module docstring)."""
    if learned:
        window = ink_window(rgb, box, polygon, CHOSEN_LEVELS, parts=True)
        best = choose_level(window) if window is not None else None
    else:
        window = ink_window(rgb, box, polygon)
        best = most_agreeing(window) if window is not None else None
    if best is None:
        return polygon
    return window_outline(best, window) or polygon


def most_agreeing(window: InkWindow) -> np.ndarray | None:
    """The ink's outline (of WINDOW's candidates) that agrees best with the mask, at AGREEMENT
    at least; None if none does."""
    best, agreement = None, AGREEMENT
    for _, ink in window.candidates:
        overlap = iou(ink, window.mask)
        if overlap >= agreement:
            best, agreement = ink, overlap
    return best


def choose_level(window: InkWindow) -> np.ndarray | None:
    """The ink's outline (of WINDOW's candidates, one per CHOSEN_LEVELS) that the learned chooser
    scores highest (chooser_scores). None if it agrees with the mask at less than AGREEMENT."""
    levels = level_features(window)
    best = int(np.argmax(chooser_scores(chooser_inputs(levels, window_features(window)))))
    return window.candidates[best][1] if levels[best, 2] >= AGREEMENT else None


def chooser_inputs(levels: np.ndarray, window: np.ndarray) -> np.ndarray:
    """The chooser's input per candidate: its LEVELS row (level_features) beside the WINDOW's features."""
    return np.concatenate([levels, np.broadcast_to(window, (len(levels), len(window)))], axis=1)


def chooser_scores(inputs: np.ndarray, hidden: np.ndarray = _HIDDEN, hidden_bias: np.ndarray = _HIDDEN_BIAS,
                   output: np.ndarray = _OUTPUT) -> np.ndarray:
    """The learned chooser's score of each candidate (a row of INPUTS, chooser_inputs): one hidden
    layer of tanh units, weights in ink_chooser_weights.py (their standardisation folded in), or
    the ones given (bench/outline_chooser.py scores a fit with them)."""
    return np.tanh(inputs @ hidden + hidden_bias) @ output


def window_features(window: InkWindow) -> np.ndarray:
    """What the chooser knows of the window: its height (log px), the paper's noise and the mean
    gradient along the mask's outline (both in the ink's share), the mask's mean share of ink,
    and the contrast between paper and ink."""
    mask, coverage = window.mask, window.coverage
    [edge_gradient] = _mean_along_outlines(mask[None], window.gradient)
    return np.array([np.log(mask.shape[0]), np.std(coverage[window.ring]), edge_gradient, coverage[mask].mean(),
                     window.contrast], np.float32)


def level_features(window: InkWindow) -> np.ndarray:
    """Each candidate's features (a row per level): the level and its square, its IoU with the
    mask, its area against the mask's (log), the mean gradient of the ink's share along its
    outline, the share of the level's ink (within the box) that its largest part holds, and
    the share of its area that is filled holes."""
    levels = np.array([level for level, _ in window.candidates], np.float64)
    inks = np.stack([ink for _, ink in window.candidates])  # every level at once: a few numpy calls, not 13 each
    areas = inks.sum((1, 2))
    unions = (inks | window.mask).sum((1, 2))
    agreement = np.where(unions > 0, (inks & window.mask).sum((1, 2)) / np.maximum(unions, 1), 0.0)
    size = np.log(np.maximum(areas, 1) / max(int(window.mask.sum()), 1))
    holes = (areas - np.asarray(window.part_areas)) / np.maximum(areas, 1)
    return np.stack([levels, levels * levels, agreement, size, _mean_along_outlines(inks, window.gradient),
                     np.asarray(window.part_shares), holes], axis=1).astype(np.float32)


def ink_window(rgb: np.ndarray, box: list[float], polygon: list[float], levels: tuple[float, ...] = INK_LEVELS,
               parts: bool = False) -> InkWindow | None:
    """The window of RGB around BOX with POLYGON's mask and the ink's outline at each of LEVELS
    (filled, largest part, within the box grown by a pixel); PARTS: also what each level's
    largest part leaves out and fills (for choose_level). None where no ink can be told from the
    paper there (too small, no ring of paper, too little contrast)."""
    height, width = rgb.shape[:2]
    x1, y1, x2, y2 = box
    left, top = max(int(np.floor(x1)) - WINDOW, 0), max(int(np.floor(y1)) - WINDOW, 0)
    right, bottom = min(int(np.ceil(x2)) + WINDOW, width), min(int(np.ceil(y2)) + WINDOW, height)
    if len(polygon) < 6 or right - left < 3 or bottom - top < 3:
        return None
    crop = rgb[top:bottom, left:right].astype(np.float32)
    shifted = np.asarray(polygon, dtype=np.float64).reshape(-1, 2) - (left, top)
    mask = polygons_to_masks([shifted], bottom - top, right - left)[0].numpy().astype(bool)
    ring = ~cv2.dilate(mask.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    if mask.sum() < 3 or ring.sum() < 4:
        return None
    paper = np.median(crop[ring], axis=0)
    towards_ink = crop[mask].mean(axis=0) - paper
    if np.linalg.norm(towards_ink) < MIN_CONTRAST:
        return None
    inkness = (crop - paper) @ (towards_ink / np.dot(towards_ink, towards_ink))  # paper 0, the mask's mean 1
    low, high = _rank(inkness[ring], 50), _rank(inkness[mask], INK_PERCENTILE)
    near = np.zeros_like(mask)  # the box grown by a pixel
    near[max(int(np.floor(y1)) - 1 - top, 0):int(np.ceil(y2)) + 1 - top,
         max(int(np.floor(x1)) - 1 - left, 0):int(np.ceil(x2)) + 1 - left] = True
    window = InkWindow(origin=(left, top), mask=mask, candidates=[])
    if parts:
        window.ring, window.coverage = ring, (inkness - low) / max(high - low, 1e-6)
        window.contrast = float(np.linalg.norm(towards_ink)) / 255 * (high - low)
        window.gradient = _gradient(window.coverage)
    for level in levels:
        ink = (inkness > low + level * (high - low)) & near
        if parts:
            ink, share, area = _largest_part(ink)
            window.part_shares.append(share)
            window.part_areas.append(area)
            window.candidates.append((level, filled(ink)))
        else:
            window.candidates.append((level, _filled_largest_part(ink)))
    return window


def window_outline(binary: np.ndarray, window: InkWindow) -> list[float]:
    """BINARY's (a binary of WINDOW's size) first outer outline on the page, flat; [] if empty."""
    outlines = edge_outlines(binary)
    if not outlines:
        return []
    return flat_polygon(outlines[0] + np.array(window.origin, dtype=np.float32))


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two binaries of one shape (0 when both are empty)."""
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 0.0


def _rank(values: np.ndarray, percent: float) -> float:
    """The value at PERCENT of VALUES' ranks (the nearest rank: np.percentile's interpolation,
    a tenth of a millisecond a character, changes nothing here)."""
    k = round(percent / 100 * (len(values) - 1))
    return float(np.partition(values, k)[k])


def _largest_part(binary: np.ndarray) -> tuple[np.ndarray, float, int]:
    """The largest 8-connected part of BINARY (by pixels), its share of BINARY's pixels, and its pixels."""
    count, labels, stats, _ = cv2.connectedComponentsWithStats(binary.astype(np.uint8), connectivity=8)
    if count <= 2:
        return binary, 1.0, int(stats[1, cv2.CC_STAT_AREA]) if count == 2 else 0
    areas = stats[1:, cv2.CC_STAT_AREA]
    largest = int(np.argmax(areas))
    return labels == largest + 1, float(areas[largest] / areas.sum()), int(areas[largest])


def _mean_along_outlines(binaries: np.ndarray, values: np.ndarray) -> np.ndarray:
    """For each of BINARIES (N x H x W), the mean of VALUES (H x W) over its outline: its pixels
    with a pixel outside it among their eight neighbours (beyond the window's edge counts as
    inside, as cv2.erode has it); 0 where it has none."""
    count, height, width = binaries.shape
    padded = np.ones((count, height + 2, width + 2), bool)
    padded[:, 1:-1, 1:-1] = binaries
    inner = binaries.copy()
    for dy in range(3):
        for dx in range(3):
            inner &= padded[:, dy:dy + height, dx:dx + width]
    outline = binaries & ~inner
    count = outline.sum((1, 2))
    return np.where(count > 0, (outline * values.astype(np.float64)).sum((1, 2)) / np.maximum(count, 1), 0.0)


def _gradient(values: np.ndarray) -> np.ndarray:
    """The gradient's magnitude of VALUES (float32), by 3x3 Sobel filters."""
    values = values.astype(np.float32)
    return np.hypot(cv2.Sobel(values, cv2.CV_32F, 1, 0), cv2.Sobel(values, cv2.CV_32F, 0, 1))


def _filled_largest_part(binary: np.ndarray) -> np.ndarray:
    """The largest 8-connected part of BINARY with its holes filled (a glyph's outer outline
    encloses its counters, as the dataset's polygons do)."""
    filled = np.zeros(binary.shape, np.uint8)
    contours, _ = cv2.findContours(binary.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if contours:
        cv2.drawContours(filled, [max(contours, key=cv2.contourArea)], -1, 1, thickness=-1)
    return filled.astype(bool)
