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
(docs/FROM_SCRATCH.md measures it; ModelSpec.outline says which rule a model uses.)
"""

from __future__ import annotations

import cv2
import numpy as np

from ..polygons import edge_outlines, flat_polygon, polygons_to_masks

# Thresholds tried, as a share of the way from the paper's level to the ink's.
INK_LEVELS = (0.3, 0.4, 0.5, 0.6, 0.7)
AGREEMENT = 0.5  # least IoU between the ink's outline and the mask's for the ink's to be kept
INK_PERCENTILE = 90  # the ink's level: this percentile of the mask's pixels (the paper's: its ring's median)
MIN_CONTRAST = 8.0  # RGB distance (of 255) between the mask's mean colour and the paper's, below which no ink is seen
WINDOW = 2  # px around the box read for the paper; the ink's outline stays within 1 px of the box


def snap_to_ink(rgb: np.ndarray, box: list[float], polygon: list[float]) -> list[float]:
    """POLYGON (a flat outline from the mask of a character detected in BOX, x1 y1 x2 y2) moved
    onto the ink's edge on RGB (H x W x 3 uint8, the page), or POLYGON itself where the ink
    does not agree with it (module docstring)."""
    height, width = rgb.shape[:2]
    x1, y1, x2, y2 = box
    left, top = max(int(np.floor(x1)) - WINDOW, 0), max(int(np.floor(y1)) - WINDOW, 0)
    right, bottom = min(int(np.ceil(x2)) + WINDOW, width), min(int(np.ceil(y2)) + WINDOW, height)
    if len(polygon) < 6 or right - left < 3 or bottom - top < 3:
        return polygon
    crop = rgb[top:bottom, left:right].astype(np.float32)
    shifted = np.asarray(polygon, dtype=np.float64).reshape(-1, 2) - (left, top)
    mask = polygons_to_masks([shifted], bottom - top, right - left)[0].numpy().astype(bool)
    ring = ~cv2.dilate(mask.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    if mask.sum() < 3 or ring.sum() < 4:
        return polygon
    paper = np.median(crop[ring], axis=0)
    towards_ink = crop[mask].mean(axis=0) - paper
    if np.linalg.norm(towards_ink) < MIN_CONTRAST:
        return polygon
    inkness = (crop - paper) @ (towards_ink / np.dot(towards_ink, towards_ink))  # paper 0, the mask's mean 1
    low, high = _rank(inkness[ring], 50), _rank(inkness[mask], INK_PERCENTILE)
    near = np.zeros_like(mask)  # the box grown by a pixel
    near[max(int(np.floor(y1)) - 1 - top, 0):int(np.ceil(y2)) + 1 - top,
         max(int(np.floor(x1)) - 1 - left, 0):int(np.ceil(x2)) + 1 - left] = True
    best, agreement = None, AGREEMENT
    for level in INK_LEVELS:
        ink = _filled_largest_part((inkness > low + level * (high - low)) & near)
        union = (ink | mask).sum()
        overlap = (ink & mask).sum() / union if union else 0.0
        if overlap >= agreement:
            best, agreement = ink, overlap
    outlines = edge_outlines(best) if best is not None else []
    if not outlines:
        return polygon
    return flat_polygon(outlines[0] + np.array([left, top], dtype=np.float32))


def _rank(values: np.ndarray, percent: float) -> float:
    """The value at PERCENT of VALUES' ranks (the nearest rank: np.percentile's interpolation,
    a tenth of a millisecond a character, changes nothing here)."""
    k = round(percent / 100 * (len(values) - 1))
    return float(np.partition(values, k)[k])


def _filled_largest_part(binary: np.ndarray) -> np.ndarray:
    """The largest 8-connected part of BINARY with its holes filled (a glyph's outer outline
    encloses its counters, as the dataset's polygons do)."""
    filled = np.zeros(binary.shape, np.uint8)
    contours, _ = cv2.findContours(binary.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if contours:
        cv2.drawContours(filled, [max(contours, key=cv2.contourArea)], -1, 1, thickness=-1)
    return filled.astype(bool)
