"""One checkpoint schema: save atomically, load strictly, and one policy for which
checkpoint of a run (a folder, or a run's artifact names) to take."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import math
import os
import re
import shutil
import socket
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from .config import TrainConfig
from .errors import CheckpointError, empty_file, reason
from .model.build import ModelSpec

FORMAT = "charseg-checkpoint"
FORMAT_VERSION = 1
# Every key a checkpoint holds; loading rejects files with keys missing or extra.
KEYS = frozenset({
    "format", "format_version", "epoch", "model", "optimizer", "scheduler", "warmup", "seed",
    "rng", "config", "model_spec", "num_classes", "metrics", "best",
})
# Keys a checkpoint may lack (files written before they existed load without them).
OPTIONAL_KEYS = frozenset({
    "run_id",  # the MLflow run that wrote it ("" untracked): a resume from the file links to it
    "scaler",  # --precision fp16: the GradScaler's state ({} otherwise), so a resume stays exact
    "train_seconds",  # the run's training time so far, every resume counted (--time-budget)
    "stopped",  # model_final.pth of a run a stopping rule ended early: {"reason", "epoch", "message"}
})
FINAL_NAME = "model_final.pth"
BEST_NAME = "best.pth"
LAST_NAME = "last.pth"
_EPOCH_RE = re.compile(r"^model_epoch_(\d{3,})\.pth$")
# Held (fcntl.flock) by the one process writing an output folder; it names that process.
LOCK_NAME = ".charseg.lock"
# Temporary files of save_checkpoint and link_or_copy (".model_epoch_002.pth.x8k2.tmp").
TEMP_GLOB = ".*.pth.*.tmp"
# Temporary folders of checkpoints downloaded into an output folder (".download-4242-x8k2.tmp").
DOWNLOAD_GLOB = ".download-*.tmp"

# A write wants this much free space beyond the checkpoint's estimated size.
SPACE_MARGIN = 1.1

log = logging.getLogger("charseg")


def epoch_filename(epoch: int) -> str:
    """Versioned file name of an epoch's checkpoint: model_epoch_001.pth, ..."""
    return f"model_epoch_{epoch:03d}.pth"


def epoch_of_filename(name: str) -> int | None:
    """The epoch in a versioned checkpoint name (model_epoch_012.pth -> 12), else None."""
    match = _EPOCH_RE.match(name)
    return int(match.group(1)) if match else None


def pick_checkpoint(names: list[str], *, prefer_best: bool = False, epoch: int | None = None,
                    epoch_of: Callable[[str], float | None] | None = None) -> str | None:
    """The one policy for which checkpoint of a run or an output folder to use; None when none fits.

    epoch: that epoch's versioned file. Otherwise best.pth when `prefer_best` (fine-tune,
    evaluate, predict, register) and present, else the latest state (resume's choice): the
    file of the highest epoch. `epoch_of(name)` says a file's epoch, None for one that cannot
    be used (a folder reads each file: one cut short by a killed writer is passed over); by
    default the name says it (a run's artifacts): the final model, then the highest versioned
    epoch, then last.pth.
    """
    if epoch:
        wanted = epoch_filename(epoch)
        return wanted if wanted in names else None
    if prefer_best and BEST_NAME in names:
        return BEST_NAME
    epoch_of = epoch_of or _epoch_by_name
    dated = []  # (epoch, name) of each checkpoint file that can be used
    for name in names:
        if name in (LAST_NAME, FINAL_NAME) or epoch_of_filename(name) is not None:
            epoch = epoch_of(name)
            if epoch is not None:
                dated.append((epoch, name))
    return max(dated, key=lambda item: (item[0], item[1] == FINAL_NAME))[1] if dated else None


def _epoch_by_name(name: str) -> float:
    """A run artifact's epoch as its name tells it: the final model is the last, last.pth the
    least known."""
    if name == FINAL_NAME:
        return math.inf
    return -1 if name == LAST_NAME else epoch_of_filename(name)


def make_checkpoint(*, epoch: int, model: dict, optimizer: dict, scheduler: dict, warmup: dict, seed: int,
                    rng: dict, config: dict, model_spec: dict, num_classes: int, metrics: dict,
                    best: dict, run_id: str = "", scaler: dict | None = None,
                    train_seconds: float = 0.0) -> dict[str, Any]:
    """Assemble a checkpoint dict of the current schema (all arguments but run_id, scaler and
    train_seconds required).

    best: {"metric", "value", "epoch", "through_epoch"}: the best validation result among
    epochs 1..through_epoch, so a resumed run compares against the true best so far.
    train_seconds: the run's training time so far, every resume counted (--time-budget).
    """
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "epoch": epoch, "model": model,
            "optimizer": optimizer, "scheduler": scheduler, "warmup": warmup, "seed": seed, "rng": rng,
            "config": config, "model_spec": model_spec, "num_classes": num_classes, "metrics": metrics,
            "best": best, "run_id": run_id, "scaler": scaler or {}, "train_seconds": train_seconds}


