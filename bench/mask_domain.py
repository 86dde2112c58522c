"""Where do a model's masks lose on held-out pages? Its masks on exact boxes, part of the held-out process at a time.

    python bench/mask_domain.py CHECKPOINT [--pages 40] [--seed 2026]

Boxes and masks are measured apart: each annotated character's exact box (its polygon's
extent) goes through the model's mask head, and the mask traced back as inference does is
scored against the annotation with pycocotools' mask IoU. The held-out pages
(`charseg generate --held-out`, charseg/data/heldout.py) are made again with one of their
steps switched off at a time (rotation; blur and noise; the annotator's Douglas-Peucker
simplification; textured paper), all of them, and all of them in the training generator's
fonts; next to them, the training generator's own pages (`--layout lines`, seed 77), plain
and rotated as `--augment` rotates. Also: how far the two ways of annotating a rotated glyph
part (its upright outline turned, or its outline on the rotated page), and how many glyphs
half coverage alone splits into pieces. Prints, per variant, the characters, the median mask IoU
and the shares at IoU >= 0.75 and >= 0.5, and on the held-out pages the same by character
height and for annotations that are convex (hulls of glyphs in parts, and round glyphs).
Used in docs/FROM_SCRATCH.md to find what separates held-out masks from the model's own
domain. A script, not a test: run it alone.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import ImageFont
from pycocotools import mask as mask_utils

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from charseg.data import heldout  # noqa: E402
from charseg.data.augment import warp_page  # noqa: E402
from charseg.data.dataset import Sample, scan_dataset  # noqa: E402
from charseg.data.generate import TRAINING_FONTS, font_files, generate_dataset, write_page  # noqa: E402
from charseg.data.images import load_image_rgb  # noqa: E402
from charseg.data.loading import image_to_tensor  # noqa: E402
from charseg.inference.predict import load_model_for_inference  # noqa: E402
from charseg.polygons import box_mask_to_polygon, flat_polygon, polygon_area, polygon_boxes  # noqa: E402

VARIANTS = {  # name: the held-out steps switched off
    "held-out pages": (),
    "no rotation": ("rotation",),
    "no blur or noise": ("degrade",),
    "no simplified polygons": ("simplify",),
    "plain paper": ("texture",),
    "none of these": ("rotation", "degrade", "simplify", "texture"),
    "none of these, training fonts": ("rotation", "degrade", "simplify", "texture", "fonts"),
}
OWN_PAGES = 30


def heldout_variant(out: Path, off: tuple[str, ...], pages: int, seed: int) -> None:
    """Held-out pages as charseg/data/heldout.generate_heldout makes them, less the steps OFF
    (the same random draws, so the same text, sizes and angles)."""
    fonts = font_files(TRAINING_FONTS if "fonts" in off else heldout.HELDOUT_FONTS)
    tolerance = heldout.ANNOTATION_TOLERANCE
    heldout.ANNOTATION_TOLERANCE = 0.01 if "simplify" in off else tolerance
    try:
        rng = random.Random(seed)
        for index in range(1, pages + 1):
            width, height = rng.randint(128, 256), rng.randint(128, 256)
            paper = heldout._background(rng, width, height)
            if "texture" in off:
                paper = np.full_like(paper, 235.0)
            page, glyphs = heldout.typeset_page(
                rng, paper, lambda r: ImageFont.truetype(r.choice(fonts), r.randint(*heldout.FONT_SIZES)))
            degrees = rng.uniform(-heldout.MAX_ROTATION, heldout.MAX_ROTATION)
            page, polygons, chars = heldout.rotate_and_annotate(page, glyphs, 0.0 if "rotation" in off else degrees)
            degraded = heldout._degrade(rng, page)  # drawn either way: later pages keep their draws
            page = np.clip(page, 0, 255).round().astype(np.uint8) if "degrade" in off else degraded
            write_page(out, f"{index:05d}", page, [(c, json.dumps(flat_polygon(p))) for c, p in zip(chars, polygons)])
    finally:
        heldout.ANNOTATION_TOLERANCE = tolerance


def rotated_copy(samples: list[Sample], out: Path, seed: int) -> None:
    """SAMPLES rotated by up to +-12 degrees, polygons with them, as `--augment` warps a page."""
    rng = random.Random(seed)
    for sample in samples:
        rgb = load_image_rgb(sample.image_path)
        matrix = cv2.getRotationMatrix2D(((sample.width - 1) / 2, (sample.height - 1) / 2), rng.uniform(-12, 12), 1.0)
        page, polygons = warp_page(rgb, list(sample.polygons), matrix)
        write_page(out, sample.name, page, [("x", json.dumps(flat_polygon(p))) for p in polygons])


@torch.no_grad()
def exact_box_ious(model: torch.nn.Module, samples: list[Sample]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each character's mask IoU with its mask predicted in its exact box; its height; whether
    its annotation is convex."""
    ious, heights, convex = [], [], []
    for sample in samples:
        boxes = torch.from_numpy(polygon_boxes(sample.polygons).astype(np.float32))
        images, targets = model.transform([image_to_tensor(load_image_rgb(sample.image_path))],
                                          [{"boxes": boxes, "labels": torch.ones(len(boxes), dtype=torch.int64)}])
        features = model.backbone(images.tensors)
        logits = model.roi_heads.mask_logits(features, [targets[0]["boxes"]], images.image_sizes)
        probs = logits[:, -1].sigmoid().numpy()
        truth = mask_utils.frPyObjects([p.reshape(-1).tolist() for p in sample.polygons], sample.height, sample.width)
        for k, (prob, box, points) in enumerate(zip(probs, boxes.numpy(), sample.polygons)):
            outline = box_mask_to_polygon(prob, box, 0.5, bounds=(sample.width, sample.height))
            found = mask_utils.frPyObjects([outline], sample.height, sample.width) if outline else None
            ious.append(float(mask_utils.iou(found, [truth[k]], [0])[0][0]) if found else 0.0)
            heights.append(float(np.ptp(points[:, 1])))
            hull = cv2.convexHull(points.astype(np.float32)).reshape(-1, 2)
            convex.append(polygon_area(hull) - polygon_area(points) < 0.02 * polygon_area(points))
    return np.array(ious), np.array(heights), np.array(convex)


