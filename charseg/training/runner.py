"""The main() of training: data, model, optimizer, (resume), epoch loop, checkpoints.

Three entry points, one per mode: `train`, `resume`, `finetune`. Each reads top to bottom:
config, data, the architecture (architecture.resolve_spec), the model; then hands the shared
epoch loop (`_fit`) fully built objects.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import signal
import threading
import warnings
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

import torch
from torch.utils.data import DataLoader

from .. import checkpoint as ckpt
from ..config import FINETUNE_LR_FACTOR, TrainConfig
from ..data.augment import Augmentation
from ..data.dataset import DatasetReport, Sample, load_dataset_report
from ..data.loading import CharacterDataset, EpochShuffleSampler, collate, split_samples
from ..errors import CharsegError, DatasetError
from ..inference.evaluate import METRICS, evaluate, is_better
from ..inference.predict import load_model_for_inference
from ..model.architecture import FINETUNE_CHANGEABLE, FINETUNE_FIXED, resolve_spec
from ..model.build import NUM_CLASSES, ModelSpec, build_model, create_model
from ..precision import PrecisionError
from ..precision import resolve as resolve_precision
from . import distributed
from .engine import NonFiniteLossError, train_one_epoch
from .reproducibility import capture_rng_state, restore_rng_state, seed_everything, seed_worker

log = logging.getLogger("charseg")

# Optimizer settings a fine-tune inherits from its source checkpoint's config unless given
# again (its architecture comes from the source's ModelSpec: architecture.resolve_spec).
FINETUNE_INHERITED = ("lr", "batch_size", "momentum", "weight_decay", "lr_schedule", "lr_step_size", "lr_gamma",
                      "warmup_iters", "warmup_factor", "clip_grad_norm", "augment")
# Settings a resume may change: where things are and how fast they run, never the maths.
RESUME_OVERRIDABLE = ("epochs", "data_dir", "val_dir", "heldout_dir", "output_dir", "device", "num_workers",
                      "log_every", "save_every_epoch", "save_versioned", "world_size", "sync_batchnorm", "precision")


class TrainingAlreadyComplete(CharsegError):
    """Resume was asked for a run whose checkpoint already reached its last epoch."""


class Tracker(Protocol):
    """What the loop reports to (MLflow in tracking.py); every method may be a no-op."""

    run_id: str  # the tracking run's ID ("" when none), named in the output folder's lock

    def start(self, config: TrainConfig, report: DatasetReport, spec: ModelSpec, splits: "Splits") -> None: ...
    def log_step(self, step: int, losses: dict[str, float], lr: float) -> None: ...
    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None: ...
    def log_checkpoints_of_epoch(self, epoch: int, paths: list[Path], final: bool) -> None: ...
    def log_validation(self, epoch: int, metrics: dict[str, float], overlays: list) -> None: ...
    def log_heldout(self, epoch: int, metrics: dict[str, float] | None, overlays: list) -> None: ...
    def log_best(self, path: Path, best: dict) -> None: ...


class NullTracker:
    """Tracks nothing: the default when charseg runs without MLflow."""

    run_id = ""

    def start(self, config, report, spec, splits) -> None:
        pass

    def log_step(self, step, losses, lr) -> None:
        pass

    def log_epoch(self, epoch, metrics) -> None:
        pass

    def log_checkpoints_of_epoch(self, epoch, paths, final) -> None:
        pass

    def log_validation(self, epoch, metrics, overlays) -> None:
        pass

    def log_heldout(self, epoch, metrics, overlays) -> None:
        pass

    def log_best(self, path, best) -> None:
        pass


@dataclass
class RunResult:
    """What a training run produced."""

    output_dir: Path
    start_epoch: int
    history: list[dict[str, float]] = field(default_factory=list)  # one metrics dict per epoch
    checkpoints: list[Path] = field(default_factory=list)  # every file written, in order
    final_checkpoint: Path | None = None
    best: dict = field(default_factory=dict)  # {"metric", "value", "epoch", "through_epoch"}
    heldout: dict[str, float] = field(default_factory=dict)  # the final model's metrics on --heldout-dir


@contextlib.contextmanager
def deferred_interrupt():
    """Hold back SIGINT inside the block and raise KeyboardInterrupt after it, so an
    interrupted run always leaves its checkpoint complete. A no-op outside the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        log.warning("interrupted: checkpoint saved, stopping")
        raise KeyboardInterrupt


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


