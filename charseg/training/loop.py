"""The epoch loop shared by train, resume and fine-tune: train an epoch (engine.py), write its
checkpoint, validate, evaluate held-out pages, report; rank 0 writes under torchrun."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from torch.utils.data import DataLoader

from .. import checkpoint as ckpt
from ..config import TrainConfig
from ..data.augment import Augmentation
from ..data.dataset import DatasetReport, Sample
from ..data.loading import CharacterDataset, EpochShuffleSampler, collate
from ..errors import CharsegError, DatasetError
from ..inference.evaluate import METRICS, evaluate, is_better
from ..model.build import ModelSpec
from ..model.recompute import set_recompute_stages
from ..precision import Compute, resolve_compute, resolve_device
from . import distributed
from .engine import train_one_epoch
from .interrupts import deferred_interrupt
from .optimization import Optimization
from .reproducibility import capture_rng_state, restore_rng_state, seed_worker
from .stopping import Stop, TrainingClock, stop_after, validation_due

log = logging.getLogger("charseg")


class Tracker(Protocol):
    """What the loop reports to (MLflow in tracking/tracker.py); every method may be a no-op."""

    run_id: str  # the tracking run's ID ("" when none), named in the output folder's lock

    def start(self, config: TrainConfig, report: DatasetReport, spec: ModelSpec, splits: "Splits") -> None: ...
    def log_step(self, step: int, losses: dict[str, float], lr: float) -> None: ...
    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None: ...
    def log_checkpoints_of_epoch(self, epoch: int, paths: list[Path], final: bool) -> None: ...
    def log_validation(self, epoch: int, metrics: dict[str, float], overlays: list) -> None: ...
    def log_heldout(self, epoch: int, metrics: dict[str, float] | None, overlays: list) -> None: ...
    def log_best(self, path: Path, best: dict) -> None: ...
    def log_stop(self, stop: Stop) -> None: ...
    def stop_requested(self, epoch: int) -> Stop | None: ...  # e.g. a sweep's pruner, after validation

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

    def log_stop(self, stop) -> None:
        pass

    def stop_requested(self, epoch) -> None:
        return None

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

@dataclass
class Splits:
    """Training and validation samples of a run, its held-out pages (--heldout-dir) and the
    pages of another dataset it trains on beside its own (--replay-dir)."""

    train: list[Sample]
    val: list[Sample]
    heldout: list[Sample] = field(default_factory=list)
    replay: list[Sample] = field(default_factory=list)

    @property
    def training(self) -> list[Sample]:
        """What the run trains on: its own training pages, then the replayed ones."""
        return self.train + self.replay

    @property
    def all(self) -> list[Sample]:
        return self.training + self.val


def fit(config: TrainConfig, spec: ModelSpec, model: torch.nn.Module, report: DatasetReport, splits: Splits,
        tracker: Tracker, resume_state: dict | None = None, compute: Compute | None = None) -> RunResult:
    """Train MODEL epoch by epoch (from RESUME_STATE's next epoch when given): after each, its
    checkpoint, then validation when due (--val-every; best.pth), held-out pages, the
    tracker's records; after the last, model_final.pth. COMPUTE: the device and precision (default: CONFIG's, resolved
    once here; the run records the precision). Rank 0 holds the output folder for the whole
    run (one writer per folder); under torchrun the other ranks only train."""
    config = dataclasses.replace(config, world_size=distributed.world().size)
    check_config(config)
    with _output_folder(config, tracker):
        run = _Training.prepare(config, model, splits, resume_state, compute)
        tracker.start(config, report, spec, splits)
        if not distributed.world().main:
            return _train_beside_rank0(run, config, model, tracker, resumed=resume_state is not None)
        result = run.result
        if resume_state is not None:
            _finish_resumed_epoch(run, config, spec, model, splits, tracker, resume_state)
            stop = stop_after(config, resume_state["epoch"], result.best, run.clock.spent())
            if stop is not None and result.start_epoch <= config.epochs:  # killed after the rule had ended it
                _end(run, config, spec, model, splits, tracker, resume_state, None, stop)
            if distributed.broadcast_object(stop is not None):
                return _finished(result, model, config)
        if result.start_epoch <= config.epochs:
            log.info("training on %s%s: epochs %d-%d, %d steps per epoch, output %s", run.compute.device,
                     f" x {config.world_size} processes (global batch {config.batch_size * config.world_size})"
                     if config.world_size > 1 else "", result.start_epoch, config.epochs, len(run.loader),
                     config.output_dir)
        # Parameters and one momentum buffer each: what an epoch's checkpoint will need on disk.
        checkpoint_size = 2 * ckpt.state_bytes(model.state_dict())
        for epoch in range(result.start_epoch, config.epochs + 1):
            # Fail before the epoch's work, not after it, when its checkpoint cannot be written.
            ckpt.ensure_space(Path(config.output_dir) / ckpt.epoch_filename(epoch), checkpoint_size)
            metrics = run.train_epoch(epoch, config, tracker)
            result.history.append(metrics)
            # Checkpoint before anything else reports, so a later failure still leaves this epoch saved.
            state = run.checkpoint_state(epoch, config, spec, model, tracker)
            written = _save_epoch(state, config, epoch, metrics, tracker)
            result.checkpoints.extend(written)
            due = validation_due(config, epoch, run.clock.spent())
            if splits.val and due:
                val_metrics = _validate(model, config, spec, splits.val, run.compute, epoch, result.best, state,
                                        tracker)
                metrics.update({f"val_{k}": v for k, v in val_metrics.items()})
            stop = stop_after(config, epoch, result.best, run.clock.spent()) or (
                tracker.stop_requested(epoch) if epoch < config.epochs else None)
            if epoch == config.epochs or stop is not None:  # last: held-out pages, the final model
                _end(run, config, spec, model, splits, tracker, state, written[0] if written else None, stop)
            elif splits.heldout and due:
                _heldout(model, config, spec, splits.heldout, run.compute, epoch, tracker, final=False)
            distributed.barrier()
            if distributed.broadcast_object(stop is not None):  # the other ranks stop with rank 0
                break
        return _finished(result, model, config)


def _finished(result: RunResult, model: torch.nn.Module, config: TrainConfig) -> RunResult:
    _check_replicas(model)
    result.final_checkpoint = Path(config.output_dir) / ckpt.FINAL_NAME
    return result


def _end(run: "_Training", config: TrainConfig, spec: ModelSpec, model: torch.nn.Module, splits: Splits,
         tracker: Tracker, state: dict, written: Path | None, stop: Stop | None) -> None:
    """The run's last epoch (config.epochs, or the one a stopping rule ended it after): the
    final model's held-out metrics, then model_final.pth (with the stop's reason in it)."""
    if stop is not None:
        log.info("stopping after epoch %d of %d: %s", stop.epoch, config.epochs, stop.message)
    if splits.heldout:
        run.result.heldout = _heldout(model, config, spec, splits.heldout, run.compute, state["epoch"], tracker,
                                      final=True)
    if stop is not None:
        state, written = {**state, "stopped": stop.to_dict()}, None  # its own write: the epoch's file goes on
    run.result.checkpoints.append(_save_final(state, config, tracker, written))
    if stop is not None:
        tracker.log_stop(stop)


@contextlib.contextmanager
def _output_folder(config: TrainConfig, tracker: Tracker):
    """Rank 0's hold on the output folder (ckpt.exclusive_output_dir) for the block; the other
    ranks of a torchrun job write nothing there."""
    if not distributed.world().main:
        yield
        return
    run_id = getattr(tracker, "run_id", "")
    owner = ckpt.this_process() + (f" (MLflow run {run_id})" if run_id else "")
    with ckpt.exclusive_output_dir(config.output_dir, owner):
        distributed.clear_errors(config.output_dir, config.world_size)
        yield


@dataclass
class _Training:
    """What the epochs run with: the device and precision, the model they train (DDP under
    torchrun), the loader and its sampler, the optimizer and schedules, float16's loss scaler,
    the result so far."""

    compute: Compute
    trained: torch.nn.Module
    loader: DataLoader
    sampler: EpochShuffleSampler
    opt: Optimization
    scaler: torch.amp.GradScaler | None
    result: RunResult
    clock: TrainingClock

    @classmethod
    def prepare(cls, config: TrainConfig, model: torch.nn.Module, splits: Splits, resume_state: dict | None,
                compute: Compute | None) -> "_Training":
        """Move MODEL to the device in its layout (the run's precision recorded in CONFIG), build
        the loader and optimizer, and put a resumed run's state back."""
        compute = compute or resolve_compute(_training_device(config.device), config.precision, training=True)
        device = compute.device
        model.to(device, memory_format=compute.memory_format)
        set_recompute_stages(model, config.recompute_stages)
        config.precision = compute.precision  # the run records the precision it used
        scaler = compute.loss_scaler()  # its state is in each checkpoint
        if not splits.training:
            raise DatasetError(f"{config.data_dir}: no image left for training after the validation split")
        loader, sampler = _loader(config, splits.training, device)
        opt = Optimization.create(config, model, len(loader))
        result = RunResult(output_dir=Path(config.output_dir), start_epoch=1,
                           best={"metric": config.best_metric, "value": None, "epoch": 0, "through_epoch": 0})
        if resume_state is not None:
            _restore(resume_state, model, opt, result, len(loader))
            if scaler is not None and resume_state.get("scaler"):
                scaler.load_state_dict(resume_state["scaler"])
        trained = _parallel(model, config, device)  # what the epochs run; `model` stays the plain module
        clock = TrainingClock(earlier=float((resume_state or {}).get("train_seconds", 0.0)))
        return cls(compute, trained, loader, sampler, opt, scaler, result, clock)

    def train_epoch(self, epoch: int, config: TrainConfig, tracker: Tracker) -> dict[str, float]:
        """One epoch (engine.train_one_epoch) and its StepLR step; its metrics, logged."""
        self.sampler.set_epoch(epoch)
        with warnings.catch_warnings():
            if self.scaler is not None:  # the loss scaler skips steps by design while it backs off (PyTorch's AMP)
                warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
            metrics = train_one_epoch(
                self.trained, self.opt.optimizer, self.loader, self.compute.device, epoch,
                steps_per_epoch=len(self.loader), iteration_scheduler=self.opt.iteration_scheduler,
                iteration_steps=self.opt.iteration_steps, clip_grad_norm=config.clip_grad_norm,
                log_every=config.log_every, on_step=tracker.log_step, scaler=self.scaler,
                autocast=self.compute.autocast)
            if self.opt.scheduler is not None:
                self.opt.scheduler.step()
        metrics["epoch"] = float(epoch)
        components = ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if k.startswith("loss_"))
        log.info("epoch %d/%d finished: avg loss %.4f (%s), lr %.2e, %.1f images/s", epoch, config.epochs,
                 metrics["loss"], components, metrics["lr"], metrics["images_per_s"])
        return metrics

    def checkpoint_state(self, epoch: int, config: TrainConfig, spec: ModelSpec, model: torch.nn.Module,
                         tracker: Tracker) -> dict:
        """Everything a resume needs after EPOCH (checkpoint.make_checkpoint)."""
        return ckpt.make_checkpoint(
            epoch=epoch, model=model.state_dict(), **self.opt.state_dicts(), seed=config.seed,
            rng=capture_rng_state(), config=config.to_dict(), model_spec=spec.to_dict(), num_classes=spec.num_classes,
            metrics={"history": self.result.history}, best=dict(self.result.best), run_id=tracker.run_id,
            scaler=self.scaler.state_dict() if self.scaler is not None else None, train_seconds=self.clock.spent())


