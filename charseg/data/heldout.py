"""Held-out pages: made by another process than the training generator, to measure what a
model learned rather than what it memorised.

Where `generate.py` places glyphs one by one, this module typesets whole lines of text with
Pillow (anti-aliased, in fonts the training generator never uses), lays them on textured,
sometimes low-contrast backgrounds, rotates the page by up to +-12 degrees, blurs it and adds
noise; and it annotates as a person would, with a tight polygon of a few points around each
character (the outline simplified by Douglas-Peucker), not the exact pixel contour. Its
document pages are what a scanner gives: paragraphs of full lines in those fonts, dark ink on
light paper, skewed a little, then the same blur, noise and annotator.
"""

from __future__ import annotations

import json
import math
import random
import string
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..errors import CharsegError
from ..polygons import edge_outlines, flat_polygon, glyph_mask, polygon_area
from .generate import (MAX_FONT_SIZE, MAX_IMAGES, MAX_SIDE, GenerationSummary, Glyph, font_files, on_page,
                       rotate_page, write_page)

# Fonts the training generator never uses (matplotlib ships them; see generate.TRAINING_FONTS).
HELDOUT_FONTS = ("DejaVuSansMono.ttf", "STIXGeneral.ttf", "STIXGeneralItalic.ttf", "STIXGeneralBol.ttf",
                 "cmss10.ttf", "cmtt10.ttf", "DejaVuSerif-Italic.ttf", "DejaVuSans-BoldOblique.ttf")
CHARSET = string.ascii_letters + string.digits
MAX_ROTATION = 12.0  # degrees, either way
ANNOTATION_TOLERANCE = 0.6  # px: how far an annotator's polygon strays from the glyph's edge
FONT_SIZES = (12, 30)  # px, the default range of a line's font size
# A scanned document page (`document=True`): its default size and type, its skew either way.
DOCUMENT_SIZE, DOCUMENT_FONT_SIZES, DOCUMENT_SKEW = (2048, 2048), (10, 18), 1.5


def generate_heldout(out_dir: str | Path, *, num_images: int = 40, min_side: int = 128, max_side: int = 256,
                     seed: int = 0, progress: bool = False, size: tuple[int, int] | None = None,
                     font_sizes: tuple[int, int] = FONT_SIZES, document: bool = False) -> GenerationSummary:
    """Render `num_images` held-out pages (sides from min_side to max_side, or all of `size`
    (width, height)) in fonts of `font_sizes` px into OUT_DIR in the dataset format; with
    DOCUMENT, scanned document pages (typeset_document) of `size`. Returns counts of what was
    written."""
    check_pages(num_images, min_side, max_side, size)
    if not 4 <= font_sizes[0] <= font_sizes[1] <= MAX_FONT_SIZE:
        raise CharsegError(f"font size must be 4 <= min <= max <= {MAX_FONT_SIZE}, got {font_sizes[0]}-{font_sizes[1]}")
    fonts = font_files(HELDOUT_FONTS)
    if not fonts:
        raise CharsegError("held-out pages need the fonts that matplotlib ships (pip install matplotlib)")
    out = Path(out_dir)
    rng = random.Random(seed)
    total = 0
    indices = range(1, num_images + 1)
    if progress:
        from tqdm import tqdm
        indices = tqdm(indices, desc="held-out pages", unit="image")
    for index in indices:
        width, height = size or (rng.randint(min_side, max_side), rng.randint(min_side, max_side))
        if document:
            page, glyphs = typeset_document(rng, width, height, fonts, font_sizes)
            page, polygons, chars = rotate_and_annotate(page, glyphs, rng.uniform(-DOCUMENT_SKEW, DOCUMENT_SKEW))
        else:
            page, glyphs = typeset_page(rng, _background(rng, width, height),
                                        lambda r: ImageFont.truetype(r.choice(fonts), r.randint(*font_sizes)))
            page, polygons, chars = rotate_and_annotate(page, glyphs, rng.uniform(-MAX_ROTATION, MAX_ROTATION))
        page = _degrade(rng, page)
        rows = [(c, json.dumps(flat_polygon(p))) for c, p in zip(chars, polygons)]
        write_page(out, f"{index:05d}", page, rows)
        total += len(rows)
    return GenerationSummary(out_dir=out, images=num_images, characters=total)


def check_pages(num_images: int, min_side: int, max_side: int, size: tuple[int, int] | None = None) -> None:
    """Refuse a page count or sides (min_side-max_side, or `size`) no generator here makes."""
    sides = size or (min_side, max_side)
    if not 1 <= num_images <= MAX_IMAGES or not 64 <= min(sides) <= max(sides) <= MAX_SIDE \
            or not (size or min_side <= max_side):
        raise CharsegError(f"need 1 to {MAX_IMAGES} pages with sides from 64 to {MAX_SIDE} px, got "
                           f"{num_images} of {'x'.join(map(str, sides)) if size else f'{min_side}-{max_side}'}")