@dataclass
class Splits:
    """Training and validation samples of a run, and its held-out pages (--heldout-dir)."""

    train: list[Sample]
    val: list[Sample]
    heldout: list[Sample] = field(default_factory=list)

    @property
    def all(self) -> list[Sample]:
        return self.train + self.val


def make_splits(config: TrainConfig, report: DatasetReport) -> Splits:
    """Validation from --val-dir, else --val-fraction of DATA_DIR chosen by the seed; held-out
    pages from --heldout-dir."""
    if config.val_dir:
        train, val = report.samples, load_dataset_report(config.val_dir).samples
    else:
        train, val = split_samples(report.samples, config.val_fraction, config.seed)
    log.info("split: %d training images, %d validation images%s", len(train), len(val),
             "" if val else " (no validation: metrics and best.pth are off)")
    heldout = load_dataset_report(config.heldout_dir).samples if config.heldout_dir else []
    return Splits(train, val, heldout)


def default_output_dir(mode: str) -> str:
    """outputs/<timestamp>-<mode>: a new folder per run so nothing is overwritten."""
    return str(Path("outputs") / f"{datetime.now():%Y%m%d-%H%M%S}-{mode}")


def train(config: TrainConfig, tracker: Tracker | None = None) -> RunResult:
    """Train from the initial weights named by `config.weights`."""
    config = dataclasses.replace(config, mode="train", output_dir=config.output_dir or default_output_dir("train"))
    _check(config)
    seed_everything(config.seed)
    report = load_dataset_report(config.data_dir)
    splits = make_splits(config, report)
    spec = resolve_spec(config, splits.all, splits.train)
    model, how = create_model(spec, config.weights)
    log.info("model: %s Mask R-CNN, %s", spec.backbone, how)
    return _fit(config, spec, model, report, splits, tracker or NullTracker())


@dataclass
class ResumePlan:
    """A checkpoint loaded and checked for resuming, with the config the resumed run will use."""

    checkpoint_path: Path
    state: dict
    config: TrainConfig


