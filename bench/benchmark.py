"""charseg vs stock torchvision Mask R-CNN on sparse and dense pages, float32: the first table
of docs/BENCHMARKS.md, measured and written by `python bench/speed.py` (`measure`, `render`).
Run as `python bench/benchmark.py --worker ...` it is one measurement's fresh process.

Every measurement of a model runs in a fresh process (peak RSS is per process), on the same
random-init ResNet-50 FPN weights, the same inputs, and the limits and anchor sizes charseg
fits to each page set (limits 0 and `--anchor-sizes auto`); only the mask path differs. Two
backbone layouts: "from scratch" (`--weights none`: live BatchNorm, all stages trained, as
torchvision builds a detector with no pretrained weights) and "pretrained" (`--weights coco|imagenet`, charseg's default: frozen
BatchNorm, 3 stages trained); the weights' values do not change time or memory.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scaling import cpu_description  # noqa: E402  (bench/ is this script's folder)

from charseg import __version__  # noqa: E402
from charseg.config import TrainConfig  # noqa: E402
from charseg.data.dataset import scan_dataset
from charseg.data.generate import generate_dataset  # noqa: E402
from charseg.data.images import load_image_rgb  # noqa: E402
from charseg.data.loading import CharacterDataset, collate
from charseg.inference.int8 import page_calibration, quantize_model  # noqa: E402
from charseg.inference.predict import outline_rule, output_to_instances  # noqa: E402
from charseg.model.architecture import resolve_spec  # noqa: E402
from charseg.model.build import build_model  # noqa: E402
from charseg.model.recompute import set_recompute_stages  # noqa: E402
from charseg.precision import Compute, training_memory_format  # noqa: E402

# The dense scratch step is also measured with this many backbone stages recomputed in the backward
# pass (--recompute-stages, model/recompute.py): the path RECOMPUTED.
RECOMPUTE_STAGES = 3
RECOMPUTED = "charseg-recompute"
LAYOUTS = {"scratch": "none", "pretrained": "coco"}  # the weights option whose architecture each layout is
SIZES = {"dense": 1024, "sparse": 256}  # page side; the model input keeps it (min_size = max_size)


def spec_for(page: str, layout: str, data_dir: str):
    """The architecture `charseg train` builds for this page set: limits and anchors fitted to it."""
    config = TrainConfig(min_size=SIZES[page], max_size=SIZES[page], weights=LAYOUTS[layout])
    samples = scan_dataset(data_dir).samples
    return resolve_spec(config, samples, samples)


def peak_rss_mb() -> float:
    """This process's own peak RSS. Linux's ru_maxrss also counts the parent's RSS at fork
    (kept across exec); VmHWM is the peak of this program's memory only."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(task: str, path: str, page: str, layout: str, data_dir: str, weights: str, steps: int) -> dict:
    """One measurement in this (fresh) process."""
    torch.manual_seed(0)
    stock = path == "stock"
    model = build_model(spec_for(page, layout, data_dir), polygon_native=not stock)
    model.load_state_dict(torch.load(weights, weights_only=True))
    # charseg-bf16: the same model under autocast; charseg-int8: quantised (bench/precision.py)
    precision = path.split("-", 1)[1] if path in ("charseg-bf16", "charseg-int8") else "fp32"
    autocast = Compute(torch.device("cpu"), precision).autocast
    samples = scan_dataset(data_dir).samples
    dataset = CharacterDataset(samples, full_masks=stock)
    if task == "train":
        model.train()
        if not stock:  # the layout charseg trains in on this CPU (its fit does the same)
            model.to(memory_format=training_memory_format(torch.device("cpu")))
            set_recompute_stages(model, RECOMPUTE_STAGES if path == RECOMPUTED else 0)
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)
        times = []
        for step in range(steps):
            images, targets, _ = collate([dataset[step % len(dataset)]])
            if not stock:
                targets = [{k: v for k, v in t.items() if k != "masks"} for t in targets]
            start = time.perf_counter()
            with autocast():
                loss = sum(model(list(images), list(targets)).values())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            times.append(time.perf_counter() - start)
        timed = sorted(times[1:] if len(times) > 1 else times)  # the first step warms up
        return {"seconds": timed[len(timed) // 2], "peak_rss_mb": peak_rss_mb(),
                "instances": int(len(samples[0].polygons)), "steps": len(timed)}
    model.eval()
    calibration = 0.0
    if path == "charseg-int8":  # calibrated on the page it then reads (predict's default), timed apart
        start = time.perf_counter()
        quantize_model(model, page_calibration([samples[0].image_path]))
        calibration = time.perf_counter() - start
    image, rgb = dataset[0][0], load_image_rgb(samples[0].image_path)
    with torch.inference_mode():
        start = time.perf_counter()
        with autocast():
            output = model([image])[0]
        # polygons: from pasted masks (stock) or box masks, outlined by the model's rule
        instances = output_to_instances(output, 0.0, rgb, outline_rule(model))
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_rss_mb": peak_rss_mb(), "detections": len(output["boxes"]),
            "polygons": len(instances), "calibration_seconds": calibration}