def _background(rng: random.Random, width: int, height: int, levels: tuple[float, float] = (150, 250),
                gradient_range: float = 40, texture_range: tuple[float, float] = (2, 12)) -> np.ndarray:
    """A paper-like float background: a gray level of LEVELS, a gradient of up to GRADIENT_RANGE
    across the page and a smooth texture of TEXTURE_RANGE's standard deviation."""
    base = rng.uniform(*levels)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    angle = rng.uniform(0, 2 * math.pi)
    gradient = (xs * math.cos(angle) + ys * math.sin(angle)) / max(width, height) * rng.uniform(
        -gradient_range, gradient_range)
    coarse = np.random.default_rng(rng.getrandbits(32)).normal(0, rng.uniform(*texture_range),
                                                               (height // 16 + 2, width // 16 + 2))
    texture = cv2.resize(coarse.astype(np.float32), (width, height), interpolation=cv2.INTER_CUBIC)
    tint = np.array([rng.uniform(-12, 12) for _ in range(3)], dtype=np.float32)
    return np.clip((base + gradient + texture)[:, :, None] + tint, 0, 255)


LineStyle = Callable[[random.Random, np.ndarray, list, np.ndarray], tuple[np.ndarray, list, np.ndarray]]


def typeset_page(rng: random.Random, page: np.ndarray, line_font: Callable[[random.Random], ImageFont.FreeTypeFont],
                 style: LineStyle | None = None) -> tuple[np.ndarray, list[Glyph]]:
    """Lines of text on PAGE (H x W x 3 float, drawn on), each in line_font(rng); STYLE, when
    given, changes a line's coverage, its glyphs' coverages and its ink before they are drawn.
    Returns the page and its glyphs, to be annotated where they end up (rotate_and_annotate)."""
    height, width = page.shape[:2]
    glyphs = []
    y = rng.randint(2, 12)
    while True:
        font = line_font(rng)
        ascent, descent = font.getmetrics()
        if y + ascent + descent > height - 2:
            break
        text = " ".join("".join(rng.choice(CHARSET) for _ in range(rng.randint(1, 7))) for _ in range(6))
        x0 = rng.randint(2, max(3, width // 4))
        # Lower contrast on some lines: text color anywhere from black to mid gray.
        ink = np.array([rng.uniform(0, 120)] * 3, dtype=np.float32) + rng.uniform(-15, 15)
        line, placed = _typeset_line(text, font, x0, width)
        if style is not None:
            line, placed, ink = style(rng, line, placed, ink)
        glyphs += _print_line(page, y, line, placed, ink)
        y += ascent + descent + rng.randint(0, 10)
    return page, glyphs


def typeset_document(rng: random.Random, width: int, height: int, fonts: list[str], font_sizes: tuple[int, int]
                     ) -> tuple[np.ndarray, list[Glyph]]:
    """A page of text as documents are set: light paper, margins, paragraphs of 2-8 full lines
    (the last one shorter) each in one font, size (of FONT_SIZES) and dark ink, with leading of
    1-1.4 lines and a blank of half to one line between paragraphs. Returns the page and its
    glyphs, to be annotated where they end up (rotate_and_annotate)."""
    page = _background(rng, width, height, levels=(215, 250), gradient_range=15, texture_range=(1, 5))
    glyphs = []
    left, right = rng.randint(width // 30, width // 10), width - rng.randint(width // 30, width // 10)
    y = rng.randint(height // 40, height // 12)
    while True:
        font = ImageFont.truetype(rng.choice(fonts), rng.randint(*font_sizes))
        ink = np.array([rng.uniform(0, 70)] * 3, dtype=np.float32) + rng.uniform(-10, 10)
        ascent, descent = font.getmetrics()
        leading = round((ascent + descent) * rng.uniform(1.0, 1.4))
        lines = rng.randint(2, 8)
        for index in range(lines):
            if y + ascent + descent > height - 2:
                return page, glyphs
            end = right if index < lines - 1 else rng.randint(left + (right - left) // 4, right)
            line, placed = _typeset_line(_words_to_fill(rng, font, end - left - 1), font, left, end)
            glyphs += _print_line(page, y, line, placed, ink)
            y += leading
        y += round(leading * rng.uniform(0.5, 1.0))


def _words_to_fill(rng: random.Random, font: ImageFont.FreeTypeFont, width: int) -> str:
    """Words of 1-9 random characters, as many as FONT sets in WIDTH px (at least one)."""
    text = ""
    while True:
        word = "".join(rng.choice(CHARSET) for _ in range(rng.randint(1, 9)))
        longer = f"{text} {word}" if text else word
        if text and font.getlength(longer) > width:
            return text
        text = longer


def _print_line(page: np.ndarray, y: int, line: np.ndarray, placed: list[tuple[str, np.ndarray]], ink: np.ndarray
                ) -> list[Glyph]:
    """Blend a typeset LINE's coverage (_typeset_line) in INK into PAGE from row Y and its left
    edge; returns its PLACED characters as glyphs at their places on the page."""
    coverage = line.astype(np.float32)[:, :, None] / 255.0
    band = page[y:y + line.shape[0], :line.shape[1]]
    band[:] = band * (1 - coverage) + ink * coverage
    glyphs = []
    for char, glyph in placed:
        ys, xs = np.nonzero(glyph)
        crop = glyph[ys.min():ys.max() + 1, xs.min():xs.max() + 1].astype(np.float32) / 255.0
        glyphs.append(Glyph(char, crop, int(xs.min()), y + int(ys.min())))
    return glyphs


def rotate_and_annotate(page: np.ndarray, glyphs: list[Glyph], degrees: float
                        ) -> tuple[np.ndarray, list[np.ndarray], list[str]]:
    """Rotate the page about its centre and annotate each glyph where it now lies, on the
    rotated page's pixel edges (Glyph.moved, _annotate), as an annotator outlines the ink they
    see. (Rotating an outline traced on the upright page's pixels instead keeps that page's
    staircase, up to half a pixel off the rotated ink.) Characters that leave the page are
    dropped. Returns the page, the polygons, their chars."""
    height, width = page.shape[:2]
    rotated, matrix = rotate_page(page, degrees)
    polygons, chars = [], []
    for glyph in glyphs:
        moved = glyph.moved(matrix)
        outline = _annotate(moved.coverage)
        if outline is None:
            continue
        outline = outline + np.array([moved.x, moved.y], dtype=np.float32)
        if on_page(outline, width, height):
            polygons.append(outline)
            chars.append(glyph.char)
    return rotated, polygons, chars


def _typeset_line(text: str, font: ImageFont.FreeTypeFont, x0: int, width: int
                  ) -> tuple[np.ndarray, list[tuple[str, np.ndarray]]]:
    """The line's anti-aliased coverage (H x width uint8), drawn in one call as a typesetter
    would, and each visible character's own coverage (H x width uint8) at its place on the line."""
    ascent, descent = font.getmetrics()
    size = (width, ascent + descent)
    canvas = Image.new("L", size, 0)
    ImageDraw.Draw(canvas).text((x0, 0), text, fill=255, font=font)
    placed = []
    for i, char in enumerate(text):
        x = x0 + font.getlength(text[:i])
        if char == " " or x + font.getlength(char) > width - 1:
            continue
        glyph = Image.new("L", size, 0)
        ImageDraw.Draw(glyph).text((x, 0), char, fill=255, font=font)
        coverage = np.asarray(glyph)
        if (coverage >= 128).sum() >= 4:
            placed.append((char, coverage))
    # A character cut by the page's right edge keeps its pixels but gets no polygon.
    return np.asarray(canvas), placed


def _annotate(coverage: np.ndarray) -> np.ndarray | None:
    """A tight polygon around a glyph (its coverage in [0, 1]), as an annotator draws it: the
    outer outline on the ink's edges (polygons.glyph_mask; the hull of all parts for glyphs such
    as i and j), simplified to a few points."""
    outlines = edge_outlines(glyph_mask(coverage))
    if not outlines:
        return None
    outline = outlines[0] if len(outlines) == 1 else cv2.convexHull(np.concatenate(outlines)).reshape(-1, 2)
    simplified = cv2.approxPolyDP(outline, ANNOTATION_TOLERANCE, True).reshape(-1, 2).astype(np.float32)
    if len(simplified) < 3 or polygon_area(simplified) < 2.0:
        return None
    return simplified


def _degrade(rng: random.Random, page: np.ndarray) -> np.ndarray:
    """Blur and sensor noise, then 8 bits."""
    sigma = rng.uniform(0, 1.0)
    if sigma > 0.2:
        page = cv2.GaussianBlur(page, (0, 0), sigma)
    noise = np.random.default_rng(rng.getrandbits(32)).normal(0, rng.uniform(0, 10), page.shape)
    return np.clip(page + noise, 0, 255).round().astype(np.uint8)