def plan_resume(checkpoint_path: str | Path, overrides: dict[str, Any] | None = None) -> ResumePlan:
    """Load CHECKPOINT for resuming and apply `overrides` (only RESUME_OVERRIDABLE keys).

    Raises TrainingAlreadyComplete when the checkpoint already reached the (new) last epoch.
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
    _check(config)
    if state["epoch"] > config.epochs or (
            state["epoch"] == config.epochs and ckpt.final_written(checkpoint_path, state["epoch"], config.output_dir)):
        raise TrainingAlreadyComplete(
            f"{checkpoint_path}: training already finished all {config.epochs} epochs (checkpoint is epoch "
            f"{state['epoch']}); pass --epochs N with N > {state['epoch']} to train further")
    return ResumePlan(Path(checkpoint_path), state, config)


def resume(plan: ResumePlan | str | Path, overrides: dict[str, Any] | None = None,
           tracker: Tracker | None = None) -> RunResult:
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
    spec = resolve_spec(config, splits.all, splits.train, source=ModelSpec.from_dict(state["model_spec"]))
    model = build_model(spec)
    if state["epoch"] < config.epochs:
        log.info("resuming %s at epoch %d of %d", plan.checkpoint_path, state["epoch"] + 1, config.epochs)
    else:
        log.info("resuming %s: its run stopped before finishing epoch %d (no %s); finishing it", plan.checkpoint_path,
                 state["epoch"], ckpt.FINAL_NAME)
    return _fit(config, spec, model, report, splits, tracker or NullTracker(), resume_state=state)


def finetune(checkpoint_path: str | Path, overrides: dict[str, Any],
             tracker: Tracker | None = None) -> RunResult:
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
    _check(config)
    seed_everything(config.seed)
    report = load_dataset_report(config.data_dir)
    splits = make_splits(config, report)
    spec = resolve_spec(config, splits.all, splits.train, source=source_spec)
    model = build_model(spec)
    model.load_state_dict(state["model"])
    log.info("fine-tuning weights of %s (epoch %d) at lr %.3g (%.1fx %.3g)", checkpoint_path, state["epoch"],
             config.effective_lr, config.lr_factor, config.lr)
    return _fit(config, spec, model, report, splits, tracker or NullTracker())


def evaluate_checkpoint(checkpoint_path: str | Path, data_dir: str, *, device: str = "auto",
                        score_threshold: float = 0.5, detections_per_img: int | None = None,
                        scale_test: float | None = None, batch_size: int = 2, overlay_count: int = 0,
                        precision: str = "auto"):
    """Evaluate a checkpoint on every usable image of DATA_DIR (`detections_per_img`,
    `scale_test`: instead of the checkpoint's) at `precision`. Returns an EvalResult."""
    torch_device = resolve_device(device)
    model, spec, _ = load_model_for_inference(checkpoint_path, torch_device, detections_per_img, scale_test,
                                              precision)
    report = load_dataset_report(data_dir)
    return evaluate(model, report.samples, torch_device, max_dets=spec.detections_per_img,
                    score_threshold=score_threshold, batch_size=batch_size, overlay_count=overlay_count)


def best_or_final(result: RunResult) -> Path:
    """The checkpoint a finished run would register: best.pth when validated, else the final model."""
    best = result.output_dir / ckpt.BEST_NAME
    return best if result.best.get("epoch") and best.is_file() else result.final_checkpoint


def _check(config: TrainConfig) -> None:
    try:
        config.validate()
    except ValueError as exc:
        raise CharsegError(str(exc)) from exc
    if config.best_metric not in METRICS:
        raise CharsegError(f"--best-metric {config.best_metric!r} is not a validation metric; "
                           f"choose one of {', '.join(METRICS)}")


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


def _loader(config: TrainConfig, train: list[Sample], device: torch.device) -> tuple[DataLoader, EpochShuffleSampler]:
    """The training loader and its sampler (set_epoch before each epoch): this process's share
    of every epoch's order under torchrun."""
    dataset = CharacterDataset(train, augment=Augmentation() if config.augment else None, seed=config.seed)
    if config.num_workers > (os.cpu_count() or 1):  # a run resumed from a larger machine
        log.warning("warning: %d data-loader workers on a machine of %d CPUs; pass --num-workers %d or fewer",
                    config.num_workers, os.cpu_count() or 1, os.cpu_count() or 1)
    world = distributed.world()
    sampler = EpochShuffleSampler(len(dataset), config.seed, world.rank, world.size)
    # A private generator for the loader's worker seeds keeps the global RNG stream (used by
    # the RPN and ROI samplers) independent of the number of workers.
    loader = DataLoader(dataset, batch_size=config.batch_size, sampler=sampler,
                        generator=torch.Generator().manual_seed(config.seed),
                        num_workers=config.num_workers, collate_fn=collate, worker_init_fn=seed_worker,
                        pin_memory=device.type == "cuda", persistent_workers=config.num_workers > 0)
    return loader, sampler


def _training_device(name: str) -> torch.device:
    device = resolve_device(name)
    if device.type == "cuda" and distributed.world().distributed:
        device = torch.device("cuda", distributed.world().local_rank)  # one GPU per process
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    return device


def _fit(config: TrainConfig, spec: ModelSpec, model: torch.nn.Module, report: DatasetReport, splits: Splits,
         tracker: Tracker, resume_state: dict | None = None) -> RunResult:
    """The epoch loop shared by all modes, holding the output folder for the whole run (one
    writer per folder: under torchrun, rank 0 writes and the other ranks only train)."""
    config = dataclasses.replace(config, world_size=distributed.world().size)
    _check(config)
    if not distributed.world().main:
        return _epochs(config, spec, model, report, splits, tracker, resume_state)
    run_id = getattr(tracker, "run_id", "")
    owner = ckpt.this_process() + (f" (MLflow run {run_id})" if run_id else "")
    with ckpt.exclusive_output_dir(config.output_dir, owner):
        distributed.clear_errors(config.output_dir, config.world_size)
        return _epochs(config, spec, model, report, splits, tracker, resume_state)


def _epochs(config: TrainConfig, spec: ModelSpec, model: torch.nn.Module, report: DatasetReport, splits: Splits,
            tracker: Tracker, resume_state: dict | None) -> RunResult:
    """Train, step the LR, checkpoint, validate, report, epoch by epoch."""
    device = _training_device(config.device)
    model.to(device)
    try:
        precision, why = resolve_precision(config.precision, device, training=True)
    except PrecisionError as exc:
        raise CharsegError(str(exc)) from exc
    config.precision = model.precision = precision  # the run records the precision it used
    if precision != "fp32":
        log.info("precision %s (%s)", precision, why)
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None  # its state is in each checkpoint
    if not splits.train:
        raise DatasetError(f"{config.data_dir}: no image left for training after the validation split")
    loader, sampler = _loader(config, splits.train, device)
    heldout = splits.heldout
    opt = Optimization.create(config, model, len(loader))
    result = RunResult(output_dir=Path(config.output_dir), start_epoch=1,
                       best={"metric": config.best_metric, "value": None, "epoch": 0, "through_epoch": 0})
    if resume_state is not None:
        _restore(resume_state, model, opt, result, len(loader))
        if scaler is not None and resume_state.get("scaler"):
            scaler.load_state_dict(resume_state["scaler"])
    trained = _parallel(model, config, device)  # what the epochs run; `model` stays the plain module
    main = distributed.world().main
    tracker.start(config, report, spec, splits)
    if not main:  # the other ranks train and wait at each epoch's end while rank 0 writes and validates
        for epoch in range(result.start_epoch, config.epochs + 1):
            sampler.set_epoch(epoch)
            result.history.append(_train_epoch(trained, opt, loader, device, epoch, config, tracker, scaler))
            distributed.barrier()
        _check_replicas(model)
        return result
    if resume_state is not None and splits.val and result.best["through_epoch"] < resume_state["epoch"]:
        # The checkpoint was written before its epoch was validated: finish that first, so
        # the best-so-far is the true one (evaluation is deterministic).
        _validate(model, config, spec, splits.val, device, resume_state["epoch"], result.best, resume_state, tracker)
    if result.start_epoch > config.epochs:  # resuming a last epoch that stopped before model_final.pth
        if heldout:
            result.heldout = _heldout(model, config, spec, heldout, device, config.epochs, tracker)
        source = Path(config.init_checkpoint)
        result.checkpoints.append(_save_final(resume_state, config, tracker,
                                              source if source.parent == Path(config.output_dir) else None))
    else:
        log.info("training on %s%s: epochs %d-%d, %d steps per epoch, output %s", device,
                 f" x {config.world_size} processes (global batch {config.batch_size * config.world_size})"
                 if config.world_size > 1 else "", result.start_epoch, config.epochs, len(loader), config.output_dir)
    # Parameters and one momentum buffer each: what an epoch's checkpoint will need on disk.
    checkpoint_size = 2 * ckpt.state_bytes(model.state_dict())
    for epoch in range(result.start_epoch, config.epochs + 1):
        # Fail before the epoch's work, not after it, when its checkpoint cannot be written.
        ckpt.ensure_space(Path(config.output_dir) / ckpt.epoch_filename(epoch), checkpoint_size)
        sampler.set_epoch(epoch)
        metrics = _train_epoch(trained, opt, loader, device, epoch, config, tracker, scaler)
        result.history.append(metrics)
        # Checkpoint before anything else reports, so a later failure still leaves this epoch saved.
        state = ckpt.make_checkpoint(
            epoch=epoch, model=model.state_dict(), **opt.state_dicts(), seed=config.seed, rng=capture_rng_state(),
            config=config.to_dict(), model_spec=spec.to_dict(), num_classes=spec.num_classes,
            metrics={"history": result.history}, best=dict(result.best), run_id=tracker.run_id,
            scaler=scaler.state_dict() if scaler is not None else None)
        written = _save_epoch(state, config, epoch, metrics, tracker)
        result.checkpoints.extend(written)
        if splits.val:
            val_metrics = _validate(model, config, spec, splits.val, device, epoch, result.best, state, tracker)
            metrics.update({f"val_{k}": v for k, v in val_metrics.items()})
        if heldout:
            result.heldout = _heldout(model, config, spec, heldout, device, epoch, tracker)
        if epoch == config.epochs:  # last: the file that says the run is complete
            result.checkpoints.append(_save_final(state, config, tracker, written[0] if written else None))
        distributed.barrier()
    _check_replicas(model)
    result.final_checkpoint = Path(config.output_dir) / ckpt.FINAL_NAME
    return result


def _check_replicas(model: torch.nn.Module) -> None:
    """Under torchrun, every process must end with rank 0's weights (DDP keeps them in step;
    live BatchNorm's running statistics are each process's own and are not compared)."""
    if not distributed.active():
        return
    digest, differing = distributed.differing_ranks(dict(model.named_parameters()))
    if differing:
        raise CharsegError(f"the weights of ranks {differing} differ from rank 0's after training; the processes "
                           "fell out of step (report this with the command line)")
    log.info("weights identical in all %d processes (sha256 %s)", distributed.world().size, digest[:16])


def _heldout(model: torch.nn.Module, config: TrainConfig, spec: ModelSpec, pages: list[Sample],
             device: torch.device, epoch: int, tracker: Tracker) -> dict[str, float]:
    """Log the model's outlines on a few held-out pages; after the last epoch, evaluate it on
    all of them. Returns those metrics ({} before the last epoch)."""
    final = epoch == config.epochs
    shown = config.val_images_logged
    result = evaluate(model, pages if final else pages[:shown], device, max_dets=spec.detections_per_img,
                      score_threshold=config.score_threshold, batch_size=config.batch_size, overlay_count=shown)
    model.train()
    if final:
        log.info("held-out pages %s, final model: %s", config.heldout_dir,
                 ", ".join(f"{k}={v:.4f}" for k, v in result.metrics.items()))
    tracker.log_heldout(epoch, result.metrics if final else None, result.overlays)
    return result.metrics if final else {}


def _parallel(model: torch.nn.Module, config: TrainConfig, device: torch.device) -> torch.nn.Module:
    """Under torchrun, the model wrapped in DistributedDataParallel (gradients averaged over the
    processes after each backward; rank 0's weights broadcast at the start); else the model."""
    if not distributed.active():
        return model
    if config.sync_batchnorm and device.type != "cuda":
        raise CharsegError("--sync-batchnorm needs GPUs (PyTorch's SyncBatchNorm does not run on CPUs); on CPU "
                           "processes train with --norm group, whose statistics are per page")
    if config.sync_batchnorm:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    elif any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.training for m in model.modules()):
        log.warning("warning: live BatchNorm trained in %d processes normalises over each process's %d pages; "
                    "--sync-batchnorm uses the global batch", config.world_size, config.batch_size)
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def _restore(state: dict, model: torch.nn.Module, opt: Optimization, result: RunResult, steps_per_epoch: int) -> None:
    """Put the model, optimizer, schedules, RNGs, history and best-so-far back as saved.

    A per-iteration schedule (cosine) continues at the start of the next epoch in this run's
    steps per epoch, which change when a run resumes with another number of processes."""
    model.load_state_dict(state["model"])
    opt.load(state)
    if opt.iteration_scheduler is not None and not opt.scheduler:  # cosine: one schedule over every iteration
        opt.iteration_scheduler.last_epoch = min(state["epoch"] * steps_per_epoch, opt.iteration_steps)
    restore_rng_state(state["rng"])
    result.start_epoch = state["epoch"] + 1
    result.history = list(state["metrics"].get("history", []))
    result.best = dict(state["best"])


