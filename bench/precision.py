"""float32 vs bfloat16 autocast vs int8 (`--precision`) on this CPU: speed against stock
torchvision in the same run, and what the same trained checkpoint scores in each. Its section
of docs/BENCHMARKS.md is measured and written by `python bench/speed.py` (`speed`, `quality`,
`render`).

Speed: the pages of bench/benchmark.py (a dense 1024² page, 1700 characters asked for; eight
sparse 256² pages), random-init ResNet-50 FPN, charseg's fitted limits, each figure from a
fresh process: inference to polygons, a whole predict process (stock: bench/stock_predict.py;
charseg: `charseg predict`), from start to exit (median of --process-runs, the three kinds in
turns, each just after an untimed import of torch and torchvision, so its libraries are in the
page cache), and training steps (median after a warm-up).
int8 (`--precision int8`) is calibrated on the page it reads, as `predict` does by default;
its inference time leaves the calibration out (given apart), its whole process includes it;
a further whole process loads the int8 parts from a `--calibration-cache` file that an
untimed run wrote (CACHED), as every run after the first does.
Quality: `charseg evaluate`'s metrics of CHECKPOINT on DATA at fp32, bf16 and int8 (calibrated
on CALIBRATION_DIR's first pages: pages other than the ones scored), and under the CPU's
float16 autocast (fp16's numerics; charseg runs fp16 on CUDA).
"""

from __future__ import annotations

import compileall
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
from scaling import cpu_description  # noqa: E402

from charseg import __version__  # noqa: E402
from charseg import checkpoint as ckpt  # noqa: E402
from charseg.config import TrainConfig  # noqa: E402
from charseg.data.dataset import load_dataset_report  # noqa: E402
from charseg.data.generate import generate_dataset  # noqa: E402
from charseg.inference.evaluate import evaluate, evaluate_checkpoint  # noqa: E402
from charseg.inference.predict import load_model_for_inference  # noqa: E402
from charseg.model.build import build_model  # noqa: E402
from charseg.precision import Compute  # noqa: E402

HEADING = "## Mixed precision and int8 (bench/speed.py)"
PATHS = ("stock", "charseg", "charseg-bf16", "charseg-int8")
TRAINED = PATHS[:3]  # int8 is inference only
CACHED = "charseg-int8-cached"  # a whole predict process with --calibration-cache (written before it)
FP16_ON_CPU = "fp16 (CPU autocast)"
METRICS = ("segm_AP", "segm_AP50", "segm_AP75", "bbox_AP50", "char_f1")


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


def speed(dense_chars: int, steps: int, sparse_steps: int, process_runs: int, paths: tuple[str, ...] = PATHS) -> dict:
    """The speed rows of PATHS (stock, charseg and charseg-int8 always among them)."""
    compileall.compile_dir(ROOT / "charseg", quiet=1)  # bytecode, as an installed charseg has (PYTHONDONTWRITEBYTECODE)
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
        cache = tmp / "int8-calibration.pt"
        rows = {}
        for task, page_set, n in (("inference", "dense", 1), ("train", "dense", steps), ("train", "sparse", sparse_steps)):
            for path in [p for p in (PATHS if task == "inference" else TRAINED) if p in paths]:
                rows[(task, page_set, path)] = run_worker(task, path, page_set, "pretrained", tmp / page_set, weights, n)
        def process_args(path: str) -> list[str]:
            out = str(tmp / f"predicted-{path}")
            if path == "stock":
                return [str(ROOT / "bench" / "stock_predict.py"), str(checkpoint), page, out]
            return ["-m", "charseg", "predict", page, "--model", str(checkpoint), "--out", out, "--precision",
                    path.split("-")[1] if "-" in path else "fp32",
                    # the limit stock has: random weights fill any limit, which predict would raise
                    "--detections-per-img", str(spec.detections_per_img),
                    *(["--calibration-cache", str(cache)] if path == CACHED else [])]

        whole_process([sys.executable, *process_args(CACHED)])  # untimed: writes the calibration cache
        runs = {path: [] for path in (*paths, CACHED)}
        for _ in range(process_runs):  # in turns, so a slower spell of the machine falls on each
            for path in runs:
                runs[path].append(whole_process([sys.executable, *process_args(path)]))
                print(f"  whole predict process {path:13s} {runs[path][-1]['seconds']:8.2f} s  "
                      f"{runs[path][-1]['peak_rss_mb']:9.0f} MB peak RSS", flush=True)
        for path, measured in runs.items():
            rows[("process", "dense", path)] = {key: statistics.median(m[key] for m in measured)
                                                for key in ("seconds", "peak_rss_mb")}
            rows[("process", "dense", path)]["all_seconds"] = [m["seconds"] for m in measured]
    return rows


def quality(checkpoint: str, data: str, calibration_dir: str | None, emulated: bool = True) -> dict:
    """CHECKPOINT's scores at fp32 and int8, and (EMULATED) bf16 and the CPU's fp16 autocast."""
    out = {}
    for precision in ("fp32", "bf16", "int8") if emulated else ("fp32", "int8"):
        start = time.perf_counter()
        result = evaluate_checkpoint(checkpoint, data, device="cpu", precision=precision,
                                     calibration_dir=calibration_dir)
        out[precision] = {**{k: result.metrics[k] for k in METRICS}, "seconds": time.perf_counter() - start}
        print(precision, out[precision], flush=True)
    if not emulated:
        return out
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


