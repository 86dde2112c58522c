"""charseg vs stock torchvision Mask R-CNN on sparse and dense pages: prints figures and
writes docs/BENCHMARKS.md. A script, not a test: run it alone on an idle machine.

    python bench/benchmark.py [--out docs/BENCHMARKS.md] [--dense-chars 1700]

Every measurement of a model runs in a fresh process (peak RSS is per process), on the same
random-init ResNet-50 FPN weights and the same inputs; only the mask path differs.
"""

from __future__ import annotations

import argparse
import json
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

from charseg import __version__  # noqa: E402
from charseg.data import CharacterDataset, collate, scan_dataset  # noqa: E402
from charseg.generate import generate_dataset  # noqa: E402
from charseg.inference import output_to_instances  # noqa: E402
from charseg.model import build_model, spec_for_weights  # noqa: E402

# Limits raised so stock torchvision can hold a dense page at all (same for both paths).
LIMITS = dict(rpn_proposals_train=4000, rpn_proposals_test=4000, roi_samples=512, detections_per_img=2000)


def spec_for(page: str):
    size = 1024 if page == "dense" else 256
    return spec_for_weights("resnet50", "none", min_size=size, max_size=size, **LIMITS)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(task: str, path: str, page: str, data_dir: str, weights: str, steps: int) -> dict:
    """One measurement in this (fresh) process."""
    torch.manual_seed(0)
    stock = path == "stock"
    model = build_model(spec_for(page), polygon_native=not stock)
    model.load_state_dict(torch.load(weights, weights_only=True))
    samples = scan_dataset(data_dir).samples
    dataset = CharacterDataset(samples, full_masks=stock)
    if task == "train":
        model.train()
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)
        times = []
        for step in range(steps):
            images, targets, _ = collate([dataset[step % len(dataset)]])
            if not stock:
                targets = [{k: v for k, v in t.items() if k != "masks"} for t in targets]
            start = time.perf_counter()
            loss = sum(model(list(images), list(targets)).values())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            times.append(time.perf_counter() - start)
        timed = sorted(times[1:] if len(times) > 2 else times)  # first step warms up when there are several
        return {"seconds": timed[len(timed) // 2], "peak_rss_mb": peak_rss_mb(),
                "instances": int(len(samples[0].polygons))}
    model.eval()
    image = dataset[0][0]
    with torch.inference_mode():
        start = time.perf_counter()
        output = model([image])[0]
        instances = output_to_instances(output, 0.0)  # polygons: from pasted masks (stock) or box masks
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_rss_mb": peak_rss_mb(), "detections": len(output["boxes"]),
            "polygons": len(instances)}


def run_worker(task: str, path: str, page: str, data_dir: Path, weights: Path, steps: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", task, path, page, str(data_dir), str(weights), str(steps)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{task} {path} {page} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"  {task:9s} {page:6s} {path:8s} {result['seconds']:8.2f} s  {result['peak_rss_mb']:9.0f} MB peak RSS",
          flush=True)
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
    model = build_model(spec_for("sparse")).train()
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "docs" / "BENCHMARKS.md"), help="Markdown report to write.")
    parser.add_argument("--dense-chars", type=int, default=1700, help="Characters asked for on the dense page.")
    parser.add_argument("--sparse-steps", type=int, default=6, help="Timed sparse training steps (median).")
    args = parser.parse_args()
    from charseg.config import TrainConfig

    workers = TrainConfig().num_workers
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        print("generating pages ...", flush=True)
        generate_dataset(tmp / "sparse", num_images=8, width=256, height=256, chars_per_image=(5, 15), seed=1)
        generate_dataset(tmp / "dense", num_images=1, width=1024, height=1024,
                         chars_per_image=(args.dense_chars, args.dense_chars), font_size=(10, 16), seed=2)
        torch.manual_seed(0)
        weights = tmp / "weights.pth"
        torch.save(build_model(spec_for("dense")).state_dict(), weights)
        rows = {}
        for task, page, steps in (("train", "sparse", args.sparse_steps), ("train", "dense", 1),
                                  ("inference", "dense", 1)):
            for path in ("stock", "charseg"):
                rows[(task, page, path)] = run_worker(task, path, page, tmp / page, weights, steps)
        loading = loader_figures(tmp / "sparse", workers)
    report = render(rows, loading, workers)
    print(report)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(report)
    print(f"written to {args.out}")


def render(rows: dict, loading: dict, workers: int) -> str:
    def ratio(task, page, key):
        return rows[(task, page, "charseg")][key] / rows[(task, page, "stock")][key]

    dense_n = rows[("train", "dense", "stock")]["instances"]
    lines = [
        "# Benchmarks: charseg vs stock torchvision Mask R-CNN",
        "",
        f"Measured {date.today().isoformat()} by `python bench/benchmark.py` on {platform.machine()}, "
        f"{os.cpu_count()} CPU cores, {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM, "
        f"Python {platform.python_version()}, torch {torch.__version__}, charseg {__version__}, CPU only.",
        f"Same random-init ResNet-50 FPN weights and inputs for both; limits {LIMITS}. Each model figure comes "
        "from a fresh process (peak RSS of that process).",
        "",
        "| measurement | stock torchvision | charseg | charseg / stock |",
        "| --- | --- | --- | --- |",
    ]
    for (task, page), label in (((("train", "dense")), f"dense 1024² page ({dense_n} characters): training step"),
                                ((("inference", "dense")), "dense page: inference to polygons"),
                                ((("train", "sparse")), "sparse 256² pages: training step (median)")):
        s, c = rows[(task, page, "stock")], rows[(task, page, "charseg")]
        lines.append(f"| {label}: time | {s['seconds']:.2f} s | {c['seconds']:.2f} s | "
                     f"{ratio(task, page, 'seconds'):.2f}x |")
        lines.append(f"| {label}: peak RSS | {s['peak_rss_mb']:.0f} MB | {c['peak_rss_mb']:.0f} MB | "
                     f"{ratio(task, page, 'peak_rss_mb'):.2f}x |")
    lines += [
        f"| data loading per sparse image (main process) | {loading['load_ms_per_image_stock']:.1f} ms | "
        f"{loading['load_ms_per_image_charseg']:.1f} ms | "
        f"{loading['load_ms_per_image_charseg'] / loading['load_ms_per_image_stock']:.2f}x |",
        f"| share of a sparse epoch spent outside the model step ({workers} workers) | | "
        f"{loading['outside_step_share'] * 100:.1f} % | |",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        task, path, page, data_dir, weights, steps = sys.argv[2:8]
        print(json.dumps(worker(task, path, page, data_dir, weights, int(steps))))
    else:
        main()