def save_checkpoint(checkpoint: dict[str, Any], path: str | Path) -> Path:
    """Write `checkpoint` to `path` atomically: a crash mid-write never replaces a good file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    needed = state_bytes(checkpoint)
    ensure_space(path, needed)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp_name, 0o666 & ~_current_umask())  # mkstemp makes 0600; keep the user's umask
        with os.fdopen(fd, "wb") as fh:
            torch.save(checkpoint, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp_name, path)
    except BaseException as exc:
        Path(tmp_name).unlink(missing_ok=True)
        # torch.save reports a full disk as "[enforce fail at inline_container.cc:...] unexpected pos".
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC or \
                isinstance(exc, RuntimeError) and "unexpected pos" in str(exc):
            raise CheckpointError(_no_space(path, needed)) from exc
        raise
    return path


def state_bytes(state: Any) -> int:
    """The bytes of every tensor in a (nested) checkpoint: about its size on disk."""
    if isinstance(state, torch.Tensor):
        return state.nelement() * state.element_size()
    if isinstance(state, dict):
        return sum(state_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(state_bytes(v) for v in state)
    return 0


def ensure_space(path: Path, needed: int) -> None:
    """Raise CheckpointError (one line: what, where, how much) unless PATH's file system has
    room for `needed` bytes and SPACE_MARGIN more."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if shutil.disk_usage(path.parent).free < needed * SPACE_MARGIN:
        raise CheckpointError(_no_space(path, needed))


def _no_space(path: Path, needed: int) -> str:
    free = shutil.disk_usage(path.parent).free
    return (f"no space left on device writing {path}: {free / 1e9:.2f} GB free, a checkpoint needs about "
            f"{needed / 1e9:.2f} GB; free space or pass --output-dir elsewhere")


def save_checkpoint_as(checkpoint: dict[str, Any], paths: list[Path]) -> list[Path]:
    """Write `checkpoint` once, to paths[0], and give it the other names as hard links (a copy
    where the file system has none), each put in place atomically. Returns `paths`."""
    if paths:
        save_checkpoint(checkpoint, paths[0])
    for path in paths[1:]:
        link_or_copy(paths[0], path)
    return paths


def link_or_copy(source: Path, target: Path) -> Path:
    """Make `target` the same file as `source` (a hard link, else a copy), replacing it atomically."""
    tmp = target.with_name(f".{target.name}.{os.getpid()}.link.tmp")
    tmp.unlink(missing_ok=True)
    try:
        try:
            os.link(source, tmp)
        except OSError:  # no hard links here (some network and FUSE file systems)
            shutil.copyfile(source, tmp)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@dataclass
class Lineage:
    """Where a resume, fine-tune or evaluation started from: a run and/or a checkpoint URI; and
    where a train --config took its settings (tracking records them as tags)."""

    source_run_id: str = ""
    source_uri: str = ""
    config_source: str = ""


def folder_checkpoint(folder: Path, *, prefer_best: bool = False, epoch: int | None = None) -> Path:
    """The checkpoint of an output folder, by pick_checkpoint's policy, each file's epoch read
    from the file (one that does not load is passed over)."""
    names = sorted(p.name for p in folder.glob("*.pth"))
    name = pick_checkpoint(names, prefer_best=prefer_best, epoch=epoch,
                           epoch_of=lambda n: checkpoint_epoch(folder / n))
    if name is None and epoch:
        raise CheckpointError(f"{folder}: no {epoch_filename(epoch)} (checkpoints here: {', '.join(names) or 'none'})")
    if name is None:
        raise CheckpointError(f"{folder}: no charseg checkpoint here ({epoch_filename(1)}, ..., "
                              f"{LAST_NAME} or {FINAL_NAME}); pass a checkpoint file, a run ID or a URI")
    return folder / name


def local_checkpoint(source: str, *, prefer_best: bool = False, epoch: int | None = None) -> Path | None:
    """SOURCE's checkpoint when SOURCE is a local file or output folder (folder_checkpoint
    picks), else None (a run ID or an MLflow URI: tracking resolves those)."""
    local = Path(source)
    if local.is_file():
        if epoch:
            raise CheckpointError("--epoch picks a checkpoint of a run or a folder; with a file path, pass that "
                                  "epoch's file")
        return local
    if local.is_dir():
        return folder_checkpoint(local, prefer_best=prefer_best, epoch=epoch)
    return None


