"""Synthetic character pages in the charseg dataset format, for demos, tests and benchmarks.

Two layouts: `scatter` places single glyphs of one font anywhere on a flat page, never
touching; `lines` sets words in lines of text in several fonts, anti-aliased, in ink from
black to faint gray on unevenly lit, blotched, noisy paper, as scanned pages look. Held-out pages for measuring a model come from another
process (heldout.py), in other fonts.
"""

from __future__ import annotations

import functools
import json
import random
import string
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..errors import CharsegError
from ..polygons import edge_outlines, flat_polygon, glyph_mask, polygon_area
from .dataset import write_annotation

DEFAULT_CHARSET = string.ascii_letters + string.digits + "%&?#@"
LAYOUTS = ("scatter", "lines")
MIN_GLYPH_AREA = 2.0  # px²: a speck this small (a glyph at a tiny size) gets no polygon
# `lines` sets text in these (matplotlib ships them) and in Pillow's bundled font; the
# held-out pages use others (heldout.HELDOUT_FONTS).
TRAINING_FONTS = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSerif.ttf",
                  "DejaVuSerif-Bold.ttf", "DejaVuSerif-BoldItalic.ttf", "cmr10.ttf", "cmb10.ttf", "cmti10.ttf")
# What one `generate` call makes at most: a larger request fills the disk or memory, or loops
# for days placing glyphs on a page that has no room left.
MAX_IMAGES = 1_000_000
MAX_SIDE = 8192  # px: a page is held in memory while it is drawn
MAX_CHARS = 100_000  # per page
MAX_FONT_SIZE = 1024  # px: FreeType refuses larger pixel sizes
# scatter: a page is full once this many glyphs in a row found no free place.
MAX_MISSES = 100
# `lines` ink is at least this much darker than the paper (0-255): faint, but legible.
MIN_INK_CONTRAST = 45.0
MAX_ROTATION = 45.0  # degrees, either way: `lines --rotation` (past this, lines run down the page)
# `lines --tracking MIN MAX`: space added to each glyph's advance, as a share of the line's font
# size (below 0 neighbours touch or overlap, as kerned, italic and small dense type does).
TRACKING_LIMITS = (-0.3, 1.0)


@dataclass(frozen=True)
class Glyph:
    """A drawn character: its anti-aliased coverage (H x W float in [0, 1], a crop of the
    page) and where the crop's top-left pixel lies on the page."""

    char: str
    coverage: np.ndarray
    x: int
    y: int

    def moved(self, matrix: np.ndarray) -> "Glyph":
        """The glyph after its page is warped by the 2x3 `matrix` (pixel indices, as cv2's
        warpAffine): its coverage warped (bilinear) into a crop around where it lands, so
        that it is outlined on the warped page's own pixels."""
        h, w = self.coverage.shape
        corners = np.array([[0, 0], [w - 1, 0], [0, h - 1], [w - 1, h - 1]], dtype=np.float64) + (self.x, self.y)
        moved = corners @ matrix[:, :2].T + matrix[:, 2]
        x0, y0 = (int(v) - 1 for v in np.floor(moved.min(axis=0)))
        x1, y1 = (int(v) + 1 for v in np.ceil(moved.max(axis=0)))
        local = matrix.astype(np.float64)  # a copy
        local[:, 2] = matrix[:, :2] @ (self.x, self.y) + matrix[:, 2] - (x0, y0)
        coverage = cv2.warpAffine(self.coverage.astype(np.float32), local, (x1 - x0 + 1, y1 - y0 + 1),
                                  flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        return Glyph(self.char, coverage, x0, y0)


def rotate_page(page: np.ndarray, degrees: float) -> tuple[np.ndarray, np.ndarray]:
    """The page rotated about its centre (same size, edges replicated) and the 2x3 matrix
    that did it (pixel indices), for Glyph.moved."""
    height, width = page.shape[:2]
    matrix = cv2.getRotationMatrix2D((width / 2, height / 2), degrees, 1.0)
    return cv2.warpAffine(page, matrix, (width, height), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_REPLICATE), matrix


def on_page(points: np.ndarray, width: int, height: int) -> bool:
    """Whether a (K, 2) polygon lies within a page of WIDTH x HEIGHT."""
    return bool(points[:, 0].min() >= 0 and points[:, 1].min() >= 0 and points[:, 0].max() <= width
                and points[:, 1].max() <= height)


def font_files(names: tuple[str, ...]) -> list[str]:
    """Paths of these font files among the fonts matplotlib ships; [] without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return []
    folder = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    return [str(folder / name) for name in names if (folder / name).is_file()]


@dataclass
class GenerationSummary:
    """What `generate_dataset` wrote."""

    out_dir: Path
    images: int
    characters: int


def load_font(font_path: str | None, size: int) -> ImageFont.FreeTypeFont:
    """A scalable font: the given TTF/OTF, else Pillow's bundled one."""
    if font_path:
        try:
            return ImageFont.truetype(font_path, size)
        except OSError as exc:
            raise CharsegError(f"{font_path}: cannot load font ({exc}); pass a .ttf or .otf file") from exc
    return ImageFont.load_default(size=size)


def glyph_outline(mask: np.ndarray) -> np.ndarray | None:
    """One polygon enclosing a glyph mask on its pixels' edges: its outer outline, or the
    convex hull of its pixels when it has several parts (i, j, %). Returns (K, 2) float
    image coordinates, or None if empty."""
    outlines = edge_outlines(mask)
    if not outlines:
        return None
    if len(outlines) == 1:
        return outlines[0]
    ys, xs = np.nonzero(mask)
    corners = np.concatenate([np.stack([xs + dx, ys + dy], axis=1) for dx in (0, 1) for dy in (0, 1)])
    hull = cv2.convexHull(corners.astype(np.float32)).reshape(-1, 2)
    return hull if len(hull) >= 3 else None


def _render_glyph(char: str, font: ImageFont.FreeTypeFont) -> np.ndarray | None:
    left, top, right, bottom = font.getbbox(char)
    if right <= left or bottom <= top:
        return None
    canvas = Image.new("L", (right - left + 2, bottom - top + 2), 0)
    ImageDraw.Draw(canvas).text((1 - left, 1 - top), char, fill=255, font=font)
    mask = glyph_mask(np.asarray(canvas, dtype=np.float32) / 255.0)
    if not mask.any():
        return None
    ys, xs = np.nonzero(mask)
    return mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1]


