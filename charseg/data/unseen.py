"""Held-out pages of a second kind: type nothing else here renders, on backgrounds nothing else
here draws, to measure how far a model generalises (issue 29's second set).

The fonts come from free font families on PyPI that neither the training generator nor
`--held-out` uses (`pip install 'charseg[fonts]'`): sans (Roboto, Source Sans, Hanken
Grotesk, Manrope), serif (Source Serif, Caladea), rounded display (Fredoka One),
handwriting-like (Amatic SC, Intuitive). A family is drawn first, then one of its files, so a
family of twenty weights counts as much as one of a single face. Lines may also be condensed,
cut as stencils or distressed (ink worn away in blobs), in coloured ink; the page is paper,
a printed pattern (stripes, checks, dots, a grid) or a faded photograph (matplotlib's sample
images and terrain). The page is then rotated, blurred, noised and sometimes JPEG-compressed,
and annotated as `--held-out` pages are: each glyph's outer outline on its ink's edges (the
hull of its parts when a cut or wear splits it), simplified as an annotator would.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import random
from pathlib import Path

import cv2
import numpy as np
from PIL import ImageFont

from ..errors import CharsegError
from ..polygons import flat_polygon
from .generate import GenerationSummary, write_page
from .heldout import FONT_SIZES, _background, _degrade, check_pages, rotate_and_annotate, typeset_page

# Font packages (import names) of the `fonts` extra; each ships its faces in PACKAGE/files/.
FONT_PACKAGES = ("font_roboto", "font_source_sans_pro", "font_hanken_grotesk", "font_manrope", "font_source_serif_pro",
                 "font_caladea", "font_fredoka_one", "font_amatic_sc", "font_intuitive")
INSTALL_FONTS = "pip install 'charseg[fonts]'"
LINE_STYLES = ("plain", "condensed", "stencil", "worn", "colour")  # what _line_style may do to a line
# Pictures matplotlib ships (mpl-data/sample_data): photographs, and terrain drawn as hill shading.
PHOTOS = ("grace_hopper.jpg", "Minduka_Present_Blue_Pack.png")
TERRAIN = ("topobathy.npz", "jacksboro_fault_dem.npz")


def font_families() -> dict[str, list[str]]:
    """Font files (.ttf, else .otf of the same name) of each installed FONT_PACKAGES family."""
    families = {}
    for package in FONT_PACKAGES:
        spec = importlib.util.find_spec(package)
        if spec is None or spec.origin is None:
            continue
        faces: dict[str, Path] = {}
        for path in sorted((Path(spec.origin).parent / "files").glob("*.[ot]tf")):
            if path.stem not in faces or path.suffix == ".ttf":
                faces[path.stem] = path
        if faces:
            families[package] = [str(p) for p in faces.values()]
    return families


def generate_unseen(out_dir: str | Path, *, num_images: int = 40, min_side: int = 128, max_side: int = 256,
                    seed: int = 0, progress: bool = False, families: tuple[str, ...] = FONT_PACKAGES,
                    line_style: str | None = None) -> GenerationSummary:
    """Render `num_images` pages (sides from min_side to max_side) in the font packages' faces
    into OUT_DIR in the dataset format. Returns counts of what was written. To see what a model
    misses (bench/unseen_breakdown.py): FAMILIES, some of FONT_PACKAGES only; LINE_STYLE, every
    line drawn in one of LINE_STYLES instead of the random mix."""
    check_pages(num_images, min_side, max_side)
    if not set(families) <= set(FONT_PACKAGES) or not families or line_style not in (None, *LINE_STYLES):
        raise CharsegError(f"families must be some of {', '.join(FONT_PACKAGES)} and the line style one of "
                           f"{', '.join(LINE_STYLES)}; got {families} and {line_style!r}")
    installed = font_families()
    if len(installed) < len(FONT_PACKAGES):
        missing = ", ".join(p.replace("_", "-") for p in FONT_PACKAGES if p not in installed)
        raise CharsegError(f"pages in unseen fonts need the font packages {missing}: {INSTALL_FONTS}")
    faces = {name: installed[name] for name in families}
    style = functools.partial(_line_style, forced=line_style)
    rng, out, total = random.Random(seed), Path(out_dir), 0
    indices = range(1, num_images + 1)
    if progress:
        from tqdm import tqdm
        indices = tqdm(indices, desc="unseen-font pages", unit="image")
    for index in indices:
        width, height = rng.randint(min_side, max_side), rng.randint(min_side, max_side)
        page = rng.choice((_background, _pattern, _photo))(rng, width, height)
        page, glyphs = typeset_page(rng, page, lambda r: ImageFont.truetype(
            r.choice(faces[r.choice(sorted(faces))]), r.randint(*FONT_SIZES)), style)
        page, polygons, chars = rotate_and_annotate(page, glyphs, rng.uniform(-6, 6))
        page = _compress(rng, _degrade(rng, page))
        write_page(out, f"{index:05d}", page, [(c, json.dumps(flat_polygon(p))) for c, p in zip(chars, polygons)])
        total += len(polygons)
    return GenerationSummary(out_dir=out, images=num_images, characters=total)


def _line_style(rng: random.Random, line: np.ndarray, placed: list, ink: np.ndarray, forced: str | None = None
                ) -> tuple[np.ndarray, list, np.ndarray]:
    """Condensed (a third of the lines), stencil-cut (a fifth) or worn (a fifth), in a dark
    colour (half) or the gray ink typeset_page chose: the line's coverage and each glyph's
    coverage change together, so the outlines follow what is drawn. FORCED (one of
    LINE_STYLES): that style only, on every line (the dice are drawn all the same)."""

    def drawn(style: str, chance: float) -> bool:
        roll = rng.random()
        return forced == style if forced else roll < chance

    glyphs = [coverage for _, coverage in placed]
    if drawn("condensed", 1 / 3):  # condensed to 60-85 % of its width
        factor = rng.uniform(0.6, 0.85)
        line, glyphs = _squeeze(line, factor), [_squeeze(glyph, factor) for glyph in glyphs]
    kept = np.ones(line.shape, dtype=bool)
    if drawn("stencil", 0.2):  # vertical cuts through each glyph's middle
        cut = max(1, round(line.shape[0] / 14))
        for glyph in glyphs:
            columns = np.flatnonzero((glyph >= 128).any(axis=0))
            if columns.size > 2 * cut:
                middle = (columns[0] + columns[-1]) // 2
                kept[:, middle:middle + cut] = False
    if drawn("worn", 0.2):  # blobs of ink about a stroke wide gone
        noise = np.random.default_rng(rng.getrandbits(32)).normal(0, 1, line.shape).astype(np.float32)
        kept &= cv2.GaussianBlur(noise, (0, 0), 1.2) < rng.uniform(0.15, 0.3)
    line = np.where(kept, line, 0).astype(np.uint8)
    placed = [(char, np.where(kept, glyph, 0).astype(np.uint8)) for (char, _), glyph in zip(placed, glyphs)]
    placed = [(char, glyph) for char, glyph in placed if (glyph >= 128).sum() >= 4]
    if drawn("colour", 0.5):
        ink = np.array([rng.uniform(0, 140) for _ in range(3)], dtype=np.float32)
    return line, placed, ink


def _squeeze(image: np.ndarray, factor: float) -> np.ndarray:
    """IMAGE (H x W uint8) narrowed to FACTOR of its width from its left edge, zero-padded."""
    height, width = image.shape
    narrow = cv2.resize(image, (max(1, round(width * factor)), height), interpolation=cv2.INTER_AREA)
    out = np.zeros_like(image)
    out[:, :narrow.shape[1]] = narrow
    return out


def _pattern(rng: random.Random, width: int, height: int) -> np.ndarray:
    """A light page printed with stripes, checks, dots or a grid in a colour, at any angle."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    angle, period = rng.uniform(0, math.pi), rng.uniform(6, 40)
    u = (xs * math.cos(angle) + ys * math.sin(angle)) * 2 * math.pi / period
    v = (-xs * math.sin(angle) + ys * math.cos(angle)) * 2 * math.pi / period
    kind = rng.choice(("stripes", "checks", "dots", "grid"))
    if kind == "stripes":
        printed = np.sin(u) > 0
    elif kind == "checks":
        printed = (np.sin(u) > 0) ^ (np.sin(v) > 0)
    elif kind == "dots":
        printed = np.sin(u) * np.sin(v) > 0.6
    else:
        printed = (np.abs(np.sin(u / 2)) < 0.08) | (np.abs(np.sin(v / 2)) < 0.08)
    paper = np.array([rng.uniform(200, 250) for _ in range(3)], dtype=np.float32)
    colour = np.array([rng.uniform(20, 80) for _ in range(3)], dtype=np.float32)
    return paper - printed[:, :, None].astype(np.float32) * colour


