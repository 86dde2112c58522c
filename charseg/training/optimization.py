"""The optimizer and its learning-rate schedules: SGD, a per-iteration warm-up, then StepLR
per epoch (torchvision's reference recipe) or one cosine over every iteration."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..config import TrainConfig


@dataclass
class Optimization:
    """The optimizer and its LR schedules.

    step: a per-iteration linear warm-up within the first epoch, then StepLR per epoch
    (torchvision's reference recipe). cosine: one per-iteration schedule, the same warm-up
    then half a cosine to 0 at the run's last iteration.
    """

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None  # stepped after each epoch
    iteration_scheduler: torch.optim.lr_scheduler.LRScheduler | None  # stepped after each iteration ...
    iteration_steps: int  # ... while its count is below this

    @classmethod
    def create(cls, config: TrainConfig, model: torch.nn.Module, steps_per_epoch: int) -> "Optimization":
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(params, lr=config.effective_lr, momentum=config.momentum,
                                    weight_decay=config.weight_decay)
        warmup_iters = min(config.warmup_iters, steps_per_epoch)
        if config.lr_schedule == "cosine":
            total = config.epochs * steps_per_epoch
            schedule = torch.optim.lr_scheduler.LambdaLR(
                optimizer, lambda it: warmup_cosine(it, warmup_iters, config.warmup_factor, total))
            return cls(optimizer, None, schedule, total)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=config.lr_step_size, gamma=config.lr_gamma)
        warmup = (torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=config.warmup_factor,
                                                    total_iters=warmup_iters) if warmup_iters > 0 else None)
        return cls(optimizer, scheduler, warmup, warmup_iters)

    def state_dicts(self) -> dict[str, dict]:
        """The checkpoint's optimizer, scheduler (per epoch) and warmup (per iteration) entries."""
        return {"optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict() if self.scheduler is not None else {},
                "warmup": self.iteration_scheduler.state_dict() if self.iteration_scheduler is not None else {}}

    def load(self, state: dict) -> None:
        """Restore what `state_dicts` saved."""
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if self.iteration_scheduler is not None and state["warmup"]:
            self.iteration_scheduler.load_state_dict(state["warmup"])


def warmup_cosine(iteration: int, warmup_iters: int, warmup_factor: float, total: int) -> float:
    """LR multiplier at `iteration`: linear from warmup_factor to 1 over warmup_iters, times
    half a cosine from 1 at iteration 0 to 0 at `total`."""
    warm = 1.0 if iteration >= warmup_iters else warmup_factor + (1 - warmup_factor) * iteration / warmup_iters
    return warm * 0.5 * (1 + math.cos(math.pi * min(iteration, total) / max(total, 1)))