def _train_beside_rank0(run: _Training, config: TrainConfig, model: torch.nn.Module, tracker: Tracker,
                        resumed: bool) -> RunResult:
    """A rank other than 0: train each epoch, then wait while rank 0 writes and validates; stop
    when rank 0 says a stopping rule ended the run."""
    ended = resumed and distributed.broadcast_object(False)  # ended at once by a rule (fit)
    for epoch in range(run.result.start_epoch, 0 if ended else config.epochs + 1):
        run.result.history.append(run.train_epoch(epoch, config, tracker))
        distributed.barrier()
        if distributed.broadcast_object(False):  # rank 0 stopped the run (stopping.py)
            break
    _check_replicas(model)
    return run.result


def _finish_resumed_epoch(run: _Training, config: TrainConfig, spec: ModelSpec, model: torch.nn.Module,
                          splits: Splits, tracker: Tracker, state: dict) -> None:
    """What the resumed checkpoint's epoch had left to do: its validation where due (the
    checkpoint was written before it, and evaluation is deterministic, so the best-so-far is the
    true one);
    for a last epoch that stopped before model_final.pth, its held-out pages and that file."""
    result = run.result
    due = validation_due(config, state["epoch"], run.clock.spent())
    if splits.val and due and result.best["through_epoch"] < state["epoch"]:
        _validate(model, config, spec, splits.val, run.compute, state["epoch"], result.best, state, tracker)
    if result.start_epoch > config.epochs:
        source = Path(config.init_checkpoint)
        _end(run, config, spec, model, splits, tracker, state,
             source if source.parent == Path(config.output_dir) else None, None)


