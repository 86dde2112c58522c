"""How well RPN anchor ladders fit characters: the measurement behind `--anchor-sizes auto`.

    python bench/anchors.py [--min-size 800] [--max-size 1333]

Generates a sparse page set (256², 18-40 px glyphs, the README's `charseg generate` example)
and a dense 1024² page (10-16 px glyphs), takes their character boxes at the model's input
(`--min-size`/`--max-size`, charseg's defaults), and prints for torchvision's anchors and every
candidate ladder the share of characters with an anchor of IoU >= 0.7 (a true RPN positive)
and the median best IoU, then the ladder `auto` picks for each page set.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from charseg.data.dataset import scan_dataset  # noqa: E402
from charseg.data.generate import generate_dataset  # noqa: E402
from charseg.model.anchors import (BASE_SIZES, POSITIVE_IOU, best_anchor_iou, character_boxes,  # noqa: E402
                                   fit_anchor_sizes, ladder)
from charseg.model.build import ANCHOR_RATIOS, STOCK_ANCHOR_SIZES  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--min-size", type=int, default=800, help="Model input's shorter side (charseg default).")
    parser.add_argument("--max-size", type=int, default=1333, help="Model input's longer side cap (charseg default).")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        sparse, dense = Path(tmp) / "sparse", Path(tmp) / "dense"
        generate_dataset(sparse, num_images=20, width=256, height=256, chars_per_image=(5, 20), font_size=(18, 40),
                         seed=0)
        generate_dataset(dense, num_images=1, width=1024, height=1024, chars_per_image=(1700, 1700),
                         font_size=(10, 16), seed=2)
        pages = {"sparse 256², 18-40 px glyphs": scan_dataset(sparse).samples,
                 "dense 1024², 10-16 px glyphs": scan_dataset(dense).samples}
        print(f"model input: min_size {args.min_size}, max_size {args.max_size}; aspect ratios {ANCHOR_RATIOS}\n")
        print(f"| anchor sizes (P2-P6) | {' | '.join(pages)} |")
        print(f"| --- | {' | '.join('---' for _ in pages)} |")
        boxes = {name: character_boxes(samples, args.min_size, args.max_size) for name, samples in pages.items()}
        for sizes in [ladder(base) for base in BASE_SIZES]:
            cells = []
            for name in pages:
                iou = best_anchor_iou(*boxes[name], sizes, ANCHOR_RATIOS)
                share = (iou >= POSITIVE_IOU).mean()
                cells.append(f"{share:.0%} at IoU >= {POSITIVE_IOU}, median {np.median(iou):.2f}")
            label = f"{sizes}" + (" (torchvision)" if sizes == STOCK_ANCHOR_SIZES else "")
            print(f"| {label} | {' | '.join(cells)} |")
        print()
        for name, samples in pages.items():
            fit = fit_anchor_sizes(samples, args.min_size, args.max_size, ANCHOR_RATIOS)
            print(f"auto on {name}: {fit.sizes} ({fit.characters} characters, median height "
                  f"{fit.median_height:.1f} px at the model's input)")


if __name__ == "__main__":
    main()
