"""The int8 model kept for the next process (`--calibration-cache FILE`, as TensorRT's
calibration cache, which keeps the calibration; this keeps what it made).

A process that quantises a model calibrates it (a float32 pass over pages), then prepares and
converts each part with FX (Python graph work that also imports torch._dynamo): a large share
of a start, even on a dense page (docs/BENCHMARKS_AVX2.md). The cache file holds
each converted part as TorchScript (its int8 weights and value ranges), so a later process
loads the parts and skips all three. It belongs to one model: it records a SHA-256 of the float
weights it was made from, the pages it was calibrated on and the torch that made it, and is
refused with the fix for anything else. Written by this process or the user's earlier one, it
is read as trusted as a checkpoint is (TorchScript code runs from it).
"""

from __future__ import annotations

import hashlib
import io
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from ..errors import CharsegError

CACHE_FORMAT = "charseg-int8-calibration/2"  # what a cache file says it is; /1 held value ranges only
_FIX = "delete it to calibrate again, or name another --calibration-cache file"


class CalibrationCacheError(CharsegError):
    """A --calibration-cache file that does not belong to this model or these pages."""


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 of MODEL's float32 state (names and values): which weights a cache belongs to."""
    digest = hashlib.sha256()
    state = model.state_dict()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(state[key].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())  # no copy
    return digest.hexdigest()


@contextmanager
def _quiet_torchscript():
    # torch.jit warns on every call that it is deprecated for torch.export; TorchScript is what
    # carries fbgemm's packed int8 weights between processes.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit\.")
        # A trace keeps as constants what the converted parts hold fixed (each activation's
        # scale) and drops torch's size checks of normalisation layers: what it warns about.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        yield


def write_cache(path: Path, converted: dict[str, nn.Module], examples: dict[str, tuple[torch.Tensor, ...]],
                fingerprint: str, pages: list[str]) -> None:
    """Save the CONVERTED parts (traced with their EXAMPLES inputs) for the weights FINGERPRINT
    names, calibrated on PAGES; atomically (a .partial file renamed)."""
    blobs = {}
    with _quiet_torchscript(), torch.no_grad():
        for name, module in converted.items():
            buffer = io.BytesIO()
            torch.jit.save(torch.jit.trace(module, examples[name], strict=False, check_trace=False), buffer)
            # as a tensor, not bytes: torch.load reads a tensor's storage at once, bytes through pickle
            blobs[name] = torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    torch.save({"format": CACHE_FORMAT, "model_sha256": fingerprint, "pages": list(pages),
                "torch": str(torch.__version__), "parts": blobs}, partial)
    partial.replace(path)


def read_cache(path: Path, part_names: Sequence[str], fingerprint: str,
               chosen_pages: Sequence[str] | None = None) -> tuple[dict[str, nn.Module], list[str]]:
    """The int8 parts PATH holds, by name, and the pages they were calibrated on. Raises
    CalibrationCacheError where PATH is not such a file, was made for other weights, other
    parts (PART_NAMES), by another torch, or on pages outside CHOSEN_PAGES (where given)."""
    saved = _load(path)
    if saved["model_sha256"] != fingerprint:
        raise CalibrationCacheError(f"--calibration-cache {path}: made for another model (its weights differ "
                                    f"from this checkpoint's); {_FIX}")
    if chosen_pages is not None and not set(saved["pages"]) <= set(chosen_pages):
        raise CalibrationCacheError(f"--calibration-cache {path}: calibrated on other pages "
                                    f"({', '.join(saved['pages'])}) than these; {_FIX}")
    if saved["torch"] != str(torch.__version__):
        raise CalibrationCacheError(f"--calibration-cache {path}: made by torch {saved['torch']}, whose int8 "
                                    f"layers may differ from torch {torch.__version__}'s; {_FIX}")
    if sorted(saved["parts"]) != sorted(part_names):
        raise CalibrationCacheError(f"--calibration-cache {path}: holds other parts "
                                    f"({', '.join(sorted(saved['parts']))}) than this model quantises; {_FIX}")
    try:
        with _quiet_torchscript():
            parts = {name: torch.jit.load(io.BytesIO(blob.numpy().tobytes()), map_location="cpu")
                     for name, blob in saved["parts"].items()}
    except RuntimeError as exc:
        raise CalibrationCacheError(f"--calibration-cache {path}: a part does not load "
                                    f"(torch.jit.load: {exc}); {_FIX}") from exc
    return parts, saved["pages"]


def _load(path: Path) -> dict:
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a torch.load of a foreign file raises anything from pickle to zip errors
        raise CalibrationCacheError(f"--calibration-cache {path}: not a charseg int8 calibration file "
                                    f"(torch.load: {type(exc).__name__}: {exc}); {_FIX}") from exc
    found = saved.get("format") if isinstance(saved, dict) else None
    if isinstance(found, str) and found.startswith(CACHE_FORMAT.rpartition("/")[0]) and found != CACHE_FORMAT:
        raise CalibrationCacheError(f"--calibration-cache {path}: written by another charseg version ({found}; this "
                                    f"one reads {CACHE_FORMAT}); {_FIX}")
    if found != CACHE_FORMAT:
        raise CalibrationCacheError(f"--calibration-cache {path}: not a charseg int8 calibration file; {_FIX}")
    return saved