def render(rows: dict, scores: dict, checkpoint: str, data: str, calibration_dir: str | None) -> str:
    lines = [HEADING, "",
             f"Measured {date.today()} by `python bench/speed.py` on {cpu_description()}, torch {torch.__version__}, "
             f"charseg {__version__}. bf16 = `--precision bf16`: autocast to bfloat16 with weights, losses, anchors, "
             "box decoding and mask logits in float32. int8 = `--precision int8` (docs/PRECISION.md): backbone, FPN, "
             "box and mask heads quantised, calibrated on the page itself (its inference time leaves the calibration "
             "out; the whole process includes it). Stock torchvision has no CPU mixed precision; it runs float32.", "",
             "| pretrained layout | stock fp32 | charseg fp32 | charseg bf16 | charseg int8 | fp32 / stock | "
             "bf16 / stock | int8 / stock | int8 / charseg fp32 |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    labels = {("inference", "dense"): "dense 1024² page: inference to polygons (model and tracing)",
              ("process", "dense"): "dense 1024² page: whole predict process, start to exit",
              ("train", "dense"): "dense 1024² page: training step",
              ("train", "sparse"): "sparse 256² pages: training step"}
    for (task, page_set), label in labels.items():
        for key, unit, fmt in (("seconds", "time", "{:.2f} s"), ("peak_rss_mb", "peak RSS", "{:.0f} MB")):
            values = [rows.get((task, page_set, p), {}).get(key) for p in PATHS]
            cells = [fmt.format(v) if v is not None else "—" for v in values]
            ratios = [f"{v / values[0]:.2f}x" if v is not None else "—" for v in values[1:]]
            ratios.append(f"{values[3] / values[1]:.2f}x" if values[3] is not None else "—")
            lines.append(f"| {label}: {unit} | " + " | ".join(cells + ratios) + " |")
    inference = {p: rows[("inference", "dense", p)] for p in PATHS if ("inference", "dense", p) in rows}
    lines += ["", "Detections on the dense page (limit " + str(inference["stock"]["detections"]) + "): "
              + ", ".join(f"{p} {inference[p]['detections']}" for p in inference)
              + f"; int8's calibration took {inference['charseg-int8']['calibration_seconds']:.1f} s (a float32 pass "
              "with observers over the page's 256 best detections, then the layers converted; docs/PRECISION.md)."]
    lines += ["", "Whole predict processes: the median of " + str(len(rows[("process", "dense", "stock")]["all_seconds"]))
              + " run in turns, each just after an untimed `python -c 'import torch, torchvision'` (so each starts "
              "with those libraries in the page cache); each one's seconds: " + "; ".join(
                  f"{p} " + ", ".join(f"{v:.2f}" for v in rows[("process", "dense", p)]["all_seconds"])
                  for p in (*PATHS, CACHED) if ("process", "dense", p) in rows) + "."]
    cached, fp32 = rows[("process", "dense", CACHED)], rows[("process", "dense", "charseg")]
    stock = rows[("process", "dense", "stock")]
    lines += ["", f"int8 loaded from a `--calibration-cache` file (its calibrated int8 parts, written by an "
              f"untimed run before; every run after the first loads them): whole predict process "
              f"{cached['seconds']:.2f} s, "
              f"{cached['peak_rss_mb']:.0f} MB peak RSS; {cached['seconds'] / stock['seconds']:.2f}x stock's time, "
              f"{cached['peak_rss_mb'] / stock['peak_rss_mb']:.2f}x its memory, "
              f"{cached['seconds'] / fp32['seconds']:.2f}x charseg fp32's time."]
    lines += ["", f"The same checkpoint (`{checkpoint}`) evaluated on `{data}` (`charseg evaluate --precision ...`; "
              f"int8 calibrated on the first pages of `{calibration_dir or data}`):",
              "", "| precision | " + " | ".join(METRICS) + " | evaluation time |",
              "| --- | " + " | ".join("---" for _ in METRICS) + " | --- |"]
    for precision, values in scores.items():
        lines.append(f"| {precision} | " + " | ".join(f"{values[k]:.4f}" for k in METRICS)
                     + f" | {values['seconds']:.1f} s |")
    deltas = {p: max(abs(scores[p][k] - scores["fp32"][k]) for k in METRICS) for p in scores if p != "fp32"}
    lines += ["", "Largest metric difference from fp32: " + ", ".join(f"{p} {d:.4f}" for p, d in deltas.items()) + "."
              + (f" {FP16_ON_CPU}: the model under the CPU's float16 autocast (charseg runs fp16 on CUDA only; this "
                 "shows its numerics on a trained model, not its speed: the CPU emulates float16)."
                 if FP16_ON_CPU in scores else " bf16 and fp16 left out (`--without-bf16`).")]
    return "\n".join(lines) + "\n"