def _photo(rng: random.Random, width: int, height: int) -> np.ndarray:
    """A faded crop of a photograph or of hill-shaded terrain, resized to the page."""
    import matplotlib.cbook

    name = rng.choice(PHOTOS + TERRAIN)
    path = matplotlib.cbook.get_sample_data(name, asfileobj=False)
    if name in TERRAIN:
        with np.load(path) as data:
            elevation = data["elevation" if "elevation" in data.files else "topo"].astype(np.float32)
            picture = np.repeat(_hillshade(elevation)[:, :, None], 3, axis=2)
    else:
        picture = cv2.imread(str(path), cv2.IMREAD_COLOR)[:, :, ::-1]
    side = rng.uniform(0.3, 1.0) * min(picture.shape[:2])
    top, left = rng.uniform(0, picture.shape[0] - side), rng.uniform(0, picture.shape[1] - side * width / max(height, 1))
    crop = picture[int(top):int(top + side), max(0, int(left)):int(left + side * width / max(height, 1))]
    crop = cv2.resize(np.ascontiguousarray(crop), (width, height), interpolation=cv2.INTER_AREA).astype(np.float32)
    fade = rng.uniform(0.25, 0.55)  # how much of the picture's darkness is left: the ink must stay legible
    return 255.0 - (255.0 - crop) * fade


def _hillshade(elevation: np.ndarray) -> np.ndarray:
    """Terrain lit from the north-west, 0-255."""
    dy, dx = np.gradient(elevation / max(float(np.ptp(elevation)), 1e-6) * 50)
    shade = (dx - dy) / np.sqrt(1 + dx ** 2 + dy ** 2)
    return np.clip(128 + 127 * shade / max(float(np.abs(shade).max()), 1e-6), 0, 255)


def _compress(rng: random.Random, page: np.ndarray) -> np.ndarray:
    """Half of the pages saved as JPEG at quality 40-90 and read back, as scans and photos are."""
    if rng.random() < 0.5:
        return page
    ok, data = cv2.imencode(".jpg", page[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, rng.randint(40, 90)])
    return cv2.imdecode(data, cv2.IMREAD_COLOR)[:, :, ::-1].copy() if ok else page
