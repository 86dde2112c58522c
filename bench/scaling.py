"""Samples/s of `charseg train` in 1 process vs 2 gloo processes under torchrun, on this machine:
a scaling sanity check, not a speed claim (on a 2-core CPU two processes share the same cores
that one process's two threads use). Writes its section of docs/BENCHMARKS.md.

    python bench/scaling.py [--images 48] [--epochs 2]

Whole processes are timed (start-up, data scan, model build, every epoch, checkpoints), and
the training throughput is the last epoch's images/s as charseg reports it (all processes'
images over the epoch's wall time). Run it alone on an idle machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from charseg import __version__  # noqa: E402
from charseg.data.generate import generate_dataset  # noqa: E402

HEADING = "## Multi-process training (bench/scaling.py)"
# The demo's CPU recipe, shortened: random init, GroupNorm, resnet18, 192 px pages.
ARGS = ["--weights", "none", "--backbone", "resnet18", "--norm", "group", "--fpn-channels", "128", "--min-size", "192",
        "--max-size", "192", "--scale-train", "1", "--roi-samples", "128", "--rpn-proposals-train", "500",
        "--detections-per-img", "200", "--anchor-sizes", "16,32,64,128,256", "--val-fraction", "0",
        "--num-workers", "1", "--no-system-metrics", "--log-checkpoints", "none"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node"]


def run(label: str, launcher: list[str], batch: int, data: Path, out: Path, epochs: int, env: dict) -> dict:
    start = time.perf_counter()
    done = subprocess.run([*launcher, "train", str(data), *ARGS, "--epochs", str(epochs), "--batch-size", str(batch),
                           "--output-dir", str(out)], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"{label} failed:\n{done.stderr[-3000:]}")
    rates = re.findall(r"epoch \d+/\d+ finished: .* ([\d.]+) images/s", done.stderr)
    print(f"{label}: {wall:.1f} s whole, last epoch {rates[-1]} images/s", flush=True)
    return {"label": label, "wall": wall, "rate": float(rates[-1])}


def render(rows: list[dict], images: int, epochs: int) -> str:
    base = rows[0]
    lines = [HEADING, "",
             f"Measured {date.today()} by `python bench/scaling.py` on {platform.machine()}, {os.cpu_count()} CPU cores, "
             f"Python {platform.python_version()}, charseg {__version__}: `charseg train` on {images} generated 192x192 "
             f"pages for {epochs} epochs (the demo's CPU recipe), gloo between processes. A sanity check of the "
             "multi-process path, not a speed claim: the two processes share the two cores that one process "
             "already uses with two threads (torchrun gives each process OMP_NUM_THREADS=1). Where two "
             "single-threaded processes come out ahead, one process was leaving its second core idle (the "
             "small ops of 192 px pages, per-page Python loops, data loading) rather than gaining from "
             "parallelism of its own; on one GPU per process each process has its own device.", "",
             "| processes x batch per process (global batch) | whole process | last epoch, images/s | vs 1 process |",
             "| --- | --- | --- | --- |"]
    for row in rows:
        lines.append(f"| {row['label']} | {row['wall']:.1f} s | {row['rate']:.2f} | {row['rate'] / base['rate']:.2f}x |")
    return "\n".join(lines) + "\n"


CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")  # what the kernels use


def cpu_flags() -> list[str]:
    """Which of CPU_FLAGS this CPU reports (vector width, int8 and bf16 instructions)."""
    info = Path("/proc/cpuinfo").read_text()
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []))
    return [flag for flag in CPU_FLAGS if flag in flags]


# Variables that keep the kernels below what the CPU has (e.g. AVX2 only on an AVX-512 CPU, to
# approach an AVX2 machine's figures): PyTorch's own, oneDNN's, fbgemm's (int8; it ignores the
# first two) and MKL's (float32 matrix products). A figure taken under them says so.
KERNEL_LIMITS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "FBGEMM_ENABLE_INSTRUCTIONS", "MKL_ENABLE_INSTRUCTIONS")


def cpu_description() -> str:
    """The CPU's model name, its vector / int8 / bf16 flags and its cores, and any limit set on
    the kernels (KERNEL_LIMITS): the figures depend on them."""
    info = Path("/proc/cpuinfo").read_text()
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
                platform.processor())
    limits = " ".join(f"{k}={os.environ[k]}" for k in KERNEL_LIMITS if os.environ.get(k))
    return (f"{name} ({' '.join(cpu_flags()) or 'no AVX2'}), {os.cpu_count()} CPU cores"
            + (f", kernels limited by {limits}" if limits else ""))


def write_section(path: Path, section: str) -> None:
    """Replace (or add) SECTION, named by its first line (its heading), in the benchmarks
    document, keeping the rest (the other scripts' sections)."""
    heading = section.split("\n", 1)[0]
    text = path.read_text() if path.exists() else ""
    if heading in text:
        before, after = text.split(heading, 1)
        rest = after.split("\n## ", 1)
        text = before + section + ("\n## " + rest[1] if len(rest) > 1 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=48, help="Training pages generated.")
    parser.add_argument("--epochs", type=int, default=2, help="Epochs per run; the last one's rate is reported.")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "BENCHMARKS.md")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = tmp / "data"
        generate_dataset(data, num_images=args.images, width=192, height=192, chars_per_image=(10, 80),
                         font_size=(12, 30), seed=1, layout="lines")
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}"}
        charseg = [sys.executable, "-m", "charseg"]
        rows = [run("1 x 2 (2)", charseg, 2, data, tmp / "one", args.epochs, env),
                run("2 x 1 (2)", [*TORCHRUN, "2", "-m", "charseg"], 1, data, tmp / "two-same", args.epochs, env),
                run("2 x 2 (4)", [*TORCHRUN, "2", "-m", "charseg"], 2, data, tmp / "two", args.epochs, env)]
    section = render(rows, args.images, args.epochs)
    print(section)
    write_section(args.out, section)
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
