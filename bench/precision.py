"""float32 vs bfloat16 autocast (`--precision`) on this CPU: speed against stock torchvision in
the same run, and what the same trained checkpoint scores in each. Writes its section of
docs/BENCHMARKS.md. A script, not a test: run it alone on an idle machine.

    python bench/precision.py --checkpoint outputs/demo/model_final.pth --data demo_heldout

Speed: the pages of bench/benchmark.py (a dense 1024² page, 1700 characters asked for; eight
sparse 256² pages), random-init ResNet-50 FPN, charseg's fitted limits, each figure from a
fresh process: inference to polygons, a whole predict process (stock: bench/stock_predict.py;
charseg: `charseg predict`), from start to exit (median of --process-runs, the three kinds in
turns, each just after an untimed import of torch and torchvision, so its libraries are in the
page cache), and training steps (median after a warm-up).
Quality: `charseg evaluate`'s metrics of CHECKPOINT on DATA at fp32 and at bf16 (`make demo`
gives both), and under the CPU's float16 autocast (fp16's numerics; charseg runs fp16 on CUDA).
"""

from __future__ import annotations

import argparse
import os
import platform
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

from benchmark import run_worker, spec_for  # noqa: E402  (bench/ is this script's folder)
from scaling import write_section  # noqa: E402

from charseg import __version__  # noqa: E402
from charseg import checkpoint as ckpt  # noqa: E402
from charseg.config import TrainConfig  # noqa: E402
from charseg.data.dataset import load_dataset_report  # noqa: E402
from charseg.data.generate import generate_dataset  # noqa: E402
from charseg.inference.evaluate import evaluate, evaluate_checkpoint  # noqa: E402
from charseg.inference.predict import load_model_for_inference  # noqa: E402
from charseg.model.build import build_model  # noqa: E402
from charseg.precision import Compute, native_bf16  # noqa: E402
from charseg.training import runner  # noqa: E402

HEADING = "## Mixed precision (bench/precision.py)"
FP16_ON_CPU = "fp16 (CPU autocast)"
METRICS = ("segm_AP", "segm_AP50", "bbox_AP50", "char_f1")


# Runs a command and prints its own peak RSS: the launcher is a bare interpreter, so the RSS
# Linux carries into a child at fork/exec (ru_maxrss) is a few MB, not this script's.
LAUNCHER = ("import resource, subprocess, sys; done = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
            "print(done.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); "
            "sys.stderr.write(done.stderr[-3000:])")


# Run untimed before each timed process: this machine drops cold page cache (a stock process's
# 18 GB pushes out more), and torch's libraries read back from disk took 2-25 s of an import.
WARM_UP = "import torch, torchvision"


def whole_process(args: list[str]) -> dict:
    """Seconds from start to exit and peak RSS of the process that runs ARGS, started with
    torch's and torchvision's files in the page cache (WARM_UP run just before)."""
    subprocess.run([sys.executable, "-c", WARM_UP], check=True)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", LAUNCHER, *args], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    code, peak_kb = done.stdout.split()
    if code != "0":
        raise RuntimeError(f"{' '.join(args)} failed:\n{done.stderr}")
    return {"seconds": seconds, "peak_rss_mb": int(peak_kb) / 1024}


