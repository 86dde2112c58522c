"""The main() of training: data, model, optimizer, (resume), epoch loop, checkpoints.

Three entry points, one per mode: `train`, `resume`, `finetune`. Each reads top to bottom:
config, data, the architecture (architecture.resolve_spec), the model; then hands the shared
epoch loop (`loop.fit`) fully built objects.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from .. import checkpoint as ckpt
from ..config import FINETUNE_LR_FACTOR, TrainConfig
from ..data.dataset import DatasetReport, Sample, load_dataset_report
from ..data.loading import choose_samples, split_samples
from ..errors import CharsegError
from ..model.architecture import FINETUNE_CHANGEABLE, FINETUNE_FIXED, resolve_spec
from ..model.build import NUM_CLASSES, ModelSpec, build_model, create_model
from ..precision import Compute
from .loop import NullTracker, RunResult, Splits, Tracker, check_config, fit
from .reproducibility import seed_everything
from .stopping import STOPPING_SETTINGS, stopped_message

log = logging.getLogger("charseg")

# Optimizer settings a fine-tune inherits from its source checkpoint's config unless given
# again (its architecture comes from the source's ModelSpec: architecture.resolve_spec).
FINETUNE_INHERITED = ("lr", "batch_size", "momentum", "weight_decay", "lr_schedule", "lr_step_size", "lr_gamma",
                      "warmup_iters", "warmup_factor", "clip_grad_norm", "augment")
# Settings a resume may change: where things are and how fast they run, never the maths.
RESUME_OVERRIDABLE = ("epochs", "data_dir", "val_dir", "heldout_dir", "replay_dir", "output_dir", "device",
                      "num_workers", "log_every", "save_every_epoch", "save_versioned", "world_size", "sync_batchnorm",
                      "precision", "recompute_stages", "val_every", *STOPPING_SETTINGS)


class TrainingAlreadyComplete(CharsegError):
    """Resume was asked for a run whose checkpoint already reached its last epoch."""


def make_splits(config: TrainConfig, report: DatasetReport) -> Splits:
    """Validation from --val-dir, else --val-fraction of DATA_DIR chosen by the seed; held-out
    pages from --heldout-dir; --replay-pages pages of --replay-dir, chosen by the seed."""
    if config.val_dir:
        train, val = report.samples, load_dataset_report(config.val_dir).samples
    else:
        train, val = split_samples(report.samples, config.val_fraction, config.seed)
    log.info("split: %d training images, %d validation images%s", len(train), len(val),
             "" if val else " (no validation: metrics and best.pth are off)")
    heldout = load_dataset_report(config.heldout_dir).samples if config.heldout_dir else []
    return Splits(train, val, heldout, _replay(config))


def _replay(config: TrainConfig) -> list[Sample]:
    """config.replay_pages pages of config.replay_dir, chosen by the seed (all of them, said so,
    where it holds fewer), in the folder's order."""
    if not config.replay_dir:
        return []
    samples = load_dataset_report(config.replay_dir).samples  # refuses a folder of no usable page
    chosen = choose_samples(samples, config.replay_pages, config.seed)
    log.info("replay: %d pages of %s train beside %s's%s", len(chosen), config.replay_dir, config.data_dir,
             f" (it holds {len(samples)}, fewer than --replay-pages {config.replay_pages})"
             if len(samples) < config.replay_pages else "")
    return chosen


def default_output_dir(mode: str) -> str:
    """outputs/<timestamp>-<mode>: a new folder per run so nothing is overwritten."""
    return str(Path("outputs") / f"{datetime.now():%Y%m%d-%H%M%S}-{mode}")


@dataclass
class TrainPlan:
    """A train run before its model is built: the checked config, the data and its split, and
    the ModelSpec the request resolves to (anchors and limits fitted to the data)."""

    config: TrainConfig
    report: DatasetReport
    splits: Splits
    spec: ModelSpec


def plan_train(config: TrainConfig) -> TrainPlan:
    """CONFIG checked, the data read and split, the architecture resolved (`train --print-config`
    shows this; `train` goes on to build and fit the model)."""
    config = dataclasses.replace(config, mode="train")
    check_config(config)
    seed_everything(config.seed)
    report = load_dataset_report(config.data_dir)
    splits = make_splits(config, report)
    return TrainPlan(config, report, splits, resolve_spec(config, splits.all, splits.training))


def train(config: TrainConfig, tracker: Tracker | None = None, compute: Compute | None = None) -> RunResult:
    """Train from the initial weights named by `config.weights` (on COMPUTE: default, the
    config's device and precision)."""
    plan = plan_train(dataclasses.replace(config, output_dir=config.output_dir or default_output_dir("train")))
    config, report, splits, spec = plan.config, plan.report, plan.splits, plan.spec
    model, how = create_model(spec, config.weights)
    log.info("model: %s Mask R-CNN, %s", spec.backbone, how)
    return fit(config, spec, model, report, splits, tracker or NullTracker(), compute=compute)


@dataclass
class ResumePlan:
    """A checkpoint loaded and checked for resuming, with the config the resumed run will use."""

    checkpoint_path: Path
    state: dict
    config: TrainConfig


