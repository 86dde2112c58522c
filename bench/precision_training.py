"""bf16 vs fp32 training: `make demo`'s recipe trained from the same seed in each precision.

    python bench/precision_training.py [--seeds 15107 2 3 4 5]

For each seed, trains the `make demo` recipe (its parameters read from the Makefile, as
bench/quality.py does) twice, `--precision fp32` and `--precision bf16`, everything else the
same, on the demo's training pages, each run tracked in MLflow (experiment charseg-precision,
$MLFLOW_TRACKING_URI or ./mlflow.db: the val curves side by side in the UI). Reports val segm_AP
at every epoch and the final model on the demo's 40 held-out pages (other fonts, rotation,
texture, blur), with the mean and spread of bf16 - fp32 over the seeds. Writes its section of
docs/BENCHMARKS.md. A script, not a test: about 15 minutes per seed on 2 cores; run it alone.
With --add, the seeds already in that section are kept (as printed there) and the new seeds
join them, so the comparison can grow a few seeds at a time.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from quality import HELDOUT_PAGES, HELDOUT_SEED, demo_recipe, generate_training_pages  # noqa: E402
from scaling import write_section  # noqa: E402

from charseg import __version__  # noqa: E402
from charseg import checkpoint as ckpt  # noqa: E402
from charseg import tracking
from charseg.config import TrainConfig  # noqa: E402
from charseg.data.heldout import generate_heldout  # noqa: E402
from charseg.precision import native_bf16  # noqa: E402
from charseg.training import runner  # noqa: E402

HEADING = "## bf16 training vs fp32 (bench/precision_training.py)"
EXPERIMENT = "charseg-precision"
PRECISIONS = ("fp32", "bf16")
HELDOUT_METRICS = ("segm_AP50", "char_f1")


def train_once(recipe: dict, data: Path, heldout: Path, out: Path, seed: int, precision: str) -> dict:
    """One tracked training run; returns its val curve, held-out scores and seconds."""
    config = TrainConfig(**{**recipe, "seed": seed}, precision=precision, data_dir=str(data),
                         heldout_dir=str(heldout), output_dir=str(out))
    tracker = tracking.MlflowTracker(log_checkpoints=False, lineage=ckpt.Lineage())
    start = time.perf_counter()
    with tracking.tracked_run(EXPERIMENT, output_dir=config.output_dir, tracker=tracker) as run_id:
        result = runner.train(config, tracker)
    row = {"val": [epoch["val_segm_AP"] for epoch in result.history], "heldout": result.heldout,
           "seconds": time.perf_counter() - start, "train_seconds": sum(e["seconds"] for e in result.history)}
    print(f"  seed {seed} {precision}: val segm_AP " + ", ".join(f"{v:.3f}" for v in row["val"])
          + "; held-out " + ", ".join(f"{k} {row['heldout'][k]:.3f}" for k in HELDOUT_METRICS)
          + f"; {row['seconds']:.0f} s (run {run_id})", flush=True)
    return row


def spread(values: list[float]) -> str:
    """mean (standard deviation; min..max) of signed differences."""
    sd = f"sd {statistics.stdev(values):.4f}; " if len(values) > 1 else ""
    return f"{statistics.mean(values):+.4f} ({sd}{min(values):+.3f}..{max(values):+.3f})"


def describe_recipe(recipe: dict, generate_args: list[str]) -> str:
    return (f"`make demo`'s recipe ({', '.join(f'{k} {v}' for k, v in recipe.items() if k != 'seed')}) "
            f"on its pages (`charseg generate {' '.join(generate_args)}`)")


def earlier_runs(path: Path, recipe_text: str, seeds: list[int]) -> tuple[dict, str]:
    """The runs in PATH's section for seeds not in SEEDS, at the precision printed there, and
    the line that says when they were measured. Raises SystemExit if that section is missing
    or measured another recipe (its rows would not compare)."""
    text = path.read_text() if path.exists() else ""
    if HEADING not in text:
        raise SystemExit(f"--add: {path} has no section {HEADING!r} to add to; run without --add first")
    section = text.split(HEADING, 1)[1].split("\n## ", 1)[0]
    if recipe_text not in section:
        raise SystemExit(f"--add: the section in {path} measured another recipe or pages than the Makefile's "
                         "now; run without --add to measure every seed again")
    measured = re.search(r"^Measured (\S+) by `python bench/precision_training\.py ([^`]*)` on ([^(]*\([^)]*\))",
                         section, re.M)
    runs = {}
    for seed, precision, val, *heldout, seconds in re.findall(
            r"^\| (\d+) \| (\w+) \| ([\d., ]+) \| ([\d.]+) \| ([\d.]+) \| (\d+) s \|$", section, re.M):
        if int(seed) not in seeds:
            runs[(int(seed), precision)] = {"val": [float(v) for v in val.split(", ")],
                                            "heldout": dict(zip(HELDOUT_METRICS, map(float, heldout))),
                                            "train_seconds": float(seconds)}
    kept = list(dict.fromkeys(seed for seed, _ in runs))
    # Seeds that section kept from an even earlier one say so in its own sentences: carried over.
    kept_before = re.findall(r"( Seeds ([\d ]+) were measured [^`]*`[^`]*`[^`.]* and kept here[^.]*\.)", section)
    notes = []
    for sentence, listed in kept_before:  # each naming only the seeds it still holds
        still = [seed for seed in listed.split() if int(seed) in kept]
        if still:
            notes.append(sentence.replace(f"Seeds {listed} ", f"Seeds {' '.join(still)} ", 1))
    carried = [listed for _, listed in kept_before]
    then_trained = [seed for seed in kept if not any(str(seed) in listed.split() for listed in carried)]
    if then_trained and measured:
        notes.append(f" Seeds {' '.join(map(str, then_trained))} were measured {measured[1]} by `python "
                     f"bench/precision_training.py {measured[2]}` on {measured[3]} and kept here at the 3 "
                     "decimals printed then.")
    return runs, "".join(notes)


def render(runs: dict, recipe: dict, generate_args: list[str], trained: list[int], earlier: str = "") -> str:
    """The section for RUNS: {(seed, precision): row}; TRAINED: the seeds this invocation
    trained; EARLIER: earlier_runs' line about the seeds kept from the section."""
    seeds = list(dict.fromkeys(seed for seed, _ in runs))
    _, how = native_bf16(torch.device("cpu"))
    epochs = len(next(iter(runs.values()))["val"])
    lines = [HEADING, "",
             f"Measured {date.today()} by `python bench/precision_training.py --seeds {' '.join(map(str, trained))}"
             f"{' --add' if earlier else ''}` on "
             f"{platform.machine()}, {os.cpu_count()} CPU cores ({how}), torch {torch.__version__}, charseg "
             f"{__version__}.{earlier} {describe_recipe(recipe, generate_args)}, trained per seed at `--precision fp32` and "
             "`--precision bf16`, everything else the same, each alone on the machine. Val: the run's own validation "
             f"pages, by epoch; held-out: the final model on `charseg generate --held-out --num-images {HELDOUT_PAGES} "
             f"--seed {HELDOUT_SEED}` (other fonts, rotation, texture, blur). Every run is in MLflow, experiment "
             f"`{EXPERIMENT}`.", "",
             f"| seed | precision | val segm_AP, epochs 1-{epochs} | held-out segm_AP50 | held-out char_f1 "
             "| training |",
             "| --- | --- | --- | --- | --- | --- |"]
    for (seed, precision), row in runs.items():
        lines.append(f"| {seed} | {precision} | " + ", ".join(f"{v:.3f}" for v in row["val"]) + " | "
                     + " | ".join(f"{row['heldout'][k]:.3f}" for k in HELDOUT_METRICS)
                     + f" | {row['train_seconds']:.0f} s |")
    pairs = [(runs[(s, "fp32")], runs[(s, "bf16")]) for s in seeds]
    last = [b["val"][-1] - f["val"][-1] for f, b in pairs]
    fp32_last = [f["val"][-1] for f, _ in pairs]
    lines += ["", f"bf16 - fp32 over the {len(seeds)} seeds, mean (standard deviation; min..max): val segm_AP at "
              f"epoch {epochs} {spread(last)}; "
              + "; ".join(f"held-out {k} {spread([b['heldout'][k] - f['heldout'][k] for f, b in pairs])}"
                          for k in HELDOUT_METRICS)
              + f". fp32 alone, seed to seed: val segm_AP at epoch {epochs} "
              f"{min(fp32_last):.3f}..{max(fp32_last):.3f}; "
              + "; ".join(f"held-out {k} {min(f['heldout'][k] for f, _ in pairs):.3f}.."
                          f"{max(f['heldout'][k] for f, _ in pairs):.3f}" for k in HELDOUT_METRICS)
              + ". Training time (the epochs' steps), bf16 / fp32: "
              + f"{statistics.mean(b['train_seconds'] / f['train_seconds'] for f, b in pairs):.2f}x."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[15107, 2, 3, 4, 5],
                        help="Training seeds; each is trained once per precision (about 15 minutes a seed on a 2-core "
                             "AVX-512 BF16 CPU; without native bf16 much longer).")
    parser.add_argument("--epochs", type=int, help="Override the recipe's epochs (a quick check).")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "BENCHMARKS.md",
                        help="Markdown file whose section this script rewrites [default: docs/BENCHMARKS.md].")
    parser.add_argument("--add", action="store_true",
                        help="Keep the seeds already in that section (other than --seeds) and add these to them; "
                             "refused if the section measured another recipe.")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    recipe, generate_args = demo_recipe()
    recipe["epochs"] = args.epochs or recipe["epochs"]
    runs, earlier = (earlier_runs(args.out, describe_recipe(recipe, generate_args), args.seeds)
                     if args.add else ({}, ""))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        generate_training_pages(generate_args, tmp / "train", None)
        generate_heldout(tmp / "heldout", num_images=HELDOUT_PAGES, seed=HELDOUT_SEED)
        for seed in args.seeds:
            for precision in PRECISIONS:
                out = tmp / f"{seed}-{precision}"
                runs[(seed, precision)] = train_once(recipe, tmp / "train", tmp / "heldout", out, seed, precision)
                for path in out.glob("*.pth"):  # only the figures are kept
                    path.unlink()
    section = render(runs, recipe, generate_args, args.seeds, earlier)
    print(section)
    write_section(args.out, section)
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
