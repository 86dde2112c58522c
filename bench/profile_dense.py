"""Where a dense page's time goes: seconds per model part for charseg's training step and
inference. Prints figures; run it alone on an idle machine.

    python bench/profile_dense.py [--chars 1700] [--size 1024] [--weights none|coco] [--memory-format nchw]

The page, limits and anchors are the benchmark's (bench/benchmark.py); random weights of the
architecture `--weights` names. Times are forward passes of each part (the training step's
backward is reported as one figure), the median of two runs after a warm-up.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from charseg.config import LIMITS, TrainConfig  # noqa: E402
from charseg.data.dataset import scan_dataset
from charseg.data.generate import generate_dataset  # noqa: E402
from charseg.data.loading import CharacterDataset, collate
from charseg.model.architecture import resolve_spec  # noqa: E402
from charseg.model.build import build_model  # noqa: E402
from charseg.precision import training_memory_format  # noqa: E402

MEMORY_FORMATS = {"channels-last": torch.channels_last, "nchw": torch.contiguous_format}


def part_timers(model: torch.nn.Module) -> dict[str, list[float]]:
    """Forward hooks that add each part's seconds to the returned dict."""
    parts = {"backbone (ResNet)": model.backbone.body, "FPN": model.backbone.fpn, "RPN": model.rpn,
             "box RoI pooling": model.roi_heads.box_roi_pool, "box head": model.roi_heads.box_head,
             "mask RoI pooling": model.roi_heads.mask_roi_pool, "mask head (4 convs)": model.roi_heads.mask_head,
             "mask predictor (deconv)": model.roi_heads.mask_predictor, "RoI heads in all": model.roi_heads}
    seconds: dict[str, list[float]] = {name: [] for name in parts}
    for name, module in parts.items():
        starts: list[float] = []
        module.register_forward_pre_hook(lambda m, i, starts=starts: starts.append(time.perf_counter()))
        module.register_forward_hook(
            lambda m, i, o, name=name, starts=starts: seconds[name].append(time.perf_counter() - starts.pop()))
    return seconds


def run(model, step, repeats: int = 3) -> dict[str, float]:
    """Median seconds per part over the runs after the first (a warm-up)."""
    seconds = part_timers(model)
    totals = []
    per_run = []
    for _ in range(repeats):
        for values in seconds.values():
            values.clear()
        start = time.perf_counter()
        extra = step()
        totals.append(time.perf_counter() - start)
        per_run.append({**{k: sum(v) for k, v in seconds.items()}, **extra})
    figures = {k: statistics.median(r[k] for r in per_run[1:]) for k in per_run[0]}
    figures["total"] = statistics.median(totals[1:])
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chars", type=int, default=1700, help="Characters asked for on the page.")
    parser.add_argument("--size", type=int, default=1024, help="Page side in pixels (also the model input).")
    parser.add_argument("--weights", default="none", choices=("none", "coco"),
                        help="Architecture layout: none (live BatchNorm, all stages trained) or coco (pretrained).")
    parser.add_argument("--memory-format", default="auto", choices=("auto", *MEMORY_FORMATS),
                        help="The training step's memory layout: auto is the one charseg trains in on this CPU "
                             "(precision.training_memory_format); inference runs channels-last, as charseg's.")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        generate_dataset(tmp, num_images=1, width=args.size, height=args.size,
                         chars_per_image=(args.chars, args.chars), font_size=(10, 16), seed=2)
        samples = scan_dataset(tmp).samples
        images, targets, _ = collate([CharacterDataset(samples)[0]])
    n = len(samples[0].polygons)
    spec = resolve_spec(TrainConfig(min_size=args.size, max_size=args.size, weights=args.weights), samples, samples)
    torch.manual_seed(0)
    model = build_model(spec)
    layout = (training_memory_format(torch.device("cpu")) if args.memory_format == "auto"
              else MEMORY_FORMATS[args.memory_format])
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)

    def train_step() -> dict[str, float]:
        loss = sum(model(list(images), list(targets)).values())
        start = time.perf_counter()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return {"backward + optimizer": time.perf_counter() - start}

    def inference() -> dict[str, float]:
        with torch.inference_mode():
            detections = model(list(images))[0]
        return {"detections": float(len(detections["boxes"]))}

    limits = {k: getattr(spec, k) for k in LIMITS}
    print(f"{args.size}² page, {n} characters, --weights {args.weights} layout, limits "
          f"{limits}, anchors {spec.anchor_sizes}, {torch.get_num_threads()} threads")
    # Inference first: on these random weights every proposal scores alike, so it returns the
    # full detections_per_img, as a trained model does on a dense page (and as the benchmark).
    for name, step, mode in (("inference", inference, model.eval), ("training step", train_step, model.train)):
        mode()
        if step is train_step:
            model.to(memory_format=layout)
            name += f" ({next(k for k, v in MEMORY_FORMATS.items() if v == layout)})"
        figures = run(model, step)
        print(f"\n{name}: {figures.pop('total'):.2f} s")
        for part, value in figures.items():
            print(f"  {part:24s} {value:8.0f}" if part == "detections" else f"  {part:24s} {value:8.2f} s")


if __name__ == "__main__":
    main()
