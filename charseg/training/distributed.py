"""Multi-process training under torchrun: who this process is, and the few collectives charseg uses.

torchrun (PyTorch's own launcher, `python -m torch.distributed.run`) starts one process per
device and sets RANK, WORLD_SIZE and LOCAL_RANK; multi-node runs use its rendezvous flags
(--nnodes, --node-rank, --rdzv-endpoint), nothing of charseg's. Without torchrun, or with
one process, this module reports a world of one and every collective is a no-op.

Rank 0 is the only process that writes checkpoints, validates and talks to MLflow. A rank
that fails leaves its error in OUTPUT_DIR/.rank-N.error, which rank 0 quotes as the run's
failure reason (same machine or shared folder; torchrun ends the other ranks).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist

# How long ranks wait for each other at a collective: rank 0 validates and evaluates held-out
# pages while the others wait at the epoch's end. torchrun ends the job at once when a rank dies.
COLLECTIVE_TIMEOUT = timedelta(hours=2)
ERROR_PATTERN = ".rank-{rank}.error"


@dataclass(frozen=True)
class World:
    """This process's place among the training processes."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def main(self) -> bool:
        """The process that writes, validates and tracks."""
        return self.rank == 0


def world() -> World:
    """From torchrun's environment; a world of one without it."""
    try:
        return World(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                     int(os.environ.get("LOCAL_RANK", 0)))
    except ValueError as exc:
        raise RuntimeError(f"RANK/WORLD_SIZE/LOCAL_RANK are not integers: {exc}") from exc


def backend_for(device_type: str) -> str:
    """NCCL between GPUs, gloo between CPU processes."""
    return "nccl" if device_type == "cuda" else "gloo"


@contextlib.contextmanager
def process_group(device_type: str) -> Iterator[World]:
    """Join the torchrun job for the block (a no-op in a world of one). SIGTERM, which torchrun
    sends to the survivors when a rank fails or the job is stopped, is the training command's
    to handle (jobs.training_job)."""
    current = world()
    if not current.distributed or dist.is_initialized():
        yield current
        return
    if device_type == "cuda":
        torch.cuda.set_device(current.local_rank)
    dist.init_process_group(backend_for(device_type), timeout=COLLECTIVE_TIMEOUT)
    try:
        yield current
    finally:
        dist.destroy_process_group()


def ignore_termination() -> None:
    """Let this process finish recording a failure: torchrun's SIGKILL still follows in 30 s."""
    if active() or world().distributed:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if active():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place; returns the tensor (unchanged in a world of one)."""
    if active():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_object(value: Any, src: int = 0) -> Any:
    """Rank `src`'s `value` on every rank (pickled by torch.distributed)."""
    if not active():
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def broadcast_file(path: Path | None, dst_dir: Path) -> Path:
    """Rank 0's file, written into `dst_dir` on every other rank (other machines included);
    rank 0 gets `path` back."""
    if not active():
        return path
    payload = broadcast_object(path.read_bytes() if dist.get_rank() == 0 else None)
    if dist.get_rank() == 0:
        return path
    local = Path(dst_dir) / "checkpoint-from-rank-0.pth"
    local.write_bytes(payload)
    return local


def weights_digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 over named tensors (a state dict, named parameters), in name order."""
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(state[key].detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def differing_ranks(state: dict[str, torch.Tensor]) -> tuple[str, list[int]]:
    """This process's weights digest and the ranks whose weights differ from rank 0's."""
    mine = weights_digest(state)
    if not active():
        return mine, []
    digests = [None] * dist.get_world_size()
    dist.all_gather_object(digests, mine)
    return digests[0], [rank for rank, d in enumerate(digests) if d != digests[0]]


def error_path(output_dir: str | Path, rank: int) -> Path:
    return Path(output_dir) / ERROR_PATTERN.format(rank=rank)


def record_error(output_dir: str | Path, rank: int, exc: BaseException) -> None:
    """Leave a rank's error where rank 0 finds it; never raise from here."""
    with contextlib.suppress(OSError):
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        error_path(output_dir, rank).write_text(str(exc) or type(exc).__name__)


def peer_errors(output_dir: str | Path, size: int) -> dict[int, str]:
    """Errors other ranks recorded in OUTPUT_DIR (rank -> message)."""
    found = {}
    for rank in range(1, size):
        with contextlib.suppress(OSError):
            found[rank] = error_path(output_dir, rank).read_text().strip()
    return found


def clear_errors(output_dir: str | Path, size: int) -> None:
    """Remove error files left by an earlier job in this folder."""
    for rank in range(1, size):
        with contextlib.suppress(OSError):
            error_path(output_dir, rank).unlink()

