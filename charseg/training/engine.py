"""One training epoch: a pure loop over the loader's batches that returns numbers (no files,
no tracking; loop.fit does those)."""

from __future__ import annotations

import contextlib
import math
import time
from collections import defaultdict
from typing import Callable, ContextManager, Iterable, Iterator

import torch
from tqdm import tqdm

from ..config import RESNET_STAGES
from ..errors import CharsegError
from ..model.sampling import loss_denominators
from . import distributed


class NonFiniteLossError(CharsegError):
    """A loss became NaN or infinite: training cannot continue from this state."""

    def __init__(self, epoch: int, step: int, losses: dict[str, float], image_names: list[str]):
        self.epoch, self.step, self.losses, self.image_names = epoch, step, losses, image_names
        parts = ", ".join(f"{k}={v:.4g}" for k, v in losses.items())
        super().__init__(f"non-finite loss at epoch {epoch}, step {step}: {parts}; batch images: "
                         f"{', '.join(image_names)}. Lower --lr, keep --clip-grad-norm on, or check these images")


class TrainingOutOfMemoryError(CharsegError):
    """A training step ran out of memory (the GPU's, or the CPU allocator's where it raises)."""

    def __init__(self, epoch: int, step: int, image_names: list[str], cause: Exception):
        text = str(cause).strip()
        reason = text.splitlines()[0] if text else type(cause).__name__
        super().__init__(
            f"out of memory at epoch {epoch}, step {step} (batch images: {', '.join(image_names)}): {reason}. "
            f"Keep fewer activations with --recompute-stages N (1-{RESNET_STAGES}; a resume may add it), or train "
            "with a smaller --batch-size, smaller pages (--max-size, --scale-train) or fewer --roi-samples")


# What the CPU allocator's error says when an allocation fails (a plain RuntimeError, not torch.OutOfMemoryError).
CPU_OUT_OF_MEMORY = "DefaultCPUAllocator: can't allocate memory"


@contextlib.contextmanager
def out_of_memory_explained(epoch: int, step: int, image_names: list[str]) -> Iterator[None]:
    """Within it, running out of memory is a TrainingOutOfMemoryError that names the step, its
    images and the options that use less; any other error passes unchanged."""
    try:
        yield
    except RuntimeError as exc:  # torch.OutOfMemoryError is one
        if not (isinstance(exc, torch.OutOfMemoryError) or CPU_OUT_OF_MEMORY in str(exc)):
            raise
        raise TrainingOutOfMemoryError(epoch, step, list(image_names), exc) from exc


# on_step(global_step, losses, lr): called every `log_every` steps with float losses.
StepCallback = Callable[[int, dict[str, float], float], None]