def staircase_ious(sizes=(12, 16, 22, 30), glyphs: str = "aemWXkS5B", seed: int = 0) -> dict[int, float]:
    """By font size: the median IoU between two annotations of a glyph on a page rotated by
    6-10 degrees: its upright outline turned with the page (what --augment and the held-out
    pages did until 2026-12-06) and its outline on the rotated page's pixels (Glyph.moved)."""
    from PIL import Image, ImageDraw

    from charseg.data.generate import Glyph, glyph_polygon, rotate_page
    from charseg.polygons import polygons_to_masks, warp_points

    rng, medians = random.Random(seed), {}
    for size in sizes:
        ious = []
        for path in font_files(TRAINING_FONTS):
            font = ImageFont.truetype(path, size)
            for char in glyphs:
                side = 3 * size
                canvas = Image.new("L", (side, side), 0)
                ImageDraw.Draw(canvas).text((size, size // 2), char, fill=255, font=font)
                upright = Glyph(char, np.asarray(canvas, dtype=np.float32) / 255.0, 0, 0)
                _, matrix = rotate_page(upright.coverage, rng.choice((-10, -6, 6, 10)))
                turned, outlined = warp_points(glyph_polygon(upright), matrix), glyph_polygon(upright.moved(matrix))
                a, b = (polygons_to_masks([p], side, side)[0].numpy().astype(bool) for p in (turned, outlined))
                ious.append((a & b).sum() / (a | b).sum())
        medians[size] = float(np.median(ious))
    return medians


def split_shares(fonts: tuple[str, ...], sizes: tuple[int, int], glyphs: str) -> float:
    """Share of GLYPHS in FONTS at SIZES px that half coverage alone splits into more parts than
    the glyph has drawn at 4x (whose convex hull, a blob, was their polygon until 2026-12-06)."""
    from PIL import Image, ImageDraw

    def parts(coverage: np.ndarray) -> int:
        return cv2.connectedComponents((coverage >= 128).astype(np.uint8), connectivity=8)[0] - 1

    split = total = 0
    for path in font_files(fonts):
        for size in range(*sizes):
            small, large = ImageFont.truetype(path, size), ImageFont.truetype(path, 4 * size)
            for char in glyphs:
                drawn = []
                for font, scale in ((small, 1), (large, 4)):
                    canvas = Image.new("L", (3 * size * scale, 3 * size * scale), 0)
                    ImageDraw.Draw(canvas).text((size * scale, size * scale), char, fill=255, font=font)
                    drawn.append(parts(np.asarray(canvas)))
                split += drawn[0] > drawn[1]
                total += 1
    return split / total


def row(name: str, ious: np.ndarray) -> str:
    return (f"| {name} | {len(ious)} | {np.median(ious):.3f} | {np.mean(ious >= 0.75):.3f} | "
            f"{np.mean(ious >= 0.5):.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="A model to measure (e.g. bench/quality.py --keep-model's).")
    parser.add_argument("--pages", type=int, default=40, help="Held-out pages per variant.")
    parser.add_argument("--seed", type=int, default=2026, help="The held-out pages' seed (bench/quality.py's).")
    args = parser.parse_args()
    model, _, _ = load_model_for_inference(args.checkpoint, torch.device("cpu"))
    print("| pages | characters | median mask IoU | IoU >= 0.75 | IoU >= 0.5 |\n| --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        measured = {}
        for name, off in VARIANTS.items():
            heldout_variant(tmp / name, off, args.pages, args.seed)
            measured[name] = exact_box_ious(model, scan_dataset(tmp / name).samples)
            print(row(name, measured[name][0]), flush=True)
        generate_dataset(tmp / "own", num_images=OWN_PAGES, width=192, height=192, chars_per_image=(10, 80),
                         font_size=(12, 30),
                         seed=77, layout="lines")
        own = scan_dataset(tmp / "own").samples
        print(row("training generator's pages", exact_box_ious(model, own)[0]))
        rotated_copy(own, tmp / "own rotated", seed=5)
        print(row("the same, rotated", exact_box_ious(model, scan_dataset(tmp / "own rotated").samples)[0]))
    print("\nTwo annotations of a glyph on a rotated page: the upright outline turned vs the outline of the "
          "turned glyph\n\n| font size (px) | median IoU |\n| --- | --- |")
    for size, median in staircase_ious().items():
        print(f"| {size} | {median:.3f} |")
    letters = "".join(c for c in heldout.CHARSET if c not in "ij")
    print("\nGlyphs that half coverage splits (their polygon was the hull of the pieces until 2026-12-06)\n\n"
          "| fonts | 12-15 px | 16-21 px | 22-30 px |\n| --- | --- | --- | --- |")
    for name, fonts in (("training", TRAINING_FONTS), ("held-out", heldout.HELDOUT_FONTS)):
        shares = [split_shares(fonts, sizes, letters) for sizes in ((12, 16), (16, 22), (22, 31))]
        print(f"| {name} | " + " | ".join(f"{share:.1%}" for share in shares) + " |")
    ious, heights, convex = measured["held-out pages"]
    print("\nHeld-out pages by character height and annotation\n")
    print("| characters | characters | median mask IoU | IoU >= 0.75 | IoU >= 0.5 |\n| --- | --- | --- | --- | --- |")
    for low, high in ((0, 10), (10, 15), (15, 20), (20, 999)):
        chosen = (heights >= low) & (heights < high)
        print(row(f"{low}-{high} px tall" if high < 999 else f"{low} px and taller", ious[chosen]))
    print(row("convex annotation", ious[convex]))
    print(row("other annotations", ious[~convex]))


if __name__ == "__main__":
    main()
