"""How good can a box-sized mask be? The ceiling of charseg's mask representation on real pages.

    python bench/mask_ceiling.py DATA_DIR [--pages 20] [--model CHECKPOINT]

For each annotated character of DATA_DIR (e.g. `charseg generate --held-out`), takes the mask a
perfect mask head would predict: the character's own polygon rasterised into its box at the
head's resolution (polygon_mask_targets, as training's targets), with the box exact or moved
by up to 0.5 or 1 px per side (as predicted boxes are). Traces it back to an outline as
inference does (box_mask_to_polygon) and scores it against the annotation with pycocotools'
mask IoU, the IoU COCO's segm AP counts. Prints, per box error and resolution, the median
IoU and the share of characters at IoU >= 0.75 and >= 0.9. With --model, the same for that
model's own masks (each character's best-overlapping instance at score >= 0.5, fp32), by
character height. Used in docs/FROM_SCRATCH.md to tell what limits AP75: the representation,
or the model. A script, not a test.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from charseg.data.dataset import scan_dataset  # noqa: E402
from charseg.polygons import box_mask_to_polygon, polygon_boxes, polygon_mask_targets  # noqa: E402


def ceiling_ious(samples: list, size: int, box_error: float, rng: np.random.Generator) -> np.ndarray:
    """Each character's mask IoU after the round trip polygon -> SIZE x SIZE mask -> outline."""
    ious = []
    for sample in samples:
        boxes = polygon_boxes(sample.polygons).astype(np.float32)
        boxes += rng.uniform(-box_error, box_error, boxes.shape).astype(np.float32)
        for points, box, mask in zip(sample.polygons, boxes, polygon_mask_targets(sample.polygons, boxes, size, 0.0)):
            outline = box_mask_to_polygon(mask, box, 0.5, bounds=(sample.width, sample.height))
            if not outline:
                ious.append(0.0)
                continue
            found = mask_utils.frPyObjects([outline], sample.height, sample.width)
            truth = mask_utils.frPyObjects([points.reshape(-1).tolist()], sample.height, sample.width)
            ious.append(float(mask_utils.iou(found, truth, [0])[0][0]))
    return np.array(ious)


def model_ious(checkpoint: str, samples: list) -> tuple[np.ndarray, np.ndarray]:
    """Each character's best mask IoU among the model's instances, and its height in px."""
    import torch

    from charseg.data.images import load_image_rgb
    from charseg.inference.predict import load_model_for_inference, predict_arrays

    model, _, _ = load_model_for_inference(checkpoint, torch.device("cpu"))
    ious, heights = [], []
    for sample in samples:
        found = predict_arrays(model, [load_image_rgb(sample.image_path)], torch.device("cpu"), 0.5)[0]
        truth = mask_utils.frPyObjects([p.reshape(-1).tolist() for p in sample.polygons], sample.height, sample.width)
        best = np.zeros(len(truth))
        if found:
            masks = mask_utils.frPyObjects([i.polygon for i in found], sample.height, sample.width)
            best = np.asarray(mask_utils.iou(masks, truth, [0] * len(truth))).max(axis=0)
        ious += list(best)
        heights += [float(np.ptp(p[:, 1])) for p in sample.polygons]
    return np.array(ious), np.array(heights)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data_dir")
    parser.add_argument("--pages", type=int, default=20, help="Pages of DATA_DIR to use.")
    parser.add_argument("--model", help="Also a checkpoint's own masks, by character height.")
    args = parser.parse_args()
    samples = scan_dataset(args.data_dir).samples[:args.pages]
    print("| box error (px, each side) | mask | characters | median IoU | IoU >= 0.75 | IoU >= 0.9 |")
    print("| --- | --- | --- | --- | --- | --- |")
    for box_error in (0.0, 0.5, 1.0):
        for size in (28, 56):
            ious = ceiling_ious(samples, size, box_error, np.random.default_rng(0))
            print(f"| {box_error:g} | {size}x{size} | {len(ious)} | {np.median(ious):.3f} | {np.mean(ious >= 0.75):.3f} "
                  f"| {np.mean(ious >= 0.9):.3f} |")

    if args.model:
        ious, heights = model_ious(args.model, samples)
        print(f"\n{args.model}: its masks\n\n| character height (px) | characters | median IoU | IoU >= 0.75 |")
        print("| --- | --- | --- | --- |")
        for low, high in ((0, 10), (10, 15), (15, 20), (20, 99), (0, 99)):
            chosen = (heights >= low) & (heights < high)
            if chosen.any():
                print(f"| {low}-{high} | {chosen.sum()} | {np.median(ious[chosen]):.3f} | "
                      f"{np.mean(ious[chosen] >= 0.75):.3f} |")


if __name__ == "__main__":
    main()
