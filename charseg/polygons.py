"""Polygon geometry, shared by data, model heads, evaluation and inference.

A character's outline is a (K, 2) float32 array of x, y points in image coordinates, where
pixel i covers [i, i + 1]; on disk and in outputs it is the flat [x1, y1, x2, y2, ...] list.
This module turns outlines into boxes, areas, clipped outlines and masks (full-image or
inside a box, as pycocotools rasterises them), packs them into tensors that travel with a
target, and traces masks back into outlines. It knows nothing of models or files.
"""

from __future__ import annotations

import functools

import cv2
import numpy as np
import torch
from pycocotools import mask as mask_utils

# Target rasterisation is supersampled this much, then averaged: soft targets like the
# stock roi_align projection of a binary mask, without ever building that mask.
SUPERSAMPLE = 2
# Half a pixel between roi_align's (aligned=False) coordinates and the polygons' ones.
PIXEL_CENTRE = 0.5
# Box-sized masks are traced on a grid this much finer than the image's pixels.
TRACE_SCALE = 4
# A glyph's pixels are those its anti-aliased drawing covers at least this much (glyph_mask)...
INK_COVERAGE = 0.5
# ...down to this coverage where half coverage splits a stroke the font draws joined.
JOINED_COVERAGE = 0.15
COVERAGE_STEP = 0.05


