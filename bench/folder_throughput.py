"""Pages per minute on a folder of pages: `charseg predict DIR` against stock torchvision called
page by page, whole processes, on the CPU at hand; writes its section of docs/BENCHMARKS.md.
A script, not a test; run it alone on an idle machine.

    python bench/folder_throughput.py CHECKPOINT [--pages 200] [--out docs/BENCHMARKS.md]

CHECKPOINT: a trained model (the demo's outputs/demo/best.pth), so that pages have the
detections a user gets. The pages are the held-out generator's (other fonts than training),
sides from 256 to 1024 px. Stock is bench/stock_predict.py over the same folder in one process
(the model loaded once, then each page read, run through torchvision's own heads in float32
and written by the same functions). charseg runs at float32 and at its default precision.
"Cores busy" is the process's CPU seconds over its wall seconds.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from scaling import cpu_description, write_section  # noqa: E402

from charseg.data.heldout import generate_heldout  # noqa: E402


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="A trained checkpoint (.pth).")
    parser.add_argument("--pages", type=int, default=200, help="Pages generated (sides 256-1024 px).")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "BENCHMARKS.md", help="Document to write.")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        pages = Path(tmp) / "pages"
        generate_heldout(pages, num_images=args.pages, min_side=256, max_side=1024, seed=31)
        charseg = [sys.executable, "-m", "charseg", "predict", str(pages / "images"), "--model", args.checkpoint]
        runs = {"stock torchvision, page by page (fp32)":
                [sys.executable, str(ROOT / "bench" / "stock_predict.py"), args.checkpoint, str(pages / "images")],
                "charseg predict DIR --precision fp32": [*charseg, "--precision", "fp32"],
                "charseg predict DIR (default precision)": charseg}
        for name, command in runs.items():
            out = Path(tmp) / f"out{len(rows)}"
            figures = timed([*command, str(out)] if name.startswith("stock") else [*command, "--out", str(out)],
                            Path(tmp) / f"log{len(rows)}.txt")
            rows.append({"name": name, **figures, "characters": characters(out)})
            print(f"{name}: {figures['wall']:.1f} s, {rows[-1]['characters']} characters", flush=True)
    write_section(args.out, report(rows, args))


def report(rows: list[dict], args: argparse.Namespace) -> str:
    import torch

    stock = rows[0]
    lines = ["## Folders of pages (bench/folder_throughput.py)", "",
             f"Measured {date.today()} by `python bench/folder_throughput.py CHECKPOINT --pages {args.pages}` on "
             f"{cpu_description()}, torch {torch.__version__}; checkpoint `{args.checkpoint}`; {args.pages} held-out "
             "pages of 256-1024 px. Whole processes from start to exit (start-up and model loading included).", "",
             "| process | whole process | pages per minute | speed-up over stock | cores busy (CPU s / wall s) | peak RSS | characters |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        lines.append(f"| {row['name']} | {row['wall']:.1f} s | {60 * args.pages / row['wall']:.1f} | "
                     f"{stock['wall'] / row['wall']:.2f}x | {row['cpu'] / row['wall']:.2f} | {row['rss']:.0f} MB | "
                     f"{row['characters']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