def generate_dataset(out_dir: str | Path, *, num_images: int = 20, width: int = 128, height: int = 128,
                     chars_per_image: tuple[int, int] = (3, 8), font_size: tuple[int, int] = (18, 40),
                     font_path: str | None = None, charset: str = DEFAULT_CHARSET, seed: int = 0,
                     layout: str = "scatter", rotation: float = 0.0, tracking: tuple[float, float] | None = None,
                     progress: bool = False) -> GenerationSummary:
    """Render `num_images` pages of characters and their polygons.

    layout: "scatter" (single glyphs anywhere, never touching) or "lines" (lines of words in
    TRAINING_FONTS and Pillow's font, or only `font_path` when given; at most the drawn
    number of characters; each page rotated by up to `rotation` degrees either way, its glyphs
    outlined where they land; with `tracking` (MIN, MAX), each line's glyphs spaced by a share of
    its font size drawn from that range, instead of 0-2 px). Writes OUT_DIR/images/00001.png ... and
    OUT_DIR/annotations/00001.csv (char,polygon_json). Returns counts of what was written.
    """
    if not (1 <= num_images <= MAX_IMAGES and 8 <= width <= MAX_SIDE and 8 <= height <= MAX_SIDE):
        raise CharsegError(f"need 1 to {MAX_IMAGES} images of 8x8 to {MAX_SIDE}x{MAX_SIDE} pixels, got {num_images} "
                           f"of {width}x{height}")
    lo, hi = chars_per_image
    if not 1 <= lo <= hi <= MAX_CHARS:
        raise CharsegError(f"chars per image must be 1 <= min <= max <= {MAX_CHARS}, got {lo}-{hi}")
    if not 4 <= font_size[0] <= font_size[1] <= MAX_FONT_SIZE:
        raise CharsegError(f"font size must be 4 <= min <= max <= {MAX_FONT_SIZE}, got {font_size[0]}-{font_size[1]}")
    if layout not in LAYOUTS:
        raise CharsegError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    if not 0 <= rotation <= MAX_ROTATION or (rotation and layout != "lines"):
        raise CharsegError(f"rotation must be 0 to {MAX_ROTATION:g} degrees, and only with --layout lines; "
                           f"got {rotation:g} with {layout}")
    check_tracking(tracking, layout)
    out = Path(out_dir)
    rng = random.Random(seed)
    fonts = _FontCache([font_path] if font_path else [None, *font_files(TRAINING_FONTS)])
    render = _render_page if layout == "scatter" else functools.partial(_render_lines, rotation=rotation,
                                                                          tracking=tracking)
    total = 0
    indices = range(1, num_images + 1)
    if progress:
        from tqdm import tqdm
        indices = tqdm(indices, desc="generating", unit="image")
    for index in indices:
        page, rows = render(rng, width, height, count=(lo, hi), font_size=font_size, fonts=fonts, charset=charset)
        write_page(out, f"{index:05d}", page, rows)
        total += len(rows)
    return GenerationSummary(out_dir=out, images=num_images, characters=total)