def load_checkpoint(path: str | Path, num_classes: int | None = None) -> dict[str, Any]:
    """Load and validate a charseg checkpoint on the CPU.

    Raises CheckpointError naming the file when it is missing, not a checkpoint, of an unknown
    format version, has missing or unknown keys, or holds another number of classes.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    if empty := empty_file(path):
        raise CheckpointError(f"{path}: not a charseg checkpoint: {empty}")
    try:
        with warnings.catch_warnings():  # torch's notes on foreign pickles; the error below says it plainly
            warnings.simplefilter("ignore", UserWarning)
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and weights_only errors all mean "not ours"
        if "Weights only load failed" in str(exc):
            raise CheckpointError(f"{path}: not a charseg checkpoint: it holds Python objects that could run code "
                                  "when unpickled; charseg loads tensors only (torch.load weights_only=True) and "
                                  "did not open it") from exc
        raise CheckpointError(f"{path}: not a charseg checkpoint ({reason(exc)})") from exc
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != FORMAT:
        holds = (f"a dict with keys {sorted(checkpoint)[:5]}" if isinstance(checkpoint, dict)
                 else type(checkpoint).__name__)
        raise CheckpointError(f"{path}: not a charseg checkpoint (it holds {holds}); for plain weights "
                              "use `--weights PATH` on train")
    version = checkpoint.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {version}, this charseg reads version "
                              f"{FORMAT_VERSION}; use the charseg release that wrote it")
    missing, unknown = KEYS - set(checkpoint), set(checkpoint) - KEYS - OPTIONAL_KEYS
    if missing or unknown:
        raise CheckpointError(f"{path}: checkpoint keys do not match version {FORMAT_VERSION} "
                              f"(missing {sorted(missing)}, unknown {sorted(unknown)})")
    if num_classes is not None and checkpoint["num_classes"] != num_classes:
        raise CheckpointError(f"{path}: checkpoint holds a {checkpoint['num_classes']}-class model, "
                              f"charseg expects {num_classes} (background + character)")
    for key, schema in (("config", TrainConfig), ("model_spec", ModelSpec)):
        try:
            schema.from_dict(checkpoint[key])
        except (ValueError, TypeError, AttributeError) as exc:
            raise CheckpointError(f"{path}: its {key} does not fit this charseg ({exc}); use the charseg "
                                  "release that wrote it") from exc
    return checkpoint


def checkpoint_epoch(path: Path) -> int | None:
    """The epoch a checkpoint file holds, read without loading its tensors; None when the file
    is missing, foreign or broken."""
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("epoch", -1))
    except Exception:
        return None


def final_written(checkpoint_path: str | Path, epoch: int, output_dir: str | Path) -> bool:
    """Whether the last epoch of a run, whose checkpoint is CHECKPOINT_PATH (of `epoch`), is
    complete: its model_final.pth (written after the epoch's validation, best.pth and held-out
    evaluation) is that file or lies beside it or in OUTPUT_DIR."""
    checkpoint_path = Path(checkpoint_path)
    if checkpoint_path.name == FINAL_NAME:
        return True
    return any(checkpoint_epoch(folder / FINAL_NAME) == epoch
               for folder in {checkpoint_path.parent, Path(output_dir)})


def find_latest(directory: str | Path) -> Path | None:
    """The checkpoint of the highest epoch in `directory` (versioned, last or final), or None."""
    try:
        return folder_checkpoint(Path(directory))
    except CheckpointError:
        return None


def this_process() -> str:
    """"PID n on HOST": how an output folder's lock and a run's charseg.writer tag name the
    process that trains."""
    return f"PID {os.getpid()} on {socket.gethostname()}"


@contextlib.contextmanager
def exclusive_output_dir(folder: str | Path, owner: str) -> Iterator[Path]:
    """Hold an OS lock on FOLDER for the block: one training writes a folder at a time.

    The lock (fcntl.flock on FOLDER/.charseg.lock, which then names `owner`) dies with its
    process, so a killed run never leaves the folder locked. A second process fails at once
    with a CheckpointError naming the folder and the holder. Holding the lock, the temporary
    files in FOLDER are a killed writer's: they are removed.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "another process"
            raise CheckpointError(f"{folder} is being written by {holder}: one training per output folder; wait for "
                                  "it to end or pass another --output-dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, owner.encode("utf-8"), 0)
        _remove_stale_temporaries(folder)
        yield folder
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def download_prefix() -> str:
    """Name prefix of this process's download folders (DOWNLOAD_GLOB)."""
    return f".download-{os.getpid()}-"


def _remove_stale_temporaries(folder: Path) -> None:
    """Delete the half-written checkpoints and downloads of a writer that was killed (the
    caller holds the folder's lock, so no live writer owns them; this process's own download
    is in use)."""
    stale = [p for p in folder.glob(TEMP_GLOB) if p.is_file()]
    stale += [p for p in folder.glob(DOWNLOAD_GLOB) if p.is_dir() and not p.name.startswith(download_prefix())]
    if stale:
        size = sum(f.stat().st_size for p in stale for f in ([p] if p.is_file() else p.rglob("*")) if f.is_file())
        for path in stale:
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        log.info("removed %d temporary file(s) (%.0f MB) left in %s by a killed writer: %s", len(stale), size / 1e6,
                 folder, ", ".join(p.name for p in stale))