def pack_polygons(polygons: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Polygons as two tensors that move to a device with the target: (P, 2) points, (N,) lengths."""
    if not polygons:
        return torch.zeros((0, 2), dtype=torch.float32), torch.zeros((0,), dtype=torch.int64)
    points = torch.from_numpy(np.concatenate(polygons).astype(np.float32))
    return points, torch.tensor([len(p) for p in polygons], dtype=torch.int64)


def unpack_polygons(points: torch.Tensor, lengths: torch.Tensor) -> list[np.ndarray]:
    """Undo `pack_polygons` (on the CPU)."""
    return list(np.split(points.cpu().numpy(), np.cumsum(lengths.cpu().numpy())[:-1])) if len(lengths) else []


def polygon_boxes(polygons: list[np.ndarray]) -> np.ndarray:
    """(N, 4) x1, y1, x2, y2 boxes enclosing each (K, 2) polygon, in the points' dtype."""
    if not polygons:
        return np.zeros((0, 4), dtype=np.float32)
    return np.stack([np.concatenate([p.min(axis=0), p.max(axis=0)]) for p in polygons])


def polygon_mask_targets(polygons: list[np.ndarray], boxes: np.ndarray, size: int,
                         frame_offset: float = PIXEL_CENTRE) -> np.ndarray:
    """Rasterise polygons[i] inside boxes[i] to a size x size soft mask in [0, 1].

    polygons: (K, 2) arrays in the boxes' coordinates; boxes: (N, 4) x1, y1, x2, y2.
    Returns (N, size, size) float32. One pycocotools call for all instances.

    Each mask covers its box moved by `frame_offset` px. PIXEL_CENTRE is stock torchvision's
    frame: roi_align(aligned=False) projects its targets with pixel centres at integers, half
    a pixel off the polygons' convention (pixel i covers [i, i+1]), so a character's left and
    top half pixel falls outside its box's mask. 0: the mask covers the box itself.
    """
    if len(boxes) == 0:
        return np.zeros((0, size, size), dtype=np.float32)
    res = size * SUPERSAMPLE
    flat = []
    for points, (x1, y1, x2, y2) in zip(polygons, boxes):
        scale = np.array([res / max(x2 - x1, 1e-6), res / max(y2 - y1, 1e-6)])
        flat.append(((points - frame_offset - np.array([x1, y1])) * scale).reshape(-1).astype(np.float64).tolist())
    masks = mask_utils.decode(mask_utils.frPyObjects(flat, res, res))  # res x res x N uint8
    masks = masks.transpose(2, 0, 1).reshape(len(boxes), size, SUPERSAMPLE, size, SUPERSAMPLE)
    return masks.mean(axis=(2, 4), dtype=np.float32)


def warp_points(points: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """(K, 2) polygon points moved by a 2x3 affine `matrix` that works on pixel indices (as
    OpenCV's warpAffine: pixel centres at integers), where polygons put them at i + 0.5."""
    return ((points - PIXEL_CENTRE) @ matrix[:, :2].T + matrix[:, 2] + PIXEL_CENTRE).astype(np.float32)


def polygon_area(points: np.ndarray) -> float:
    """Absolute shoelace area of a (K, 2) polygon (0 below three points)."""
    p = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    if len(p) < 3:
        return 0.0
    x, y = p[:, 0], p[:, 1]
    twice = np.dot(x[:-1], y[1:]) - np.dot(y[:-1], x[1:]) + x[-1] * y[0] - y[-1] * x[0]
    return float(abs(twice) / 2.0)


# Polygons of more points than this are not checked for crossing themselves (the check is
# quadratic); an annotator's outline of one character has tens of points.
MAX_CROSSING_CHECK_POINTS = 4096
# Edge pairs compared in one numpy pass: a dataset's CSV holds tens of small outlines, and one
# pass each would cost more than the comparisons; a long outline is compared in blocks of rows.
CROSSING_PASS_PAIRS = 1 << 16
# Outlines up to this many points share passes (their pair lists are kept, one per length).
SHARED_PASS_POINTS = 128


def first_crossing(points: np.ndarray) -> tuple[int, int] | None:
    """Indices (i, j), i < j, of two non-adjacent edges of the closed polygon that cross (edge
    i runs from point i to point i+1), or None when it is simple; None too beyond
    MAX_CROSSING_CHECK_POINTS points."""
    return first_crossings([points])[0]


def first_crossings(polygons: list[np.ndarray]) -> list[tuple[int, int] | None]:
    """first_crossing of each polygon; small ones are compared together, in passes of about
    CROSSING_PASS_PAIRS edge pairs."""
    found: list[tuple[int, int] | None] = [None] * len(polygons)
    chunk: list[int] = []
    pairs = 0
    for k, points in enumerate(polygons):
        n = len(points)
        if n < 4 or n > MAX_CROSSING_CHECK_POINTS:
            continue
        if n > SHARED_PASS_POINTS:
            found[k] = _long_crossing(np.asarray(points, dtype=np.float64))
            continue
        chunk.append(k)
        pairs += n * n // 2
        if pairs >= CROSSING_PASS_PAIRS:
            _shared_crossings(polygons, chunk, found)
            chunk, pairs = [], 0
    if chunk:
        _shared_crossings(polygons, chunk, found)
    return found


def _pairs_in_rows(n: int, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
    """Non-adjacent edge pairs (i, j) of a closed polygon of N points with START <= i < STOP, each
    once, row by row: j > i + 1, and not the closing pair (0, n - 1)."""
    i, j = np.nonzero(np.arange(n)[None, :] > np.arange(start, stop)[:, None] + 1)
    i += start
    keep = ~((i == 0) & (j == n - 1))
    return i[keep], j[keep]


@functools.lru_cache(maxsize=SHARED_PASS_POINTS)
def _edge_pairs(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Every non-adjacent edge pair of a closed polygon of N points (_pairs_in_rows), kept per N."""
    return _pairs_in_rows(n, 0, n)


def _shared_crossings(polygons: list[np.ndarray], chunk: list[int], found: list) -> None:
    """first_crossing of the polygons numbered CHUNK, in one pass over their concatenated points."""
    lengths = [len(polygons[k]) for k in chunk]
    offsets = np.cumsum([0] + lengths[:-1])
    points = np.concatenate([polygons[k] for k in chunk]).astype(np.float64)
    following = np.arange(1, len(points) + 1)
    following[offsets + np.array(lengths) - 1] = offsets  # each polygon's last point closes on its first
    pairs = [_edge_pairs(n) for n in lengths]
    i = np.concatenate([p[0] + o for p, o in zip(pairs, offsets)])
    j = np.concatenate([p[1] + o for p, o in zip(pairs, offsets)])
    hits = np.flatnonzero(_crosses(points, points[following] - points, i, j))
    owner = np.repeat(np.arange(len(chunk)), [len(p[0]) for p in pairs])[hits]
    for o, first in zip(*np.unique(owner, return_index=True)):  # pairs run row by row: the first is first_crossing's
        hit = hits[first]
        found[chunk[o]] = (int(i[hit] - offsets[o]), int(j[hit] - offsets[o]))


def _long_crossing(points: np.ndarray) -> tuple[int, int] | None:
    n = len(points)
    edges = np.roll(points, -1, axis=0) - points
    block = max(1, CROSSING_PASS_PAIRS // n)
    for start in range(0, n, block):
        i, j = _pairs_in_rows(n, start, min(start + block, n))
        hits = np.flatnonzero(_crosses(points, edges, i, j))
        if len(hits):
            return int(i[hits[0]]), int(j[hits[0]])
    return None


def _crosses(points: np.ndarray, edges: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Whether edge i (from points[i] along edges[i]) properly crosses edge j, pair by pair. Only
    pairs whose x and then y ranges overlap (few of an outline's) are solved for where they meet."""
    crossing = np.zeros(len(i), dtype=bool)
    candidates = np.arange(len(i))
    ends = points + edges
    for axis in (0, 1):
        low, high = np.minimum(points[:, axis], ends[:, axis]), np.maximum(points[:, axis], ends[:, axis])
        a, b = i[candidates], j[candidates]
        candidates = candidates[(low[a] < high[b]) & (low[b] < high[a])]
    a, b = i[candidates], j[candidates]
    r, s = edges[a], edges[b]
    qp = points[b] - points[a]
    denom = r[:, 0] * s[:, 1] - r[:, 1] * s[:, 0]
    with np.errstate(divide="ignore", invalid="ignore"):
        t = (qp[:, 0] * s[:, 1] - qp[:, 1] * s[:, 0]) / denom
        u = (qp[:, 0] * r[:, 1] - qp[:, 1] * r[:, 0]) / denom
    crossing[candidates] = (denom != 0) & (t > 0) & (t < 1) & (u > 0) & (u < 1)
    return crossing


def clip_polygon_to_image(points: np.ndarray, width: int, height: int) -> np.ndarray:
    """Sutherland-Hodgman clip of a polygon to the rectangle [0, width] x [0, height].

    Exact for any simple polygon against a convex window; returns (K, 2), K may be 0.
    """
    if len(points) and (points >= 0).all() and (points[:, 0] <= width).all() and (points[:, 1] <= height).all():
        return np.asarray(points, dtype=np.float32).reshape(-1, 2)  # inside: what the clip would return
    edges = (  # (inside test, intersection with the boundary line)
        (lambda p: p[0] >= 0, 0, 0.0),
        (lambda p: p[0] <= width, 0, float(width)),
        (lambda p: p[1] >= 0, 1, 0.0),
        (lambda p: p[1] <= height, 1, float(height)),
    )
    out = [tuple(p) for p in points.astype(np.float64)]
    for inside, axis, bound in edges:
        if not out:
            break
        src, out = out, []
        for i, cur in enumerate(src):
            prev = src[i - 1]
            if inside(cur):
                if not inside(prev):
                    out.append(_intersect(prev, cur, axis, bound))
                out.append(cur)
            elif inside(prev):
                out.append(_intersect(prev, cur, axis, bound))
    return np.asarray(out, dtype=np.float32).reshape(-1, 2)


def _intersect(a: tuple, b: tuple, axis: int, bound: float) -> tuple[float, float]:
    t = (bound - a[axis]) / (b[axis] - a[axis])
    return (a[0] + t * (b[0] - a[0]), a[1] + t * (b[1] - a[1]))


def polygons_to_masks(polygons: list[np.ndarray], height: int, width: int) -> torch.Tensor:
    """Rasterise polygons to (N, H, W) uint8 full-image masks, the stock torchvision target.

    Training never calls this (polygon_mask_targets rasterises inside each proposal); it serves
    explicit requests and comparisons. pycocotools rasterises, as COCO evaluation does, so
    every mask in charseg follows one convention.
    """
    if not polygons:
        return torch.zeros((0, height, width), dtype=torch.uint8)
    rles = mask_utils.frPyObjects([p.reshape(-1).astype(np.float64).tolist() for p in polygons], height, width)
    return torch.from_numpy(np.ascontiguousarray(mask_utils.decode(rles).transpose(2, 0, 1)))


def polygons_to_boxes(polygons: list[np.ndarray]) -> torch.Tensor:
    """`polygon_boxes` as the (N, 4) float32 tensor of a Mask R-CNN target."""
    return torch.from_numpy(polygon_boxes(polygons).astype(np.float32))


def box_mask_to_polygon(prob: np.ndarray, frame: np.ndarray, threshold: float = 0.5,
                        bounds: tuple[int, int] | None = None) -> list[float]:
    """Outline, in image coordinates, of a box-sized mask probability map (M x M) that covers
    `frame` (x1, y1, x2, y2 in the polygons' convention: pixel i covers [i, i+1]).

    The map is resized to TRACE_SCALE x the frame's pixel size and thresholded, and the
    largest connected part is traced: contours run through pixel centres, so tracing at a
    finer grid keeps a small glyph's outline within 1/(2*TRACE_SCALE) px of its edge. With
    `bounds` (width, height) the outline is clipped to the image: a frame may reach past it.
    Returns a flat [x1, y1, ...] list, [] if the mask is empty.
    """
    x1, y1, x2, y2 = (float(v) for v in frame)
    width = max(int(np.ceil((x2 - x1) * TRACE_SCALE)), 1)
    height = max(int(np.ceil((y2 - y1) * TRACE_SCALE)), 1)
    resized = cv2.resize(prob.astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR)
    points = largest_outline(resized >= threshold)
    if points is None:
        return []
    scale = np.array([(x2 - x1) / width, (y2 - y1) / height], dtype=np.float32)
    points = points * scale + np.array([x1, y1], dtype=np.float32)
    if bounds is not None:
        points = clip_polygon_to_image(points, *bounds)
        if len(points) < 3 or polygon_area(points) == 0:
            return []
    return flat_polygon(points)


def largest_outline(binary: np.ndarray) -> np.ndarray | None:
    """(K, 2) outline of the largest connected part of a binary mask, through pixel centres
    (pixel i covers [i, i+1], so its centre is i + 0.5); None when empty or degenerate."""
    contours, _ = cv2.findContours(binary.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return None
    contour = max(contours, key=cv2.contourArea)
    if len(contour) < 3:
        return None
    return contour.reshape(-1, 2).astype(np.float32) + 0.5


def edge_outlines(binary: np.ndarray) -> list[np.ndarray]:
    """Outer outlines of a binary mask's parts, on its pixels' edges (pixel i covers [i, i+1]).

    OpenCV traces contours through the centres of boundary pixels, half a pixel inside the
    ink: a glyph's 1 px stroke becomes a polygon of no width. Tracing the mask at TRACE_SCALE
    x its resolution puts the outline 1/(2*TRACE_SCALE) px inside the edge instead, and
    Douglas-Peucker at 1/TRACE_SCALE px drops the staircase points that upsampling adds.
    Returns (K, 2) float32 arrays (K >= 3), largest area first.
    """
    fine = cv2.resize(binary.astype(np.uint8), None, fx=TRACE_SCALE, fy=TRACE_SCALE,
                      interpolation=cv2.INTER_NEAREST)
    contours, _ = cv2.findContours(fine, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    contours = sorted(contours, key=cv2.contourArea, reverse=True)
    simplified = (cv2.approxPolyDP(c, 1.0, True).reshape(-1, 2) for c in contours)
    return [((c.astype(np.float32) + 0.5) / TRACE_SCALE) for c in simplified if len(c) >= 3]


def glyph_mask(coverage: np.ndarray) -> np.ndarray:
    """The pixels whose outline is a glyph's polygon, from its anti-aliased coverage (H x W in
    [0, 1]): those covered at least INK_COVERAGE. Thin strokes of a small glyph (an m, an X or
    a W at 12 px) cover some pixels less than half, and those pixels alone would split it into
    pieces whose convex hull, a blob, would become its annotation, or open the ring of an o, a
    0 or a D, whose outer outline would then run into its counter and leave it out. Then the
    coverage level is lowered in COVERAGE_STEP steps, down to JOINED_COVERAGE, until the glyph
    has no more parts than it has at JOINED_COVERAGE and encloses every counter it encloses
    there: an annotator outlines the glyph they see, joined and closed where the font draws it
    so; glyphs drawn in several parts (i, j, %) keep them."""
    joined = coverage >= JOINED_COVERAGE
    drawn, counters = _parts(joined), filled(joined) & ~joined
    for level in np.arange(INK_COVERAGE, JOINED_COVERAGE, -COVERAGE_STEP):
        mask = coverage >= level
        if _parts(mask) <= drawn and not (counters & ~filled(mask)).any():
            return mask
    return joined


def filled(mask: np.ndarray) -> np.ndarray:
    """MASK with its holes filled: every pixel that background 4-connected to the border does
    not reach (OpenCV's outer contours see the ink 8-connected, so a hole is what they enclose)."""
    outside = np.ones((mask.shape[0] + 2, mask.shape[1] + 2), np.uint8)  # np.pad costs ten times as much
    outside[1:-1, 1:-1] = ~mask
    cv2.floodFill(outside, None, (0, 0), 2, flags=4)
    return outside[1:-1, 1:-1] != 2


def _parts(mask: np.ndarray) -> int:
    """Connected parts (8-connected) of a binary mask."""
    return cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)[0] - 1


def flat_polygon(points: np.ndarray) -> list[float]:
    """(K, 2) points as the dataset's flat [x1, y1, x2, y2, ...] list, to 0.01 px (numpy's
    rounding: Python's round per value cost a dense page's outlines a tenth of a second)."""
    return np.round(np.asarray(points, dtype=np.float64).reshape(-1), 2).tolist()


def mask_to_polygon(mask: np.ndarray) -> list[float]:
    """Outline, on its pixels' edges, of the largest connected part of a full-image binary
    mask as a flat polygon; [] when the mask is empty or degenerate."""
    outlines = edge_outlines(mask)
    return flat_polygon(outlines[0]) if outlines else []