def check_tracking(tracking: tuple[float, float] | None, layout: str) -> None:
    """Refuse a tracking range outside TRACKING_LIMITS, reversed, or for the scatter layout."""
    if tracking is None:
        return
    lo, hi = tracking
    if layout != "lines" or not TRACKING_LIMITS[0] <= lo <= hi <= TRACKING_LIMITS[1]:
        raise CharsegError(f"tracking must be {TRACKING_LIMITS[0]:g} <= min <= max <= {TRACKING_LIMITS[1]:g} "
                           f"(a share of the font size), and only with --layout lines; got {lo:g} {hi:g} with {layout}")


def sample_page(width: int, height: int, seed: int = 0) -> np.ndarray:
    """One page of the `lines` layout (HxWx3 uint8), without files: an example input (export
    traces the model on it)."""
    fonts = _FontCache([None, *font_files(TRAINING_FONTS)])
    page, _ = _render_lines(random.Random(seed), width, height, count=(40, 80), font_size=(12, 30), fonts=fonts,
                            charset=DEFAULT_CHARSET)
    return page


class _FontCache:
    """Loaded fonts by (file, pixel size); `paths[0]` is the scatter layout's font (None:
    Pillow's bundled one), the lines layout chooses among all."""

    def __init__(self, paths: list[str | None]):
        self.paths, self.fonts = paths, {}

    def __call__(self, size: int, path: str | None = None) -> ImageFont.FreeTypeFont:
        path = path if path is not None else self.paths[0]
        if (path, size) not in self.fonts:
            self.fonts[path, size] = load_font(path, size)
        return self.fonts[path, size]


def _render_page(rng: random.Random, width: int, height: int, *, count: tuple[int, int],
                 font_size: tuple[int, int], fonts: _FontCache, charset: str) -> tuple[np.ndarray, list[tuple]]:
    """One page: a flat background with up to `count` characters that never touch.
    Returns (HxWx3 uint8 page, [(char, polygon JSON), ...])."""
    background = tuple(rng.randint(170, 255) for _ in range(3))
    page = np.empty((height, width, 3), dtype=np.uint8)
    page[:] = background
    occupied = np.zeros((height, width), dtype=bool)
    rows, misses = [], 0
    for _ in range(rng.randint(*count)):
        size = rng.randint(*font_size)
        char = rng.choice(charset)
        glyph = _render_glyph(char, fonts(size))
        if glyph is None or glyph.shape[0] >= height or glyph.shape[1] >= width:
            continue
        place = _free_place(rng, occupied, glyph.shape)
        misses = 0 if place is not None else misses + 1
        if misses >= MAX_MISSES:
            break  # the page is full
        if place is None:
            continue
        x, y = place
        gh, gw = glyph.shape
        occupied[y:y + gh, x:x + gw] |= glyph
        color = tuple(rng.randint(0, 90) for _ in range(3))
        page[y:y + gh, x:x + gw][glyph] = color
        outline = glyph_outline(glyph)
        if outline is not None:
            rows.append((char, json.dumps(flat_polygon(outline + np.array([x, y], dtype=np.float32)))))
    return page, rows


def _free_place(rng: random.Random, occupied: np.ndarray, shape: tuple[int, int],
                attempts: int = 30) -> tuple[int, int] | None:
    """A random top-left (x, y) where a glyph of `shape` keeps one pixel from every other
    (so outlines of neighbours never touch); None after `attempts` misses."""
    gh, gw = shape
    height, width = occupied.shape
    for _ in range(attempts):
        x, y = rng.randint(0, width - gw), rng.randint(0, height - gh)
        if not occupied[max(y - 1, 0):y + gh + 1, max(x - 1, 0):x + gw + 1].any():
            return x, y
    return None