def speed(dense_chars: int, steps: int, sparse_steps: int, process_runs: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        generate_dataset(tmp / "dense", num_images=1, width=1024, height=1024, chars_per_image=(dense_chars,) * 2,
                         font_size=(10, 16), seed=2)
        generate_dataset(tmp / "sparse", num_images=8, width=256, height=256, chars_per_image=(5, 15), seed=1)
        torch.manual_seed(0)
        spec = spec_for("dense", "pretrained", str(tmp / "dense"))
        weights = tmp / "pretrained.pth"
        torch.save(build_model(spec).state_dict(), weights)
        checkpoint = tmp / "dense.pth"  # the same weights, limits and anchors as a charseg checkpoint
        ckpt.save_checkpoint(ckpt.make_checkpoint(
            epoch=0, model=torch.load(weights, weights_only=True), optimizer={}, scheduler={}, warmup={}, seed=0,
            rng={}, config=TrainConfig(min_size=1024, max_size=1024).to_dict(), model_spec=spec.to_dict(),
            num_classes=spec.num_classes, metrics={}, best={}), checkpoint)
        page = str(next((tmp / "dense" / "images").iterdir()))
        rows = {}
        for task, page_set, n in (("inference", "dense", 1), ("train", "dense", steps), ("train", "sparse", sparse_steps)):
            for path in ("stock", "charseg", "charseg-bf16"):
                rows[(task, page_set, path)] = run_worker(task, path, page_set, "pretrained", tmp / page_set, weights, n)
        runs = {path: [] for path in ("stock", "charseg", "charseg-bf16")}
        for _ in range(process_runs):  # in turns, so a slower spell of the machine falls on all three
            for path in runs:
                out = str(tmp / f"predicted-{path}")
                args = [str(ROOT / "bench" / "stock_predict.py"), str(checkpoint), page, out] if path == "stock" \
                    else ["-m", "charseg", "predict", page, "--model", str(checkpoint), "--out", out, "--precision",
                          "bf16" if path.endswith("bf16") else "fp32"]
                runs[path].append(whole_process([sys.executable, *args]))
                print(f"  whole predict process {path:13s} {runs[path][-1]['seconds']:8.2f} s  "
                      f"{runs[path][-1]['peak_rss_mb']:9.0f} MB peak RSS", flush=True)
        for path, measured in runs.items():
            rows[("process", "dense", path)] = {key: statistics.median(m[key] for m in measured)
                                                for key in ("seconds", "peak_rss_mb")}
            rows[("process", "dense", path)]["all_seconds"] = [m["seconds"] for m in measured]
    return rows


def quality(checkpoint: str, data: str) -> dict:
    out = {}
    for precision in ("fp32", "bf16"):
        start = time.perf_counter()
        result = evaluate_checkpoint(checkpoint, data, device="cpu", precision=precision)
        out[precision] = {**{k: result.metrics[k] for k in METRICS}, "seconds": time.perf_counter() - start}
        print(precision, out[precision], flush=True)
    # fp16 is CUDA-only in charseg (a CPU has no fast float16); its numerics, though, are what the
    # CPU's float16 autocast computes too: the same model code, the same casts, emulated and slow.
    start = time.perf_counter()
    device = torch.device("cpu")
    model, spec, _ = load_model_for_inference(checkpoint, device)
    result = evaluate(model, load_dataset_report(data).samples, device, max_dets=spec.detections_per_img,
                      score_threshold=0.5, autocast=Compute(device, "fp16").autocast)
    out[FP16_ON_CPU] = {**{k: result.metrics[k] for k in METRICS}, "seconds": time.perf_counter() - start}
    print(FP16_ON_CPU, out[FP16_ON_CPU], flush=True)
    return out


def render(rows: dict, scores: dict, checkpoint: str, data: str) -> str:
    native, how = native_bf16(torch.device("cpu"))
    lines = [HEADING, "",
             f"Measured {date.today()} by `python bench/precision.py` on {platform.machine()}, {os.cpu_count()} CPU "
             f"cores ({how}), torch {torch.__version__}, charseg {__version__}. bf16 = `--precision bf16`: "
             "autocast to bfloat16 with weights, losses, anchors, box decoding and mask logits in float32. Stock "
             "torchvision has no CPU mixed precision; it runs float32.", "",
             "| pretrained layout | stock fp32 | charseg fp32 | charseg bf16 | bf16 / stock | bf16 / charseg fp32 |",
             "| --- | --- | --- | --- | --- | --- |"]
    labels = {("inference", "dense"): "dense 1024² page: inference to polygons (model and tracing)",
              ("process", "dense"): "dense 1024² page: whole predict process, start to exit",
              ("train", "dense"): "dense 1024² page: training step",
              ("train", "sparse"): "sparse 256² pages: training step"}
    for (task, page_set), label in labels.items():
        for key, unit, fmt in (("seconds", "time", "{:.2f} s"), ("peak_rss_mb", "peak RSS", "{:.0f} MB")):
            stock, fp32, bf16 = (rows[(task, page_set, p)][key] for p in ("stock", "charseg", "charseg-bf16"))
            lines.append(f"| {label}: {unit} | {fmt.format(stock)} | {fmt.format(fp32)} | {fmt.format(bf16)} | "
                         f"{bf16 / stock:.2f}x | {bf16 / fp32:.2f}x |")
    lines += ["", "Whole predict processes: the median of " + str(len(rows[("process", "dense", "stock")]["all_seconds"]))
              + " run in turns, each just after an untimed `python -c 'import torch, torchvision'` (so each starts "
              "with those libraries in the page cache); each one's seconds: " + "; ".join(
                  f"{p} " + ", ".join(f"{v:.2f}" for v in rows[("process", "dense", p)]["all_seconds"])
                  for p in ("stock", "charseg", "charseg-bf16")) + "."]
    lines += ["", "Besides the model, a whole process imports torch and torchvision (stock's import pulls in "
              "torch._dynamo, 1.1 s here; charseg's start-up leaves it out), builds the model and loads the checkpoint "
              "(charseg skips the random fills the load overwrites), decodes the page, writes the CSV, the overlay and "
              "the page copy, and exits. (Whole process minus inference is not given: they are timed in separate "
              "processes, and a slower spell of the machine shows in the difference more than these steps do.)"]
    lines += ["", f"The same checkpoint (`{checkpoint}`) evaluated on `{data}` (`charseg evaluate --precision ...`):",
              "", "| precision | " + " | ".join(METRICS) + " | evaluation time |",
              "| --- | " + " | ".join("---" for _ in METRICS) + " | --- |"]
    for precision, values in scores.items():
        lines.append(f"| {precision} | " + " | ".join(f"{values[k]:.4f}" for k in METRICS)
                     + f" | {values['seconds']:.1f} s |")
    delta = max(abs(scores["bf16"][k] - scores["fp32"][k]) for k in METRICS)
    delta16 = max(abs(scores[FP16_ON_CPU][k] - scores["fp32"][k]) for k in METRICS)
    lines += ["", f"Largest metric difference bf16 vs fp32: {delta:.4f}; fp16 vs fp32: {delta16:.4f}. {FP16_ON_CPU}: "
              "the model under the CPU's float16 autocast (charseg runs fp16 on CUDA only; this shows its numerics "
              "on a trained model — no overflow, the same scores — not its speed: the CPU emulates float16)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="A trained checkpoint (e.g. make demo's final model).")
    parser.add_argument("--data", required=True, help="Pages it never trained on (e.g. demo_heldout).")
    parser.add_argument("--dense-chars", type=int, default=1700)
    parser.add_argument("--steps", type=int, default=3, help="Dense training steps; the first warms up.")
    parser.add_argument("--sparse-steps", type=int, default=6, help="Sparse training steps; the first warms up.")
    parser.add_argument("--process-runs", type=int, default=3,
                        help="Whole predict processes of each kind, run in turns; the table gives the median.")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "BENCHMARKS.md")
    args = parser.parse_args()
    scores = quality(args.checkpoint, args.data)
    rows = speed(args.dense_chars, args.steps, args.sparse_steps, args.process_runs)
    section = render(rows, scores, args.checkpoint, args.data)
    print(section)
    write_section(args.out, section)
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
