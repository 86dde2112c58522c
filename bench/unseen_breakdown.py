"""What a model misses on the unseen-font pages: the same generator (`generate --held-out
--unseen`) one font family at a time with plain lines, then every line in one style
(condensed, stencil-cut, worn, coloured ink) across all families. Writes its tables in
docs/QUALITY_UNSEEN.md, with the CPU and the date. A script, not a test.

    python bench/unseen_breakdown.py CHECKPOINT [--pages 12] [--seed 77]

CHECKPOINT: a trained model (bench/quality.py --keep-model, or the demo's best.pth). Takes a
few minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from scaling import cpu_description  # noqa: E402  (bench/ is this script's folder)

from charseg.data.dataset import scan_dataset  # noqa: E402
from charseg.data.unseen import FONT_PACKAGES, LINE_STYLES, generate_unseen  # noqa: E402
from charseg.inference.evaluate import evaluate  # noqa: E402
from charseg.inference.predict import load_model_for_inference  # noqa: E402

HEADING = "# What the unseen-font pages lose"
KEYS = ("bbox_AP50", "segm_AP50", "segm_AP75", "char_f1")


def scores(model, spec, out: Path) -> dict:
    """The model's metrics on the pages generated at OUT (evaluate's default score threshold)."""
    metrics = evaluate(model, scan_dataset(out).samples, torch.device("cpu"), max_dets=spec.detections_per_img).metrics
    return {k: metrics[k] for k in KEYS}


def table(first: str, rows: dict) -> list[str]:
    return [f"| {first} | {' | '.join(KEYS)} |", "|" + " --- |" * (len(KEYS) + 1),
            *(f"| {name} | {' | '.join(f'{row[k]:.3f}' for k in KEYS)} |" for name, row in rows.items())]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="A trained charseg checkpoint.")
    parser.add_argument("--pages", type=int, default=12, help="Pages per family and per style.")
    parser.add_argument("--seed", type=int, default=77, help="Seed of every set (the same for each row).")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "QUALITY_UNSEEN.md", help="Markdown report to write.")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    model, spec, _ = load_model_for_inference(args.checkpoint, torch.device("cpu"))
    families, styles = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in FONT_PACKAGES:
            generate_unseen(Path(tmp, name), num_images=args.pages, seed=args.seed, families=(name,), line_style="plain")
            row = families[name.removeprefix("font_")] = scores(model, spec, Path(tmp, name))
            print(name, row, flush=True)
        for style in (None, *LINE_STYLES):
            generate_unseen(Path(tmp, str(style)), num_images=args.pages, seed=args.seed, line_style=style)
            row = styles[style or "the random mix (as the unseen set)"] = scores(model, spec, Path(tmp, str(style)))
            print(style, row, flush=True)
    args.out.write_text("\n".join([
        HEADING, "",
        "Written by `bench/unseen_breakdown.py`; the unseen set itself and the demo's figures are in "
        "[QUALITY.md](QUALITY.md), what the rows say in [FROM_SCRATCH.md](FROM_SCRATCH.md).", "",
        f"{date.today()}, {cpu_description()}; `python bench/unseen_breakdown.py MODEL --pages {args.pages} "
        f"--seed {args.seed}`, MODEL ({Path(args.checkpoint).name}) the checkpoint QUALITY.md reports (`bench/quality.py "
        f"--keep-model`). {args.pages} pages per "
        "row from the unseen-font generator, the same seed in each row: first one font family, every line plain "
        "(no condensing, cuts, wear or colour); then all nine families, every line in one style.", "",
        *table("family, plain lines", families), "",
        *table("all families, every line", styles), ""]))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