def plan_resume(checkpoint_path: str | Path, overrides: dict[str, Any] | None = None,
                shown_as: str = "") -> ResumePlan:
    """Load CHECKPOINT for resuming and apply `overrides` (only RESUME_OVERRIDABLE keys).

    Raises TrainingAlreadyComplete, naming the checkpoint as SHOWN_AS (what the user passed:
    a download's temporary path means nothing to them) or its path, when it already reached
    the (new) last epoch.
    """
    overrides = dict(overrides or {})
    refused = sorted(set(overrides) - set(RESUME_OVERRIDABLE))
    if refused:
        raise CharsegError(f"resume keeps the checkpoint's training settings; cannot change {refused}")
    state = ckpt.load_checkpoint(checkpoint_path, NUM_CLASSES)
    saved = TrainConfig.from_dict(state["config"])
    config = dataclasses.replace(saved, **overrides, mode="resume", init_checkpoint=str(checkpoint_path))
    if not overrides.get("output_dir"):
        config.output_dir = str(Path(checkpoint_path).parent)
    check_config(config)
    stopped = stopped_message(state, shown_as or str(checkpoint_path))
    if stopped and not set(STOPPING_SETTINGS) & set(overrides):
        raise TrainingAlreadyComplete(stopped)
    if state["epoch"] > config.epochs or (
            state["epoch"] == config.epochs and ckpt.final_written(checkpoint_path, state["epoch"], config.output_dir)):
        raise TrainingAlreadyComplete(
            f"{shown_as or checkpoint_path}: training already finished all {config.epochs} epochs (checkpoint is epoch "
            f"{state['epoch']}); pass --epochs N with N > {state['epoch']} to train further")
    return ResumePlan(Path(checkpoint_path), state, config)


def resume(plan: ResumePlan | str | Path, overrides: dict[str, Any] | None = None,
           tracker: Tracker | None = None, compute: Compute | None = None) -> RunResult:
    """Continue a run from its checkpoint: model, optimizer, schedulers, epoch, seed and RNG.

    A checkpoint of the last epoch whose run stopped before model_final.pth (killed while
    validating, writing best.pth or evaluating held-out pages) is finished: what that epoch
    left undone is done, then model_final.pth is written.

    plan: a ResumePlan, or a checkpoint path planned here with `overrides`.
    """
    if not isinstance(plan, ResumePlan):
        plan = plan_resume(plan, overrides)
    config, state = plan.config, plan.state
    seed_everything(config.seed)
    report = load_dataset_report(config.data_dir)
    splits = make_splits(config, report)
    spec = resolve_spec(config, splits.all, splits.training, source=ModelSpec.from_dict(state["model_spec"]))
    model = build_model(spec)
    if state["epoch"] < config.epochs:
        log.info("resuming %s at epoch %d of %d", plan.checkpoint_path, state["epoch"] + 1, config.epochs)
    else:
        log.info("resuming %s: its run stopped before finishing epoch %d (no %s); finishing it", plan.checkpoint_path,
                 state["epoch"], ckpt.FINAL_NAME)
    return fit(config, spec, model, report, splits, tracker or NullTracker(), resume_state=state, compute=compute)


def finetune(checkpoint_path: str | Path, overrides: dict[str, Any],
             tracker: Tracker | None = None, compute: Compute | None = None) -> RunResult:
    """Start a new schedule from a checkpoint's weights only, at FINETUNE_LR_FACTOR x the LR.

    Architecture and optimizer settings come from the source checkpoint unless overridden;
    `overrides` must hold `data_dir`.
    """
    state = ckpt.load_checkpoint(checkpoint_path, NUM_CLASSES)
    source_spec = ModelSpec.from_dict(state["model_spec"])
    source_config = TrainConfig.from_dict(state["config"])
    inherited = {**{k: getattr(source_config, k) for k in FINETUNE_INHERITED},
                 **{k: getattr(source_spec, k) for k in (*FINETUNE_CHANGEABLE, *FINETUNE_FIXED)}}
    config = TrainConfig(**{**inherited, "lr_factor": FINETUNE_LR_FACTOR, **overrides}, mode="finetune",
                         weights=str(checkpoint_path), init_checkpoint=str(checkpoint_path))
    config.output_dir = config.output_dir or default_output_dir("finetune")
    check_config(config)
    seed_everything(config.seed)
    report = load_dataset_report(config.data_dir)
    splits = make_splits(config, report)
    spec = resolve_spec(config, splits.all, splits.training, source=source_spec)
    model = build_model(spec)
    model.load_state_dict(state["model"])
    log.info("fine-tuning weights of %s (epoch %d) at lr %.3g (%.1fx %.3g)", checkpoint_path, state["epoch"],
             config.effective_lr, config.lr_factor, config.lr)
    return fit(config, spec, model, report, splits, tracker or NullTracker(), compute=compute)


def best_or_final(result: RunResult) -> Path:
    """The checkpoint a finished run would register: best.pth when validated, else the final model."""
    best = result.output_dir / ckpt.BEST_NAME
    return best if result.best.get("epoch") and best.is_file() else result.final_checkpoint

