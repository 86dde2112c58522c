"""Every CPU speed comparison of docs/BENCHMARKS.md in one run on the machine at hand: charseg
against stock torchvision (training and inference, dense and sparse pages, float32), float32 vs
bf16 vs int8 (speed and what a trained checkpoint scores in each), and folders of pages. Prints
the CPU and its flags, then writes the tables. A script, not a test: run it alone on an idle
machine (one other process on 2 cores changes the figures severalfold).

    python bench/speed.py --checkpoint outputs/demo/best.pth --heldout demo_heldout \\
        [--calibration-dir demo_data/images] [--pages 200] [--only stock precision folder]

CHECKPOINT: a trained model (the demo's), for the scores and the folder's detections; the
dense-page comparisons use random-init ResNet-50 FPN weights of charseg's default layout
(bench/benchmark.py). HELDOUT: pages the checkpoint never trained on. CALIBRATION_DIR: the pages
int8 is calibrated on when scored (default: HELDOUT's first pages). Takes about 40 minutes on
2 cores with --pages 200 (--without-bf16 leaves out what a CPU without native bf16 emulates).
Run under ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 FBGEMM_ENABLE_INSTRUCTIONS=AVX2
MKL_ENABLE_INSTRUCTIONS=AVX2, an AVX-512 CPU computes with AVX2 kernels only
(docs/BENCHMARKS_AVX2.md); the CPU line names such limits.
"""

from __future__ import annotations

import argparse
import sys
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import benchmark  # noqa: E402
import folder_throughput  # noqa: E402
import precision  # noqa: E402
from scaling import CPU_FLAGS, cpu_description, cpu_flags, write_section  # noqa: E402

PARTS = ("stock", "precision", "folder")
GOALS_HEADING = "## Against issue 31's goals (bench/speed.py)"
DENSE_GOAL = {"seconds": 0.2, "peak_rss_mb": 0.1}  # of stock's whole dense predict process
INT8_RULE = (1.5, 0.01)  # ship int8 if at least this much faster than fp32 at no more AP50 loss


def goals(rows: dict, scores: dict) -> str:
    """The dense-page ratios against their goals and the int8 rule, from this run's figures (the
    folder's int8 speed-up is in its own table, measured in its own part)."""
    stock = rows[("process", "dense", "stock")]
    lines = [GOALS_HEADING, "", f"From the table above ({date.today()}, {cpu_description()}).", "",
             "| measure | charseg fp32 | charseg bf16 | charseg int8 | charseg int8, cached calibration | goal |",
             "| --- | --- | --- | --- | --- | --- |"]
    for key, label in (("seconds", "dense predict process, time / stock's"),
                       ("peak_rss_mb", "dense predict process, peak RSS / stock's")):
        cells = [f"{rows[('process', 'dense', p)][key] / stock[key]:.2f}x" if ('process', 'dense', p) in rows else "—"
                 for p in (*precision.PATHS[1:], precision.CACHED)]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | <= {DENSE_GOAL[key]}x |")
    inference = {p: rows[("inference", "dense", p)]["seconds"] for p in ("charseg", "charseg-int8")}
    process = {p: rows[("process", "dense", p)]["seconds"] for p in ("charseg", "charseg-int8")}
    cached = rows[("process", "dense", precision.CACHED)]["seconds"]
    speedups = {"dense page, inference": inference["charseg"] / inference["charseg-int8"],
                "dense page, whole process (calibration included)": process["charseg"] / process["charseg-int8"],
                "dense page, whole process (calibration cached)": process["charseg"] / cached}
    loss = scores["fp32"]["segm_AP50"] - scores["int8"]["segm_AP50"]
    lines += ["", "int8 against fp32: " + ", ".join(f"{k} {v:.2f}x faster" for k, v in speedups.items())
              + f"; held-out segm AP50 {scores['fp32']['segm_AP50']:.4f} -> {scores['int8']['segm_AP50']:.4f} "
              f"(loss {loss:+.4f}); a folder of pages: its own table (\"Folders of pages\"), where that part ran. "
              f"The rule (at least {INT8_RULE[0]}x faster, "
              f"at most {INT8_RULE[1]} AP50 lost) holds "
              + ", ".join(f"for the {k}" if v >= INT8_RULE[0] and loss <= INT8_RULE[1] else f"not for the {k}"
                          for k, v in speedups.items()) + " on this CPU."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="A trained checkpoint (e.g. make demo's best.pth).")
    parser.add_argument("--heldout", required=True, help="Pages it never trained on (e.g. demo_heldout).")
    parser.add_argument("--calibration-dir", default=None, help="int8's calibration pages when scored.")
    parser.add_argument("--pages", type=int, default=200, help="Pages of the folder comparison (256-1024 px).")
    parser.add_argument("--dense-chars", type=int, default=1700, help="Characters asked for on the dense page.")
    parser.add_argument("--steps", type=int, default=3, help="Dense training steps; the first warms up.")
    parser.add_argument("--sparse-steps", type=int, default=6, help="Sparse training steps; the first warms up.")
    parser.add_argument("--process-runs", type=int, default=3,
                        help="Whole dense predict processes of each kind, run in turns; the table gives the median.")
    parser.add_argument("--only", nargs="+", choices=PARTS, default=list(PARTS),
                        help="stock: charseg vs stock in float32; precision: fp32 / bf16 / int8 and their scores "
                             "(and the goals table); folder: pages per minute.")
    parser.add_argument("--without-bf16", action="store_true",
                        help="precision: leave out bf16 and the CPU's fp16 autocast, for a CPU that emulates them "
                             "(no AVX-512 BF16 or AMX, or kernels limited to AVX2), where they take most of the "
                             "part's time and are far slower than fp32 anyway.")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "BENCHMARKS.md")
    args = parser.parse_args()
    print(f"CPU: {cpu_description()}; of {', '.join(CPU_FLAGS)} it has: {', '.join(cpu_flags()) or 'none'}",
          flush=True)
    if "stock" in args.only:
        report = benchmark.render(*benchmark.measure(args.dense_chars, args.steps, args.sparse_steps))
        print(report)
        benchmark.write_top(args.out, report)
    if "folder" in args.only:
        folder = folder_throughput.measure(args.checkpoint, args.pages)
        write_section(args.out, folder_throughput.report(folder, args.checkpoint, args.pages))
    if "precision" in args.only:
        scores = precision.quality(args.checkpoint, args.heldout, args.calibration_dir, not args.without_bf16)
        paths = tuple(p for p in precision.PATHS if not (args.without_bf16 and p == "charseg-bf16"))
        rows = precision.speed(args.dense_chars, args.steps, args.sparse_steps, args.process_runs, paths)
        section = precision.render(rows, scores, args.checkpoint, args.heldout, args.calibration_dir)
        print(section)
        write_section(args.out, section)
        write_section(args.out, goals(rows, scores))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
