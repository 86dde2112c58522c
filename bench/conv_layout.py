"""Which memory layout trains a convolution faster on this CPU: one 3x3 256-channel convolution,
forward and backward, channels-last against NCHW, on a dense page's largest feature map and on a
mask head's batch of RoIs. The evidence for `precision.training_memory_format` (NCHW where the
CPU's kernels stop at AVX2: docs/BENCHMARKS_AVX2.md). Prints figures; run it alone.

    python bench/conv_layout.py
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python bench/conv_layout.py   # AVX2 kernels
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scaling import cpu_description  # noqa: E402

SHAPES = {"dense page, 256x256 level": (1, 256, 256, 256), "128 RoIs of 14x14": (128, 256, 14, 14)}
LAYOUTS = {"channels-last": torch.channels_last, "NCHW": torch.contiguous_format}


def measure(shape: tuple[int, ...], layout: torch.memory_format, input_grad: bool, repeats: int = 3) -> dict:
    """Median seconds of the forward and of the backward (weight gradient, and the input's when
    INPUT_GRAD) after a warm-up."""
    torch.manual_seed(0)
    conv = nn.Conv2d(shape[1], shape[1], 3, padding=1).to(memory_format=layout)
    x = torch.randn(*shape).contiguous(memory_format=layout).requires_grad_(input_grad)
    forward, backward = [], []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        y = conv(x)
        forward.append(time.perf_counter() - start)
        grad = torch.ones_like(y)
        start = time.perf_counter()
        y.backward(grad)
        backward.append(time.perf_counter() - start)
    return {"forward": statistics.median(forward[1:]), "backward": statistics.median(backward[1:])}


def main() -> None:
    print(f"{cpu_description()}; torch CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"{torch.get_num_threads()} threads")
    for label, shape in SHAPES.items():
        for input_grad in (True, False):
            for name, layout in LAYOUTS.items():
                s = measure(shape, layout, input_grad)
                what = "weight and input gradients" if input_grad else "weight gradient only"
                print(f"{label:26s} {name:14s} forward {s['forward']:.3f} s, backward ({what}) {s['backward']:.3f} s",
                      flush=True)


if __name__ == "__main__":
    main()