def _render_lines(rng: random.Random, width: int, height: int, *, count: tuple[int, int],
                  font_size: tuple[int, int], fonts: _FontCache, charset: str, rotation: float = 0.0,
                  tracking: tuple[float, float] | None = None) -> tuple[np.ndarray, list[tuple]]:
    """Lines of words, each line in one font, size and ink (from black to faint gray), glyph
    by glyph with anti-aliased edges on an unevenly lit, tinted, noisy paper, the page rotated
    by up to `rotation` degrees; a glyph's polygon outlines its pixels (glyph_polygon) where
    it lands; glyphs `tracking` x the font size apart, plus up to a pixel (without it 0-2 px). Stops at
    the drawn number of characters or the page's end."""
    paper = rng.uniform(150, 255)
    page = _paper(rng, width, height, paper)
    budget, drawn = rng.randint(*count), []  # (glyph, its polygon on the upright page)
    y = rng.randint(0, 8)
    while len(drawn) < budget:
        font = fonts(rng.randint(*font_size), rng.choice(fonts.paths))
        ascent, descent = font.getmetrics()
        if y + ascent + descent > height:
            break
        ink = np.array([rng.uniform(0, paper - MIN_INK_CONTRAST)] * 3, dtype=np.float32)
        spacing = rng.uniform(*tracking) * font.size if tracking else 0.0  # no draw without it: the same pages
        x = rng.uniform(0, font.size)
        while len(drawn) < budget:
            char = " " if rng.random() < 0.15 else rng.choice(charset)
            advance = max(1.0, font.getlength(char) + spacing + rng.uniform(0, 1)) if tracking else (
                font.getlength(char) + rng.uniform(0, 2))
            if x + advance > width:
                break
            placed = _draw_glyph(page, char, font, x, y, ink)
            polygon = glyph_polygon(placed) if placed is not None else None
            if polygon is not None:
                drawn.append((placed, polygon))
            x += advance
        y += ascent + descent + rng.randint(0, 6)
    if rotation:  # each glyph outlined again where it lands
        page, matrix = rotate_page(page, rng.uniform(-rotation, rotation))
        drawn = [(glyph, glyph_polygon(glyph.moved(matrix))) for glyph, _ in drawn]
    rows = [(glyph.char, json.dumps(flat_polygon(polygon))) for glyph, polygon in drawn
            if polygon is not None and on_page(polygon, width, height)]
    noise = np.random.default_rng(rng.getrandbits(32)).normal(0, rng.uniform(0, 6), page.shape)
    return np.clip(page + noise, 0, 255).round().astype(np.uint8), rows


def glyph_polygon(glyph: Glyph) -> np.ndarray | None:
    """A glyph's polygon in page coordinates: the outline of its pixels (polygons.glyph_mask),
    or None for a speck under MIN_GLYPH_AREA."""
    outline = glyph_outline(glyph_mask(glyph.coverage))
    if outline is None or polygon_area(outline) < MIN_GLYPH_AREA:
        return None
    return outline + np.array([glyph.x, glyph.y], dtype=np.float32)


def _paper(rng: random.Random, width: int, height: int, level: float) -> np.ndarray:
    """HxWx3 float paper around gray `level`: a tint, light falling off across the page and
    blotches (smoothed noise of a random grain), as scanned or photographed pages have."""
    generator = np.random.default_rng(rng.getrandbits(32))
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32) / max(width, height)
    falloff = (xs - rng.random()) * rng.uniform(-15, 15) + (ys - rng.random()) * rng.uniform(-15, 15)
    grain = rng.uniform(3, 20)
    blotches = cv2.GaussianBlur(generator.normal(0, 1, (height, width)).astype(np.float32), (0, 0), grain)
    blotches *= rng.uniform(0, 12) / max(float(blotches.std()), 1e-6)
    tint = np.array([rng.uniform(-10, 10) for _ in range(3)], dtype=np.float32)
    return np.clip((level + falloff + blotches)[:, :, None] + tint, 0, 255)


def _draw_glyph(page: np.ndarray, char: str, font: ImageFont.FreeTypeFont, x: float, y: int,
                ink: np.ndarray) -> Glyph | None:
    """Blend one anti-aliased glyph into `page` with its origin at (x, y); returns it (its
    coverage where it was drawn), or None when it falls off the page."""
    left, top, right, bottom = font.getbbox(char)
    if right <= left or bottom <= top:
        return None
    ox, oy = int(np.floor(x)) + left, y + top
    canvas = Image.new("L", (right - left, bottom - top), 0)
    ImageDraw.Draw(canvas).text((x - np.floor(x) - left, -top), char, fill=255, font=font)
    coverage = np.asarray(canvas, dtype=np.float32) / 255.0
    height, width = page.shape[:2]
    h, w = min(coverage.shape[0], height - oy), min(coverage.shape[1], width - ox)
    if h <= 0 or w <= 0 or ox < 0 or oy < 0:
        return None
    coverage = coverage[:h, :w]
    page[oy:oy + h, ox:ox + w] = page[oy:oy + h, ox:ox + w] * (1 - coverage[:, :, None]) + ink * coverage[:, :, None]
    return Glyph(char, coverage, ox, oy)


def write_page(out: Path, name: str, page: np.ndarray, rows: list[tuple]) -> None:
    """Save one page as OUT/images/NAME.png and its rows (char, polygon JSON) as OUT/annotations/NAME.csv."""
    (out / "images").mkdir(parents=True, exist_ok=True)
    Image.fromarray(page).save(out / "images" / f"{name}.png")
    write_annotation(out / "annotations" / f"{name}.csv", rows)
