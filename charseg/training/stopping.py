"""When a run ends before its last epoch: `--early-stop-patience` (epochs without a better
validation metric) and `--time-budget` (minutes of training, every resume of the run counted).

Both are checked after an epoch's checkpoint and validation (patience at validations only,
when `--val-every` skips some epochs); the run then evaluates its held-out pages, writes
model_final.pth with the reason in it (a resume of that file says the run is complete) and
ends FINISHED, the reason a tag of its MLflow run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from ..config import TrainConfig

# The rules' names: a checkpoint's "stopped" record and the run's charseg.stop_reason tag.
EARLY_STOP = "early_stop"
TIME_BUDGET = "time_budget"
PRUNED = "pruned"  # a sweep's pruner (sweep.py), through the run's tracker
# Settings a resume may change to train on past a stopped run.
STOPPING_SETTINGS = ("early_stop_patience", "time_budget")


@dataclass
class Stop:
    """Why a run ended early: which rule, after which epoch, in words."""

    reason: str
    epoch: int
    message: str

    def to_dict(self) -> dict:
        return {"reason": self.reason, "epoch": self.epoch, "message": self.message}


@dataclass
class TrainingClock:
    """Seconds of training of this run: those of the processes before a resume, and this one's."""

    earlier: float = 0.0
    started: float = field(default_factory=time.monotonic)

    def spent(self) -> float:
        return self.earlier + time.monotonic() - self.started


def stop_after(config: TrainConfig, epoch: int, best: dict, spent_s: float) -> Stop | None:
    """The rule that ends the run after EPOCH (before config.epochs), or None to go on.
    best: the loop's best-so-far ({"metric", "value", "epoch"}); spent_s: TrainingClock.spent()."""
    if epoch >= config.epochs:
        return None
    patience = config.early_stop_patience
    validated = best.get("through_epoch") == epoch  # patience is judged at validations (--val-every)
    if patience and validated and best.get("epoch") and epoch - best["epoch"] >= patience:
        waited = epoch - best["epoch"]
        return Stop(EARLY_STOP, epoch, f"no better {best['metric']} for {waited} epoch{'s' if waited > 1 else ''} "
                                       f"(--early-stop-patience {patience}; best {best['value']:.4f} at epoch "
                                       f"{best['epoch']})")
    if budget_spent(config, spent_s):
        return Stop(TIME_BUDGET, epoch, f"the time budget is spent: {spent_s / 60:.1f} of --time-budget "
                                        f"{config.time_budget:g} minutes of training")
    return None


def budget_spent(config: TrainConfig, spent_s: float) -> bool:
    """Whether --time-budget (when set) is spent after SPENT_S seconds of training."""
    return bool(config.time_budget) and spent_s >= config.time_budget * 60


def validation_due(config: TrainConfig, epoch: int, spent_s: float) -> bool:
    """Whether EPOCH validates: every --val-every epochs, the last, and the one the time budget
    ends the run after (so its best.pth has seen the model it stops with)."""
    return epoch % config.val_every == 0 or epoch >= config.epochs or budget_spent(config, spent_s)


def stopped_message(state: dict, shown_as: str) -> str | None:
    """What a resume of a stopped run's final checkpoint says (None: the run did not stop early)."""
    stop = state.get("stopped")
    if not stop:
        return None
    return (f"{shown_as}: the run stopped after epoch {stop['epoch']}: {stop['message']}; to train on, resume it "
            f"with --early-stop-patience N or --time-budget MINUTES (0 turns either off)")
