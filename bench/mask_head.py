"""Can a mask head learn glyph shapes from the pixels alone? The mask half of Mask R-CNN, isolated.

    python bench/mask_head.py TRAIN_DIR HELDOUT_DIR [--dilations 2,4,8,1 | --dilations none] [--steps 300]

Trains charseg's PixelMaskPredictor with its deep features zeroed, so it sees only the pixels
inside each box: boxes are the training characters' boxes moved by up to 15% of their size (as
proposals are), targets are rasterised from the polygons as in training (polygon_mask_targets),
pages are augmented as `--augment` does. Every 100 steps it prints, on the held-out pages'
characters (boxes moved by up to 5%): the mask loss, the mean mask IoU and the share of
characters whose mask reaches IoU 0.5 (what segm AP50 counts), next to the IoU of the whole
box taken as the mask. Used in docs/FROM_SCRATCH.md to choose the pixel refine's dilations and
to find that the training polygons did not fit their glyphs. A script, not a test.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from charseg.data.augment import Augmentation  # noqa: E402
from charseg.data.dataset import scan_dataset
from charseg.data.loading import CharacterDataset
from charseg.errors import CharsegError  # noqa: E402
from charseg.model.heads import PixelMaskPredictor  # noqa: E402
from charseg.polygons import polygon_mask_targets, unpack_polygons  # noqa: E402

MEAN = torch.tensor([0.485, 0.456, 0.406])[:, None, None]  # GeneralizedRCNNTransform's normalisation
STD = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
SIZE = 28  # the mask head's output


def boxes_and_targets(dataset, keys, rng: np.random.Generator, jitter: float, per_image: int = 32):
    """[(normalised image, moved boxes)], targets (N, 28, 28) for up to per_image characters a page."""
    batch, targets = [], []
    for key in keys:
        image, target, _ = dataset[key]
        polygons = unpack_polygons(target["polygon_points"], target["polygon_lengths"])
        if not polygons:
            continue
        chosen = rng.permutation(len(polygons))[:per_image]
        boxes = target["boxes"].numpy()[chosen]
        width, height = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        size = np.stack([width, height, width, height], axis=1)
        boxes = (boxes + rng.uniform(-jitter, jitter, boxes.shape) * size).astype(np.float32)
        batch.append((((image - MEAN) / STD)[None], torch.from_numpy(boxes)))
        targets.append(torch.from_numpy(polygon_mask_targets([polygons[i] for i in chosen], boxes, SIZE)))
    return batch, torch.cat(targets)


def logits(head: PixelMaskPredictor, batch) -> torch.Tensor:
    """The head's logits with its deep features zeroed: only the pixels inform it."""
    out = []
    for pixels, boxes in batch:
        features = torch.zeros(len(boxes), 1, SIZE // 2, SIZE // 2)
        out.append(head(features, pixels, [boxes])[:, 0])
    return torch.cat(out)


def report(prob_logits: torch.Tensor, targets: torch.Tensor) -> tuple[float, float, float]:
    predicted, truth = prob_logits > 0, targets > 0.5
    iou = (predicted & truth).sum((1, 2)).float() / (predicted | truth).sum((1, 2)).clamp(min=1)
    loss = F.binary_cross_entropy_with_logits(prob_logits, targets)
    return float(loss), float(iou.mean()), float((iou >= 0.5).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("train_dir", help="Training pages (charseg generate --layout lines).")
    parser.add_argument("heldout_dir", help="Held-out pages (charseg generate --held-out).")
    parser.add_argument("--dilations", default="2,4,8,1",
                        help="The refine's dilations, comma-separated; 'none' for two plain convolutions.")
    parser.add_argument("--steps", type=int, default=300, help="Training steps of 2 pages each.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of boxes, pages and weights.")
    args = parser.parse_args()
    dilations = () if args.dilations == "none" else tuple(int(d) for d in args.dilations.split(","))
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    train = CharacterDataset(scan_dataset(args.train_dir).samples, augment=Augmentation(), seed=args.seed)
    heldout = CharacterDataset(scan_dataset(args.heldout_dir).samples)
    held_batch, held_targets = boxes_and_targets(heldout, range(len(heldout)), rng, jitter=0.05, per_image=64)
    box_iou = float((held_targets > 0.5).float().mean((1, 2)).mean())
    print(f"{len(held_targets)} held-out characters; the whole box as the mask: IoU {box_iou:.3f}")
    head = PixelMaskPredictor(1, 1, 1, dilations=dilations)
    optimizer = torch.optim.AdamW(head.parameters(), 2e-3)
    start = time.time()
    for step in range(1, args.steps + 1):
        keys = [(int(i), step) for i in rng.integers(0, len(train), 2)]
        batch, targets = boxes_and_targets(train, keys, rng, jitter=0.15)
        loss = F.binary_cross_entropy_with_logits(logits(head, batch), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == args.steps:
            with torch.no_grad():
                held_loss, iou, share = report(logits(head, held_batch), held_targets)
            print(f"dilations {args.dilations} step {step}: train loss {loss.item():.3f}; held-out loss "
                  f"{held_loss:.3f}, mask IoU {iou:.3f}, IoU >= 0.5 for {share:.0%} ({time.time() - start:.0f} s)",
                  flush=True)


if __name__ == "__main__":
    try:
        main()
    except CharsegError as exc:  # a wrong folder or a broken dataset: one line, not a traceback
        sys.exit(f"error: {exc}")