def check_config(config: TrainConfig) -> None:
    """CONFIG's values as one CharsegError (TrainConfig.validate and the validation metric)."""
    try:
        config.validate()
    except ValueError as exc:
        raise CharsegError(str(exc)) from exc
    if config.best_metric not in METRICS:
        raise CharsegError(f"--best-metric {config.best_metric!r} is not a validation metric; "
                           f"choose one of {', '.join(METRICS)}")


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
              compute: Compute, epoch: int, best: dict, state: dict, tracker: Tracker) -> dict[str, float]:
    """Evaluate after `epoch`'s checkpoint is saved; write best.pth when the metric improves.

    Updates `best` in place and returns the validation metrics.
    """
    result = evaluate(model, val, compute.device, max_dets=spec.detections_per_img,
                      score_threshold=config.score_threshold, batch_size=config.batch_size,
                      overlay_count=config.val_images_logged, autocast=compute.autocast,
                      desc=f"epoch {epoch} validation")
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


def _heldout(model: torch.nn.Module, config: TrainConfig, spec: ModelSpec, pages: list[Sample],
             compute: Compute, epoch: int, tracker: Tracker, final: bool) -> dict[str, float]:
    """Log the model's outlines on a few held-out pages; after the last epoch (FINAL), evaluate
    it on all of them. Returns those metrics ({} before the last epoch)."""
    shown = config.val_images_logged
    result = evaluate(model, pages if final else pages[:shown], compute.device, max_dets=spec.detections_per_img,
                      score_threshold=config.score_threshold, batch_size=config.batch_size, overlay_count=shown,
                      autocast=compute.autocast, desc="held-out pages")
    model.train()
    if final:
        log.info("held-out pages %s, final model: %s", config.heldout_dir,
                 ", ".join(f"{k}={v:.4f}" for k, v in result.metrics.items()))
    tracker.log_heldout(epoch, result.metrics if final else None, result.overlays)
    return result.metrics if final else {}


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