def _train_epoch(model: torch.nn.Module, opt: Optimization, loader: DataLoader, device: torch.device, epoch: int,
                 config: TrainConfig, tracker: Tracker, scaler: torch.amp.GradScaler | None = None) -> dict[str, float]:
    """One epoch and its StepLR step; returns the epoch's metrics (see train_one_epoch)."""
    with warnings.catch_warnings():
        if scaler is not None:  # the loss scaler skips steps by design while it backs off (PyTorch's AMP recipe)
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
        try:
            metrics = train_one_epoch(
                model, opt.optimizer, loader, device, epoch, steps_per_epoch=len(loader),
                iteration_scheduler=opt.iteration_scheduler, iteration_steps=opt.iteration_steps,
                clip_grad_norm=config.clip_grad_norm, log_every=config.log_every, on_step=tracker.log_step,
                scaler=scaler)
        except NonFiniteLossError as exc:
            raise CharsegError(str(exc)) from exc
        if opt.scheduler is not None:
            opt.scheduler.step()
    metrics["epoch"] = float(epoch)
    components = ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if k.startswith("loss_"))
    log.info("epoch %d/%d finished: avg loss %.4f (%s), lr %.2e, %.1f images/s", epoch, config.epochs,
             metrics["loss"], components, metrics["lr"], metrics["images_per_s"])
    return metrics


