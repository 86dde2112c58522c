"""Does fine-tuning adapt a model to a new domain in minutes? Fine-tune vs training from scratch.

    python bench/finetune.py MODEL [--pages 50] [--epochs 8] [--minutes 5] [--out docs/QUALITY_FINETUNE.md]

MODEL is the demo's model (`python bench/quality.py --keep-model demo.pth`, or `make demo`'s
outputs/demo/model_final.pth). The new domain is `charseg generate --held-out --unseen`:
fonts, inks and backgrounds the demo never trained on. Each path gets the same PAGES pages of
it (seed 11) and the same epochs, at most MINUTES of training (`--time-budget`: the epoch under
way finishes; its schedule is spread over EPOCHS, so pick as many as fit):
`charseg finetune` at its defaults, the same with `--replay-dir` of the demo's own training pages
(REPLAY_PAGES of them, chosen by the seed, train beside the new ones: rehearsal, against
forgetting), at the default LR factor and at 1, `charseg finetune --lr-factor 1`, and `charseg
train` from random initialisation with the demo's recipe. Each model is then evaluated on 40
other pages of the new domain (seed 2027, bench/quality.py's unseen set) and on the demo's own
held-out pages (`--held-out --seed 2026`: the old domain), as COCO segm AP50, AP75, AP and char
F1. Writes the table to OUT. A script, not a test: run it alone.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from charseg.config import TrainConfig  # noqa: E402
from charseg.data.dataset import scan_dataset  # noqa: E402
from charseg.data.heldout import generate_heldout  # noqa: E402
from charseg.data.unseen import generate_unseen  # noqa: E402
from charseg.inference.evaluate import evaluate  # noqa: E402
from charseg.inference.predict import load_model_for_inference  # noqa: E402
from charseg.training import runner  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
from scaling import cpu_description  # noqa: E402
from quality import (HELDOUT_PAGES, HELDOUT_SEED, UNSEEN_SEED, demo_recipe, metrics_table,  # noqa: E402
                     generate_training_pages)

TRAIN_SEED = 11  # the new domain's training pages
REPLAY_PAGES = 20  # the demo's own training pages one fine-tune replays (--replay-pages)
KEYS = ("segm_AP50", "segm_AP75", "segm_AP", "char_f1", "bbox_AP50")


def measure(checkpoint: Path, new: list, old: list) -> dict:
    model, spec, _ = load_model_for_inference(checkpoint, torch.device("cpu"))
    return {name: {k: round(evaluate(model, pages, torch.device("cpu"), max_dets=spec.detections_per_img
                                     ).metrics[k], 3) for k in KEYS} for name, pages in (("new", new), ("old", old))}


def paths(model: Path, data: Path, replay: Path, out: Path, epochs: int, minutes: float) -> dict:
    """The ways to spend EPOCHS (at most MINUTES) on DATA (REPLAY: the old domain's pages, for
    --replay-dir): name -> a callable returning its RunResult."""
    budget = {"data_dir": str(data), "epochs": epochs, "time_budget": minutes}
    recipe, _ = demo_recipe()
    scratch = {**recipe, **budget, "output_dir": str(out / "scratch")}
    replayed = {**budget, "replay_dir": str(replay), "replay_pages": REPLAY_PAGES}
    return {
        "finetune (defaults)": lambda: runner.finetune(model, {**budget, "output_dir": str(out / "ft")}),
        f"finetune --replay-dir OLD --replay-pages {REPLAY_PAGES}": lambda: runner.finetune(
            model, {**replayed, "output_dir": str(out / "ft-replay")}),
        f"finetune --replay-dir OLD --replay-pages {REPLAY_PAGES} --lr-factor 1": lambda: runner.finetune(
            model, {**replayed, "lr_factor": 1.0, "output_dir": str(out / "ft-replay1")}),
        "finetune --lr-factor 1": lambda: runner.finetune(model, {**budget, "lr_factor": 1.0,
                                                                   "output_dir": str(out / "ft1")}),
        "train from scratch": lambda: runner.train(TrainConfig(**scratch)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="The demo's checkpoint.")
    parser.add_argument("--pages", type=int, default=50, help="Training pages of the new domain.")
    parser.add_argument("--epochs", type=int, default=8, help="Epochs of each path (its LR schedule's length).")
    parser.add_argument("--minutes", type=float, default=5.0, help="Most training minutes of each path.")
    parser.add_argument("--out", default=str(ROOT / "docs" / "QUALITY_FINETUNE.md"), help="Markdown report to write.")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        generate_unseen(tmp / "train", num_images=args.pages, seed=TRAIN_SEED)
        generate_unseen(tmp / "new", num_images=HELDOUT_PAGES, seed=UNSEEN_SEED)
        generate_heldout(tmp / "old", num_images=HELDOUT_PAGES, seed=HELDOUT_SEED)
        new, old = scan_dataset(tmp / "new").samples, scan_dataset(tmp / "old").samples
        generate_training_pages(demo_recipe()[1], tmp / "replay", None)  # the demo's training pages, all
        replay_total = len(scan_dataset(tmp / "replay").samples)
        rows = {"demo's model, before": {"seconds": 0.0, "epochs": 0, **measure(args.model, new, old)}}
        print(rows, flush=True)
        for name, run in paths(args.model, tmp / "train", tmp / "replay", tmp, args.epochs, args.minutes).items():
            start = time.perf_counter()
            result = run()
            seconds = time.perf_counter() - start
            epochs = int(torch.load(result.final_checkpoint, map_location="cpu", weights_only=False)["epoch"])
            rows[name] = {"seconds": seconds, "epochs": epochs, **measure(result.final_checkpoint, new, old)}
            print(name, rows[name], flush=True)
    write_report(Path(args.out), args, rows, replay_total)


def write_report(out: Path, args: argparse.Namespace, rows: dict, replay_total: int) -> None:
    lines = [
        "# Fine-tuning to a new domain vs training from scratch",
        "",
        f"Measured {date.today().isoformat()} by `python bench/finetune.py MODEL --pages {args.pages} --epochs "
        f"{args.epochs} --minutes {args.minutes:g}` on {cpu_description()}, CPU only; MODEL: the demo's final model.",
        f"New domain: `charseg generate --held-out --unseen`, {args.pages} training pages (seed {TRAIN_SEED}), "
        f"evaluated on {HELDOUT_PAGES} others (seed {UNSEEN_SEED}); old domain: the demo's held-out pages "
        f"(`--held-out --seed {HELDOUT_SEED}`); `--replay-dir` is the demo's {replay_total} training pages, "
        f"{REPLAY_PAGES} of them chosen by the seed. Each path trains {args.epochs} epochs or until {args.minutes:g} "
        "minutes are spent (the epoch under way finishes, validation included); final models, fp32.",
        "",
        *metrics_table("path", rows, [
            *((f"new {m}", "new", m) for m in ("segm_AP50", "segm_AP75", "segm_AP", "char_f1")),
            *((f"old {m}", "old", m) for m in ("segm_AP50", "segm_AP75", "char_f1"))]),
    ]
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
