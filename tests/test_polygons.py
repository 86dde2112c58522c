"""Outlines traced from masks lie on the pixels' edges, so a rasterised outline is its mask."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

from charseg.data.generate import _render_glyph, glyph_outline, load_font
from charseg.polygons import (JOINED_COVERAGE, _parts, edge_outlines, filled, first_crossing, first_crossings,
                              glyph_mask, mask_to_polygon, polygon_area, polygons_to_masks)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


@pytest.mark.parametrize("shape", ["stroke", "square", "diagonal"])
def test_an_outline_on_pixel_edges_rasterises_back_to_its_mask(shape):
    mask = np.zeros((20, 20), dtype=bool)
    if shape == "stroke":  # 1 px wide: traced through pixel centres it would have no area at all
        mask[3:17, 9] = True
    elif shape == "square":
        mask[4:9, 4:9] = True
    else:
        mask[np.arange(2, 18), np.arange(2, 18)] = True
        mask[np.arange(2, 17), np.arange(3, 18)] = True
    outline = edge_outlines(mask)[0]
    assert abs(polygon_area(outline) - mask.sum()) <= 0.25 * np.sqrt(mask.sum()) * 4  # within 1/8 px all round
    assert iou(polygons_to_masks([outline], 20, 20)[0].numpy().astype(bool), mask) >= 0.9
    assert mask_to_polygon(mask) == [round(float(v), 2) for v in outline.reshape(-1)]


def test_edge_outlines_lists_parts_largest_first_and_nothing_for_an_empty_mask():
    mask = np.zeros((12, 12), dtype=bool)
    mask[1:3, 1:3] = True
    mask[5:11, 5:11] = True
    areas = [polygon_area(p) for p in edge_outlines(mask)]
    assert len(areas) == 2 and areas[0] > areas[1]
    assert edge_outlines(np.zeros((5, 5), dtype=bool)) == [] and mask_to_polygon(np.zeros((5, 5), bool)) == []


@pytest.mark.parametrize("char", ["l", "k", "m", "W", "3"])
def test_a_generated_glyph_polygon_covers_the_glyphs_pixels(char):
    glyph = _render_glyph(char, load_font(None, 13))  # small: strokes 1-2 px wide
    outline = glyph_outline(glyph)
    drawn = polygons_to_masks([outline], *glyph.shape)[0].numpy().astype(bool)
    assert iou(drawn, glyph) >= 0.85


def test_glyph_mask_joins_a_stroke_that_half_coverage_splits_and_keeps_parts_the_font_draws_apart():
    coverage = np.zeros((5, 12), dtype=np.float32)
    coverage[2, 0:3] = coverage[2, 4:7] = 0.9
    coverage[2, 3] = 0.3  # a thin diagonal's pixel, under half covered: it joins the two strokes
    coverage[2, 9:11] = 0.9  # the dot of an i: nothing drawn between it and the rest
    mask = glyph_mask(coverage)
    assert mask[2].tolist() == [True] * 7 + [False, False, True, True, False]
    assert _parts(coverage >= 0.5) == 3 and _parts(mask) == 2
    assert glyph_mask(np.where(coverage == 0.3, 0, coverage)).tolist() == (coverage >= 0.5).tolist()


def test_glyph_mask_closes_a_ring_that_half_coverage_opens_and_leaves_an_open_one_open():
    """An o whose ring one pixel under half covered opens: its outer outline would run into the
    counter and leave it out. The mask is closed, so its outline encloses the counter; a c,
    open in the drawing itself, stays open."""
    ring = np.zeros((9, 9), dtype=np.float32)
    ring[1:8, 1:8] = 0.9
    ring[3:6, 3:6] = 0.0  # the counter
    ring[1, 4] = ring[2, 4] = 0.3  # the top of the ring, thin: under half covered
    opened = ring >= 0.5
    assert _parts(opened) == 1 and not (filled(opened) & ~opened).any()  # a c at half coverage
    mask = glyph_mask(ring)
    outline = polygons_to_masks([edge_outlines(mask)[0]], 9, 9)[0].numpy().astype(bool)
    assert outline[3:6, 3:6].all() and outline.sum() == 49
    letter_c = np.where(ring == 0.3, 0.0, ring)  # the same gap, drawn open
    assert glyph_mask(letter_c).tolist() == (letter_c >= 0.5).tolist()


@pytest.mark.parametrize("char", ["o", "0", "D", "O", "9", "b"])
def test_an_annotated_small_rotated_glyph_encloses_its_counter(char):
    """The held-out annotator's polygon of a small glyph with a counter, rotated as its pages
    rotate (which thins strokes below half coverage), covers the counter: the dataset's outer
    outline, holes filled. (Before glyph_mask closed rings, 33 of these 120 left it out.)"""
    import cv2

    from charseg.data.heldout import _annotate

    for size in (8, 9, 10, 11, 12):
        font = load_font(None, size)
        left, top, right, bottom = font.getbbox(char)
        canvas = Image.new("L", (right - left + 8, bottom - top + 8), 0)
        ImageDraw.Draw(canvas).text((4 - left, 4 - top), char, fill=255, font=font)
        upright = np.asarray(canvas, dtype=np.float32) / 255
        for degrees in (0.7, 3, 7, 11):
            turn = cv2.getRotationMatrix2D((upright.shape[1] / 2, upright.shape[0] / 2), degrees, 1.0)
            coverage = cv2.warpAffine(upright, turn, upright.shape[::-1], flags=cv2.INTER_LINEAR)
            joined = coverage >= JOINED_COVERAGE
            counter = filled(joined) & ~joined
            drawn = polygons_to_masks([_annotate(coverage)], *coverage.shape)[0].numpy().astype(bool)
            assert counter.any() and drawn[counter].mean() >= 0.9, (size, degrees)


def test_a_small_glyph_that_half_coverage_splits_is_outlined_not_hulled():
    font = load_font(None, 12)  # Pillow's font at 12 px: its W has thin diagonals
    left, top, right, bottom = font.getbbox("W")
    canvas = Image.new("L", (right - left + 2, bottom - top + 2), 0)
    ImageDraw.Draw(canvas).text((1 - left, 1 - top), "W", fill=255, font=font)
    coverage = np.asarray(canvas, dtype=np.float32) / 255.0
    assert _parts(coverage >= 0.5) > 1  # the case: half coverage alone breaks the W into pieces
    glyph = _render_glyph("W", font)
    outline = glyph_outline(glyph)
    drawn = polygons_to_masks([outline], *glyph.shape)[0].numpy().astype(bool)
    assert iou(drawn, glyph) >= 0.85  # its outline, not the hull of its pieces (a blob)
    assert drawn.sum() < 0.8 * glyph.size


def _first_crossing_by_hand(points: np.ndarray) -> tuple[int, int] | None:
    """Edge pairs in order, each tested by the signs of four orientations (no shared code)."""
    n = len(points)

    def side(a, b, c):
        return (b[0] - a[0]) * (c[1] - a[1]) - (b[1] - a[1]) * (c[0] - a[0])

    for i in range(n):
        for j in range(i + 2, n):
            if i == 0 and j == n - 1:
                continue
            p, q, r, s = points[i], points[(i + 1) % n], points[j], points[(j + 1) % n]
            if side(p, q, r) * side(p, q, s) < 0 and side(r, s, p) * side(r, s, q) < 0:
                return i, j
    return None


def test_first_crossings_of_a_file_of_outlines_is_each_ones_first_crossing():
    rng = np.random.default_rng(3)
    sizes = [3, 4, 5, 8, 12, 30, 60, 100, 128, 129, 200] * 4 + [40] * 30  # shared passes, several, and long ones
    polygons = []
    for k, n in enumerate(sizes):
        if k % 2:  # simple: points in angle order around a centre
            angle, radius = np.sort(rng.uniform(0, 2 * np.pi, n)), rng.uniform(5, 20, n)
            polygons.append(np.stack([25 + radius * np.cos(angle), 25 + radius * np.sin(angle)], 1).astype(np.float32))
        else:
            polygons.append(rng.uniform(0, 50, (n, 2)).astype(np.float32))
    expected = [_first_crossing_by_hand(p.astype(np.float64)) if len(p) >= 4 else None for p in polygons]
    assert any(e is None for e in expected[4:]) and any(e is not None for e in expected)
    assert first_crossings(polygons) == expected
    assert [first_crossing(p) for p in polygons] == expected
    bow_tie = np.array([[0, 0], [10, 0], [0, 10], [10, 10]], np.float32)
    assert first_crossing(bow_tie) == (1, 3)  # its two diagonals