def _save_epoch(state: dict, config: TrainConfig, epoch: int, metrics: dict[str, float],
                tracker: Tracker) -> list[Path]:
    """Write the epoch's checkpoint (unless --no-save-every-epoch), hand it to the tracker and
    report the epoch's metrics. Returns the paths written."""
    paths = []
    if config.save_every_epoch:
        paths.append(Path(config.output_dir) / (ckpt.epoch_filename(epoch) if config.save_versioned
                                                else ckpt.LAST_NAME))
    with deferred_interrupt():  # Ctrl-C waits until this epoch's file is written and logged
        for path in paths:
            ckpt.save_checkpoint(state, path)
            log.info("saved checkpoint %s", path)
        tracker.log_checkpoints_of_epoch(epoch, paths, False)
        tracker.log_epoch(epoch, metrics)
    return paths


def _save_final(state: dict, config: TrainConfig, tracker: Tracker, written: Path | None) -> Path:
    """model_final.pth, after everything else of the last epoch: a hard link to the epoch's
    file when there is one (one serialisation), else its own write. Returns its path."""
    path = Path(config.output_dir) / ckpt.FINAL_NAME
    with deferred_interrupt():
        if written is not None:
            ckpt.link_or_copy(written, path)
        else:
            ckpt.save_checkpoint(state, path)
        log.info("saved checkpoint %s", path)
        tracker.log_checkpoints_of_epoch(state["epoch"], [path], True)
    return path


