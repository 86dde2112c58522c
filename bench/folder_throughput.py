"""Pages per minute on a folder of pages: `charseg predict DIR` against stock torchvision called
page by page, whole processes, on the CPU at hand. Its section of docs/BENCHMARKS.md is
measured and written by `python bench/speed.py` (`measure`, `report`).

CHECKPOINT: a trained model (the demo's outputs/demo/best.pth), so that pages have the
detections a user gets. The pages are the held-out generator's (other fonts than training),
sides from 256 to 1024 px. Stock is bench/stock_predict.py over the same folder in one process
(the model loaded once, then each page read, run through torchvision's own heads in float32
and written by the same functions). charseg runs at float32, at its default precision and in
int8 (calibrated on the folder's first pages, as `predict` does by default).
"Cores busy" is the process's CPU seconds over its wall seconds.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from scaling import cpu_description  # noqa: E402

from charseg.data.heldout import generate_heldout  # noqa: E402

# Each process's detection limit: above what these pages hold (a page that reached it would be
# named by charseg), and the same for all, so that they do the same work. Without it `charseg
# predict` raises the limit of a page that reaches the checkpoint's (predict_following_page)
# and stock does not.
FOLDER_DETECTIONS = 1500


def timed(command: list[str], log: Path) -> dict:
    """Run COMMAND to the end (its output into LOG); its wall seconds, CPU seconds and peak RSS (MB)."""
    started = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own usage, not the earlier ones'
    wall = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{log.read_text()[-3000:]}")
    return {"wall": wall, "cpu": usage.ru_utime + usage.ru_stime, "rss": usage.ru_maxrss / 1024}


def characters(out_dir: Path) -> int:
    return sum(len(p.read_text().splitlines()) - 1 for p in (out_dir / "annotations").glob("*.csv"))


def measure(checkpoint: str, pages: int, detections: int = FOLDER_DETECTIONS) -> list[dict]:
    """Each process's figures over one folder of PAGES generated held-out pages, every process
    at the same detection limit."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "pages"
        generate_heldout(folder, num_images=pages, min_side=256, max_side=1024, seed=31)
        # The checkpoint's own page scale given: each page read once, as stock reads it (no second
        # reading of a page of small characters).
        scale = torch.load(checkpoint, map_location="cpu", weights_only=False)["model_spec"]["scale_test"]
        charseg = [sys.executable, "-m", "charseg", "predict", str(folder / "images"), "--model", checkpoint,
                   "--detections-per-img", str(detections), "--scale-test", str(scale)]
        runs = {"stock torchvision, page by page (fp32)":
                [sys.executable, str(ROOT / "bench" / "stock_predict.py"), checkpoint, str(folder / "images")],
                "charseg predict DIR --precision fp32": [*charseg, "--precision", "fp32"],
                "charseg predict DIR (default precision)": charseg,
                "charseg predict DIR --precision int8": [*charseg, "--precision", "int8"]}
        for name, command in runs.items():
            out = Path(tmp) / f"out{len(rows)}"
            figures = timed([*command, str(out), str(detections)] if name.startswith("stock") else
                            [*command, "--out", str(out)],
                            Path(tmp) / f"log{len(rows)}.txt")
            log = (Path(tmp) / f"log{len(rows)}.txt").read_text()
            if "reached the model's limit" in log:  # charseg names such pages; the limit was too low
                raise SystemExit(f"{name}: a page reached the detection limit {detections}; raise it:\n{log[-2000:]}")
            rows.append({"name": name, **figures, "characters": characters(out)})
            print(f"{name}: {figures['wall']:.1f} s, {rows[-1]['characters']} characters", flush=True)
    return rows


def report(rows: list[dict], checkpoint: str, pages: int) -> str:
    import torch

    stock = rows[0]
    lines = ["## Folders of pages (bench/speed.py)", "",
             f"Measured {date.today()} by `python bench/speed.py --checkpoint CHECKPOINT --pages {pages}` on "
             f"{cpu_description()}, torch {torch.__version__}; checkpoint `{checkpoint}`; {pages} held-out "
             f"pages of 256-1024 px, each process with the detection limit {FOLDER_DETECTIONS} (stock's RPN keeping "
             "as many proposals as charseg's). Whole processes from start to exit (start-up, model loading and "
             "int8's calibration included).", "",
             "| process | whole process | pages per minute | speed-up over stock | speed-up over charseg fp32 | "
             "cores busy (CPU s / wall s) | peak RSS | characters |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    fp32 = rows[1]
    for row in rows:
        lines.append(f"| {row['name']} | {row['wall']:.1f} s | {60 * pages / row['wall']:.1f} | "
                     f"{stock['wall'] / row['wall']:.2f}x | {fp32['wall'] / row['wall']:.2f}x | "
                     f"{row['cpu'] / row['wall']:.2f} | {row['rss']:.0f} MB | {row['characters']} |")
    return "\n".join(lines) + "\n"

