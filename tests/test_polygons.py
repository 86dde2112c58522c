"""Outlines traced from masks lie on the pixels' edges, so a rasterised outline is its mask."""

from __future__ import annotations

import numpy as np
import pytest

from charseg.data.generate import _render_glyph, glyph_outline, load_font
from charseg.polygons import edge_outlines, mask_to_polygon, polygon_area, polygons_to_masks


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