def _validate(model: torch.nn.Module, config: TrainConfig, spec: ModelSpec, val: list[Sample],
              device: torch.device, epoch: int, best: dict, state: dict, tracker: Tracker) -> dict[str, float]:
    """Evaluate after `epoch`'s checkpoint is saved; write best.pth when the metric improves.

    Updates `best` in place and returns the validation metrics.
    """
    result = evaluate(model, val, device, max_dets=spec.detections_per_img, score_threshold=config.score_threshold,
                      batch_size=config.batch_size, overlay_count=config.val_images_logged)
    model.train()
    metrics = result.metrics
    log.info("epoch %d validation: %s", epoch, ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    value = metrics[config.best_metric]
    if is_better(config.best_metric, value, best["value"]):
        best.update(value=value, epoch=epoch)
    best["through_epoch"] = epoch
    with deferred_interrupt():  # Ctrl-C during best.pth's write still logs the metrics computed
        if best["epoch"] == epoch:
            # Its own write: best.pth records this validation, which the epoch's file (saved
            # before validating, so a crash in evaluation still leaves it) cannot.
            path = ckpt.save_checkpoint({**state, "best": dict(best)}, Path(config.output_dir) / ckpt.BEST_NAME)
            log.info("new best %s %.4f at epoch %d: saved %s", config.best_metric, value, epoch, path)
            tracker.log_best(path, dict(best))
        tracker.log_validation(epoch, metrics, result.overlays)
    return metrics
