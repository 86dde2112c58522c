"""Where and how the model computes: the device, and the precision of its forward pass
(float32, autocast to bfloat16 / float16, or at inference on the CPU int8 heads:
inference/int8.py).

Autocast runs convolutions and matrix products in the lower precision and keeps weights,
optimizer state, normalisation, losses, anchors and box/mask decoding in float32
(the model's parts in model/ keep its outputs float32). Checkpoints are float32 whatever the
precision, so they load into any precision.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import CharsegError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
INFERENCE_PRECISIONS = (*PRECISIONS, "int8")  # int8: the RoI heads quantised after calibration (inference/int8.py)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# CPU flags of native bfloat16 arithmetic (Intel AMX, AVX-512 BF16; Linux /proc/cpuinfo).
CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")

log = logging.getLogger("charseg")
_warned_emulated: set[str] = set()  # devices already warned about, once per process


class PrecisionError(CharsegError, ValueError):
    """A precision this device cannot run."""


@functools.cache  # read once: --precision bf16 asks on every serving request that passes it
def cpu_bf16_flags() -> tuple[str, ...]:
    """The native-bfloat16 flags this CPU reports (empty where unknown)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ()
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return tuple(flag for flag in CPU_BF16_FLAGS if flag in flags)


def native_bf16(device: torch.device) -> tuple[bool, str]:
    """Whether DEVICE computes bfloat16 natively, and how that was found.

    A CUDA GPU does from compute capability 8.0 (Ampere) on; torch.cuda.is_bf16_supported()
    is not the test: by default it also says yes where bfloat16 is only emulated (T4, V100),
    and it asks about the current device, not DEVICE. ROCm GPUs compute it."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        native = bool(torch.version.hip) or major >= 8
        return native, (f"{torch.cuda.get_device_name(device)} (compute capability {major}.{minor}) "
                        f"{'computes' if native else 'only emulates'} bfloat16")
    flags = cpu_bf16_flags()
    return bool(flags), f"CPU flags {', '.join(flags)}" if flags else "no amx_bf16 / avx512_bf16 CPU flag"


def resolve(requested: str, device: torch.device, *, training: bool) -> tuple[str, str]:
    """(precision to run, why) for REQUESTED on DEVICE.

    auto: at inference bf16 where the device computes it natively (the same checkpoint scores
    within 0.01 of float32: docs/BENCHMARKS.md), else fp32; in training fp32 (bf16 training
    matched it on average over seed pairs, but their spread leaves a loss of about 0.01 possible:
    docs/BENCHMARKS.md, "bf16 training vs fp32"; pass --precision bf16 to choose it).
    bf16 where the device only emulates it is run as asked, with a warning (once per process).
    fp16 needs CUDA; int8 (inference only) the CPU. Raises PrecisionError.
    """
    choices = PRECISIONS if training else INFERENCE_PRECISIONS
    if requested not in choices:
        raise PrecisionError(f"precision must be one of {', '.join(choices)}, got {requested!r}"
                             + ("; int8 is for inference (predict, evaluate)" if requested == "int8" else ""))
    if requested == "int8" and device.type != "cpu":
        raise PrecisionError("--precision int8 runs on the CPU (PyTorch's x86 int8 kernels); on CUDA use bf16 or fp16")
    if requested == "fp16" and device.type != "cuda":
        raise PrecisionError("--precision fp16 needs a CUDA device (CPUs have no fast float16); use auto, fp32, or "
                             "bf16 on a CPU with amx_bf16 / avx512_bf16")
    if requested == "bf16":
        native, how = native_bf16(device)
        if not native and how not in _warned_emulated:
            _warned_emulated.add(how)
            # Emulated bfloat16 trains several times slower than float32 (docs/BENCHMARKS.md); T4 / V100 have fp16.
            speed, faster = (("no faster than", "fp16") if device.type == "cuda" else
                             ("several times slower than", "fp32"))
            log.warning("--precision bf16: %s: bfloat16 runs emulated, %s float32; --precision %s is the fast "
                        "choice on this device", how, speed, faster)
        return requested, "asked for" if native else f"asked for; emulated: {how}"
    if requested != "auto":
        return requested, "asked for"
    if training:
        return "fp32", "auto in training: float32 (bf16 training not shown equal to it: docs/BENCHMARKS.md)"
    native, how = native_bf16(device)
    return ("bf16", f"auto: {how}") if native else ("fp32", f"auto: {how}")


def autocast(precision: str, device_type: str):
    """The autocast context of PRECISION (a no-op for fp32)."""
    if precision not in DTYPES:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=DTYPES[precision])


def resolve_device(name: str) -> torch.device:
    """auto -> cuda if available else cpu; an explicit CUDA device must exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise CharsegError(f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:N") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CharsegError(f"--device {name}: no CUDA device is visible; use --device cpu or auto")
    return device


def training_memory_format(device: torch.device) -> torch.memory_format:
    """The layout the model trains in on DEVICE: channels-last (build_model's), except on a CPU
    whose kernels stop at AVX2 (no AVX-512; torch's CPU capability). There oneDNN computes a
    channels-last convolution's weight gradient with a kernel two to three times slower than
    the one it reorders NCHW into (on a dense page's largest maps: docs/BENCHMARKS_AVX2.md),
    and the forward passes run alike."""
    if device.type == "cpu" and torch.backends.cpu.get_cpu_capability() == "AVX2":
        return torch.contiguous_format
    return torch.channels_last


@dataclass(frozen=True)
class Compute:
    """Where and how a command's model computes, decided once per command (resolve_compute) and
    passed down, as timm's `amp_autocast`: the device, the forward pass's precision and, in
    training, the layout of the weights and activations."""

    device: torch.device
    precision: str = "fp32"  # fp32 | bf16 | fp16 | int8 (the heads quantised: no autocast)
    why: str = field(default="", compare=False)  # how auto chose, for the log
    memory_format: torch.memory_format = torch.channels_last  # training_memory_format in training

    def autocast(self):
        """The forward pass's autocast context (a no-op in fp32)."""
        return autocast(self.precision, self.device.type)

    def loss_scaler(self) -> torch.amp.GradScaler | None:
        """float16 training's loss scaler (its state goes into each checkpoint); None otherwise."""
        return torch.amp.GradScaler(self.device.type) if self.precision == "fp16" else None


def resolve_compute(device: str | torch.device, precision: str, *, training: bool) -> Compute:
    """DEVICE (a name, or a device already chosen) and PRECISION (auto: see `resolve`) as the
    Compute a command runs with; logs what was chosen. Raises CharsegError (PrecisionError)."""
    device = device if isinstance(device, torch.device) else resolve_device(device)
    chosen, why = resolve(precision, device, training=training)
    if not training:
        log.info("inference precision %s (%s)", chosen, why)
    elif chosen != "fp32":
        log.info("precision %s (%s)", chosen, why)
    return Compute(device, chosen, why, training_memory_format(device) if training else torch.channels_last)