def run_worker(task: str, path: str, page: str, layout: str, data_dir: Path, weights: Path, steps: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", task, path, page, layout, str(data_dir), str(weights), str(steps)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{task} {path} {page} {layout} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"  {task:9s} {page:6s} {layout:10s} {path:8s} {result['seconds']:8.2f} s  "
          f"{result['peak_rss_mb']:9.0f} MB peak RSS", flush=True)
    return result


def loader_figures(data_dir: Path, workers: int) -> dict:
    """Data-loader time per image, and the share of an epoch spent outside the model step."""
    from torch.utils.data import DataLoader

    samples = scan_dataset(data_dir).samples
    out = {}
    for name, full_masks in (("charseg", False), ("stock", True)):
        loader = DataLoader(CharacterDataset(samples, full_masks=full_masks), batch_size=2, num_workers=0,
                            collate_fn=collate)
        for _ in loader:  # warm the file cache and imports, so the order of the two does not matter
            pass
        start = time.perf_counter()
        for _ in loader:
            pass
        out[f"load_ms_per_image_{name}"] = (time.perf_counter() - start) / len(samples) * 1000
    # One charseg epoch with the default number of workers: time blocked on the loader vs total.
    model = build_model(spec_for("sparse", "pretrained", str(data_dir))).train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)
    loader = DataLoader(CharacterDataset(samples), batch_size=2, num_workers=workers, collate_fn=collate,
                        persistent_workers=workers > 0)
    waiting = 0.0
    start = last = time.perf_counter()
    for images, targets, _ in loader:
        waiting += time.perf_counter() - last
        loss = sum(model(list(images), list(targets)).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        last = time.perf_counter()
    out["epoch_seconds"] = time.perf_counter() - start
    out["outside_step_share"] = waiting / out["epoch_seconds"]
    return out


def measure(dense_chars: int = 1700, dense_steps: int = 3, sparse_steps: int = 6) -> tuple:
    """Stock vs charseg float32, both backbone layouts: training steps on the dense and sparse
    pages, inference on the dense page, and data loading. Returns render's arguments."""
    workers = TrainConfig().num_workers
    logging.getLogger("charseg").setLevel(logging.ERROR)  # the fitted limits and anchors are in the report
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        print("generating pages ...", flush=True)
        generate_dataset(tmp / "sparse", num_images=8, width=256, height=256, chars_per_image=(5, 15), seed=1)
        generate_dataset(tmp / "dense", num_images=1, width=1024, height=1024,
                         chars_per_image=(dense_chars, dense_chars), font_size=(10, 16), seed=2)
        specs = {page: spec_for(page, "pretrained", str(tmp / page)) for page in SIZES}
        rows = {}
        for layout in LAYOUTS:
            torch.manual_seed(0)
            weights = tmp / f"{layout}.pth"
            torch.save(build_model(spec_for("dense", layout, str(tmp / "dense"))).state_dict(), weights)
            runs = [("train", "dense", dense_steps), ("train", "sparse", sparse_steps)]
            if layout == "pretrained":  # at inference both layouts are the same network
                runs.insert(1, ("inference", "dense", 1))
            for task, page, steps in runs:
                recomputed = (RECOMPUTED,) if (task, page, layout) == ("train", "dense", "scratch") else ()
                for path in ("stock", "charseg", *recomputed):
                    rows[(task, page, layout, path)] = run_worker(task, path, page, layout, tmp / page, weights,
                                                                  steps)
        loading = loader_figures(tmp / "sparse", workers)
    return rows, loading, workers, specs


def write_top(out: Path, report: str) -> None:
    """REPORT as the document's top part (its title and first table), the sections after it kept."""
    out.parent.mkdir(parents=True, exist_ok=True)
    existing = out.read_text() if out.exists() else ""
    if "\n## " in existing:
        report = report.rstrip("\n") + "\n" + existing[existing.index("\n## "):]
    out.write_text(report)


def render(rows: dict, loading: dict, workers: int, specs: dict) -> str:
    dense_n = rows[("train", "dense", "scratch", "stock")]["instances"]
    limits = ("rpn_proposals_train", "rpn_proposals_test", "roi_samples", "detections_per_img", "anchor_sizes")
    lines = [
        "# Benchmarks: charseg vs stock torchvision Mask R-CNN",
        "",
        f"Measured {date.today().isoformat()} by `python bench/speed.py` on {cpu_description()}, "
        f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM, "
        f"Python {platform.python_version()}, torch {torch.__version__}, charseg {__version__}, CPU only.",
        "Same random-init ResNet-50 FPN weights, inputs, limits and anchors for both paths (charseg's fitted "
        "ones: " + "; ".join(f"{page} " + ", ".join(f"{k} {getattr(spec, k)}" for k in limits)
                             for page, spec in specs.items()) + "). "
        "Each model figure comes from a fresh process (peak RSS of that process); training steps are the "
        "median after a warm-up step. Backbone layouts: *from scratch* = `--weights none` (live BatchNorm, all "
        "stages trained, as torchvision builds a detector without pretrained weights), *pretrained* = charseg's default `--weights coco` (frozen "
        "BatchNorm, 3 stages trained).",
        "",
        "| measurement | stock torchvision | charseg | charseg / stock |",
        "| --- | --- | --- | --- |",
    ]
    labels = {("train", "dense"): f"dense 1024² page ({dense_n} characters): training step",
              ("inference", "dense"): "dense page: inference to polygons",
              ("train", "sparse"): "sparse 256² pages: training step"}
    for (task, page, layout, path), charseg in rows.items():
        if path == "stock":
            continue
        stock = rows[(task, page, layout, "stock")]
        label = labels[(task, page)] + ("" if task == "inference" else f", {layout.replace('scratch', 'from scratch')}")
        label += f", charseg with --recompute-stages {RECOMPUTE_STAGES}" if path == RECOMPUTED else ""
        for key, unit in (("seconds", "time"), ("peak_rss_mb", "peak RSS")):
            fmt = (lambda v: f"{v:.2f} s") if key == "seconds" else (lambda v: f"{v:.0f} MB")
            lines.append(f"| {label}: {unit} | {fmt(stock[key])} | {fmt(charseg[key])} | "
                         f"{charseg[key] / stock[key]:.2f}x |")
    lines += [
        f"| data loading per sparse image (main process) | {loading['load_ms_per_image_stock']:.1f} ms | "
        f"{loading['load_ms_per_image_charseg']:.1f} ms | "
        f"{loading['load_ms_per_image_charseg'] / loading['load_ms_per_image_stock']:.2f}x |",
        f"| share of a sparse epoch spent outside the model step ({workers} workers) | | "
        f"{loading['outside_step_share'] * 100:.1f} % | |",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":  # one measurement in a fresh process, for run_worker
    task, path, page, layout, data_dir, weights, steps = sys.argv[2:9]
    print(json.dumps(worker(task, path, page, layout, data_dir, weights, int(steps))))
