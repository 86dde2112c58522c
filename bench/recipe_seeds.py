"""One setting of the demo recipe against another over several seeds: is a difference in held-out
quality the setting's, or the seed's?

    python bench/recipe_seeds.py SETTING VALUE [VALUE ...] [--seeds 15107 2 3] [--out docs/QUALITY_SEEDS.md]

e.g. `python bench/recipe_seeds.py mask_head_convs 4 2`. Trains `make demo`'s recipe (read from the
Makefile, as bench/quality.py does) once per value and seed, in turns (seed 1: every value, then
seed 2, ...), on the demo's training pages, and evaluates each final model on the demo's 40
held-out pages and bench/quality.py's document page. The seed moves the initial weights, the
sampling and the augmentation. Adds to OUT a section: a table of every run and the mean of each
value, with the CPU, the date and the recipe's commit. A script, not a test: run it alone (about 8
minutes a run on 2 cores).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from quality import (DOCUMENT, DOCUMENT_DETECTIONS, HELDOUT_PAGES, HELDOUT_SEED, demo_recipe,  # noqa: E402
                     generate_training_pages, measure_document, parse_setting, read_as)
from scaling import cpu_description  # noqa: E402  (bench/ is this script's folder)

from charseg.config import TrainConfig  # noqa: E402
from charseg.data.dataset import scan_dataset  # noqa: E402
from charseg.data.heldout import generate_heldout  # noqa: E402
from charseg.inference.evaluate import evaluate  # noqa: E402
from charseg.training import runner  # noqa: E402

METRICS = ("segm_AP50", "segm_AP75", "segm_AP", "char_f1", "bbox_AP50")
TITLE = "# The demo recipe over seeds"
INTRO = ("One setting of `make demo`'s recipe against another, run per seed (`python bench/recipe_seeds.py`): "
         "each section one run of the script, added after the ones before. What each result decided: "
         "[FROM_SCRATCH.md](FROM_SCRATCH.md).")


def run_one(recipe: dict, data: Path, out: Path, heldout: list, document: Path) -> dict:
    """Train RECIPE on DATA; the final model's held-out and document metrics, and the minutes."""
    config = TrainConfig(data_dir=str(data), output_dir=str(out), **recipe)
    start = time.perf_counter()
    result = runner.train(config)
    minutes = (time.perf_counter() - start) / 60
    model, spec = read_as(result.final_checkpoint, {})
    metrics = evaluate(model, heldout, torch.device("cpu"), max_dets=spec.detections_per_img,
                       score_threshold=config.score_threshold).metrics
    page = measure_document(model, document, DOCUMENT_DETECTIONS)
    return {"minutes": minutes, **{m: metrics[m] for m in METRICS},
            **{f"document {m}": page[m] for m in ("segm_AP50", "char_f1")}}


def table(setting: str, runs: list[tuple[str, int, dict]]) -> list[str]:
    columns = ["training", *(f"held-out {m}" for m in METRICS), "document segm_AP50", "document char_f1"]
    keys = ["minutes", *METRICS, "document segm_AP50", "document char_f1"]
    lines = [f"| {setting} | seed | " + " | ".join(columns) + " |",
             "| " + " | ".join("---" for _ in range(len(columns) + 2)) + " |"]
    for value, seed, row in runs:
        cells = [f"{row[k]:.3f}" for k in keys[1:]]
        lines.append(f"| {value} | {seed} | {row['minutes']:.1f} min | " + " | ".join(cells) + " |")
    for value in dict.fromkeys(v for v, _, _ in runs):
        rows = [row for v, _, row in runs if v == value]
        means = [statistics.mean(row[k] for row in rows) for k in keys]
        lines.append(f"| **{value}, mean** | {len(rows)} seeds | {means[0]:.1f} min | "
                     + " | ".join(f"{m:.3f}" for m in means[1:]) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("setting", help="A TrainConfig field of the demo recipe, e.g. mask_head_convs.")
    parser.add_argument("values", nargs="+", help="Its values to compare, as on the command line.")
    parser.add_argument("--seeds", type=int, nargs="+", default=[2, 3], help="Seeds, each run with every value.")
    parser.add_argument("--out", default=str(ROOT / "docs" / "QUALITY_SEEDS.md"),
                        help="Markdown file a section is added to.")
    args = parser.parse_args()
    if args.setting not in TrainConfig.__dataclass_fields__:
        raise SystemExit(f"{args.setting!r} is not a TrainConfig setting")
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    recipe, generate_args = demo_recipe()
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        generate_training_pages(generate_args, tmp / "train", None)
        generate_heldout(tmp / "heldout", num_images=HELDOUT_PAGES, seed=HELDOUT_SEED)
        generate_heldout(tmp / "document", num_images=1, size=DOCUMENT["size"], font_sizes=DOCUMENT["font_sizes"],
                         seed=DOCUMENT["seed"])
        heldout = scan_dataset(tmp / "heldout").samples
        for seed in args.seeds:
            for value in args.values:
                run = {**recipe, args.setting: parse_setting(args.setting, value), "seed": seed}
                row = run_one(run, tmp / "train", tmp / f"run_{seed}_{value}", heldout, tmp / "document")
                runs.append((value, seed, row))
                print(f"{args.setting}={value} seed {seed}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items()),
                      flush=True)
    lines = [f"## {args.setting}: {', '.join(args.values)} ({date.today().isoformat()})", "",
             f"Measured {date.today().isoformat()} by `python bench/recipe_seeds.py {args.setting} "
             f"{' '.join(args.values)} --seeds {' '.join(map(str, args.seeds))}` on {cpu_description()}, "
             f"torch {torch.__version__}, CPU only. The Makefile's demo recipe (commit {commit()}: "
             f"{', '.join(f'{k} {v}' for k, v in recipe.items() if k != args.setting)}) with {args.setting} set to "
             "each value and the seed to each seed; final models on the demo's held-out pages (`charseg generate "
             f"--held-out --num-images {HELDOUT_PAGES} --seed {HELDOUT_SEED}`) and bench/quality.py's document page; "
             "training time is the whole `runner.train` (validation included).", "", *table(args.setting, runs)]
    out = Path(args.out)
    earlier = out.read_text().rstrip("\n") + "\n\n" if out.exists() else f"{TITLE}\n\n{INTRO}\n\n"
    out.write_text(earlier + "\n".join(lines) + "\n")  # each run a section, after the ones before
    print("\n".join(lines))


def commit() -> str:
    """HEAD's short hash, with "+changes" when the working tree differs from it."""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(["git", "diff", "--quiet", "HEAD"], cwd=ROOT).returncode
    return head.stdout.strip() + (" +changes" if dirty else "") if head.returncode == 0 else "unknown"


if __name__ == "__main__":
    main()