def train_one_epoch(model: torch.nn.Module, optimizer: torch.optim.Optimizer, loader: Iterable,
                    device: torch.device, epoch: int, *, steps_per_epoch: int,
                    iteration_scheduler: torch.optim.lr_scheduler.LRScheduler | None = None, iteration_steps: int = 0,
                    clip_grad_norm: float = 0.0, log_every: int = 10,
                    on_step: StepCallback | None = None, scaler: torch.amp.GradScaler | None = None,
                    autocast: Callable[[], ContextManager] = contextlib.nullcontext) -> dict[str, float]:
    """Train `model` for one pass over `loader`.

    Args:
        epoch: 1-based epoch number, used for global step numbers and messages.
        steps_per_epoch: len(loader); global step = (epoch - 1) * steps_per_epoch + i.
        iteration_scheduler: per-iteration LR scheduler (a warm-up, or a whole cosine schedule)
            stepped after each iteration while its last_epoch < iteration_steps.
        clip_grad_norm, scaler: see optimizer_step.
        on_step: called every `log_every` steps with (global step, losses, lr).
        autocast: the forward pass's autocast context (precision.Compute.autocast).
    Under torchrun (a DistributedDataParallel `model`), losses are weighted by `weigh_by_share`.
    Returns:
        Mean of each loss component and of the total "loss" (over all processes), plus "lr"
        (at the end), "images" (all processes), "seconds" and "images_per_s".
    Raises:
        NonFiniteLossError before the optimizer step when the loss is not finite.
    """
    model.train()
    sums: dict[str, float] = defaultdict(float)
    n_steps = n_images = 0
    start = time.perf_counter()
    # A progress bar on a terminal only (disable=None): logs of batch jobs stay readable.
    bar = tqdm(loader, total=steps_per_epoch, desc=f"epoch {epoch}", disable=None, dynamic_ncols=True, leave=True)
    for i, (images, targets, names) in enumerate(bar, start=1):
        step = (epoch - 1) * steps_per_epoch + i
        with out_of_memory_explained(epoch, step, names):
            loss_dict = _batch_losses(model, images, targets, device, autocast)
            loss = sum(loss_dict.values())
            values = global_values({**loss_dict, "loss": loss})
            if not math.isfinite(values["loss"]):
                bar.close()
                raise NonFiniteLossError(epoch, step, values, list(names))
            optimizer_step(model, optimizer, loss, clip_grad_norm, scaler)
        lr = optimizer.param_groups[0]["lr"]
        if iteration_scheduler is not None and iteration_scheduler.last_epoch < iteration_steps:
            iteration_scheduler.step()
        for k, v in values.items():
            sums[k] += v
        n_steps += 1
        n_images += len(images)
        bar.set_postfix(loss=f"{sums['loss'] / n_steps:.4f}", lr=f"{lr:.2e}")
        if on_step is not None and (i % log_every == 0 or i == steps_per_epoch):
            on_step(step, values, lr)
    bar.close()
    seconds = time.perf_counter() - start
    n_images = int(distributed.all_reduce_sum(torch.tensor(float(n_images), device=device)))
    result = {k: v / max(n_steps, 1) for k, v in sums.items()}
    result.update(lr=optimizer.param_groups[0]["lr"], images=float(n_images), seconds=seconds,
                  images_per_s=n_images / seconds if seconds > 0 else 0.0)
    return result


def _batch_losses(model: torch.nn.Module, images: list[torch.Tensor], targets: list[dict], device: torch.device,
                  autocast: Callable[[], ContextManager]) -> dict[str, torch.Tensor]:
    """The batch moved to DEVICE and through MODEL in training: its losses, under torchrun weighed
    by this process's share (weigh_by_share)."""
    images = [img.to(device, non_blocking=True) for img in images]
    targets = [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets]
    with autocast():
        loss_dict = model(images, targets)
    return weigh_by_share(loss_dict, unwrap(model)) if distributed.active() else loss_dict


def optimizer_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, loss: torch.Tensor,
                   clip_grad_norm: float, scaler: torch.amp.GradScaler | None) -> None:
    """Backward, clip the gradient norm (0: no clipping), step; float16's scaler scales the loss,
    unscales before clipping and skips steps with inf/NaN gradients."""
    optimizer.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
        if clip_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)
        optimizer.step()
        return
    scaler.scale(loss).backward()
    if clip_grad_norm > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)
    scaler.step(optimizer)
    scaler.update()


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DistributedDataParallel wrapper (itself otherwise)."""
    return getattr(model, "module", model)


def weigh_by_share(loss_dict: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Each loss is a mean over what this process sampled; DDP averages gradients over the
    processes. Scaled by processes x (this process's samples / all processes' samples), the
    average is the mean over everything sampled in the global batch: the single-process loss."""
    denominators = loss_denominators(model)
    names = [k for k in loss_dict if k in denominators]
    local = torch.stack([denominators[k].to(torch.float64) for k in names])
    total = distributed.all_reduce_sum(local.clone())
    size = torch.distributed.get_world_size()
    factors = torch.where(total > 0, size * local / total.clamp(min=1), torch.zeros_like(local))
    weighted = dict(loss_dict)
    for name, factor in zip(names, factors.tolist()):
        weighted[name] = loss_dict[name] * factor
    return weighted


def global_values(losses: dict[str, torch.Tensor]) -> dict[str, float]:
    """Float losses averaged over the processes (this process's own in a world of one)."""
    stacked = torch.stack([v.detach().to(torch.float64) for v in losses.values()])
    if distributed.active():
        stacked = distributed.all_reduce_sum(stacked) / torch.distributed.get_world_size()
    return dict(zip(losses, stacked.tolist()))
