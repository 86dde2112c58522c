"""A training command's processes and its MLflow run: one process or torchrun's, rank 0 tracking,
the source checkpoint downloaded once and shared, a failed rank's own error reported."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import click

from . import checkpoint as ckpt
from .config import replayed_settings
from .errors import CharsegError, Stopped, reason
from .precision import resolve_device
from .training import distributed, runner
from .training.interrupts import stop_on_sigterm


@contextlib.contextmanager
def training_job(device: str | None) -> Iterator[distributed.World]:
    """A training command's processes: one, or torchrun's (joined into one job here; ranks
    other than 0 print warnings and errors only). SIGTERM stops them as Ctrl-C does
    (training/interrupts.py): the checkpoint being written completes, the run ends KILLED."""
    world = distributed.world()
    if world.distributed and not world.main:
        logging.getLogger().setLevel(logging.WARNING)
    device_type = resolve_device(device or "auto").type if world.distributed else "cpu"
    with distributed.process_group(device_type) as joined, stop_on_sigterm():
        yield joined


def tracked(choices: TrackingChoices, output_dir: str, lineage: ckpt.Lineage,
             action: Callable[[runner.Tracker], runner.RunResult], register_as: str | None = None) -> None:
    """Run `action` inside an MLflow run (registering its best checkpoint when asked); print
    where its results are. Under torchrun only rank 0 tracks: the other ranks run `action`
    untracked and leave any error of theirs for rank 0 to report as the run's failure."""
    world = distributed.world()
    if not world.main:
        try:
            action(runner.NullTracker())
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM (errors.Stopped): the job was stopped, no rank failed
            raise
        except BaseException as exc:
            distributed.record_error(output_dir, world.rank, exc)
            raise
        return
    from . import tracking

    tracker = tracking.MlflowTracker(log_checkpoints=choices.log_checkpoints, lineage=lineage)
    with tracking.tracked_run(choices.experiment_name, system_metrics=choices.system_metrics, output_dir=output_dir,
                              offline=choices.offline, tracker=tracker) as run_id:
        result = _naming_failed_rank(output_dir, lambda: action(tracker))
        registration = None
        if register_as and tracker.continuing:  # training is done; the registry is on the server that is away
            logging.getLogger("charseg").warning(
                "warning: not registered as %s: the tracking server does not answer; after `charseg sync %s`, run "
                "`charseg register %s --name %s`", register_as, output_dir, run_id, register_as)
        elif register_as:
            registration = tracking.register_checkpoint(runner.best_or_final(result), register_as, run_id)
    click.echo(f"checkpoints in {result.output_dir}; final model {result.final_checkpoint}")
    if result.best.get("epoch"):
        best = runner.best_or_final(result)
        where = best if best != result.final_checkpoint else "best.pth of the run this one resumed (not beaten here)"
        click.echo(f"best {result.best['metric']} {result.best['value']:.4f} at epoch {result.best['epoch']}: {where}")
    if result.heldout:
        click.echo("held-out pages (final model): " + ", ".join(
            f"{k} {result.heldout[k]:.3f}" for k in ("segm_AP50", "segm_AP75", "segm_AP", "char_f1", "bbox_AP50")))
    if registration:
        click.echo(registration.message)
    echo_run(run_id)


def _naming_failed_rank(output_dir: str, call: Callable[[], runner.RunResult]) -> runner.RunResult:
    """call(); when it fails because another rank did (a broken connection, torchrun's SIGTERM),
    raise that rank's own error instead."""
    try:
        return call()
    except (Exception, Stopped) as exc:
        world = distributed.world()
        if not world.distributed:
            raise
        distributed.ignore_termination()  # torchrun's SIGTERM: finish recording the failure first
        errors = {}
        # The failed rank writes its error before its process ends, and torchrun sends SIGTERM
        # to the others only after that: a SIGTERM with no error written is a stop, not a failure.
        for _ in range(5 if isinstance(exc, Stopped) else 50):
            errors = distributed.peer_errors(output_dir, world.size)
            if errors or not isinstance(exc, (Stopped, RuntimeError)):
                break
            time.sleep(0.1)
        if not errors:
            raise
        rank, message = min(errors.items())
        raise CharsegError(f"rank {rank} of {world.size} failed: {message}") from exc


def echo_run(run_id: str) -> None:
    from . import tracking

    uri = tracking.current_tracking_uri()
    click.echo(f"MLflow run {run_id} at {uri}; view it with: mlflow ui --backend-store-uri {uri}")


@contextlib.contextmanager
def resolve_source(source: str, *, prefer_best: bool, epoch: int | None = None,
                   under: str | None = None) -> Iterator[tuple[Path, ckpt.Lineage]]:
    """The one answer to "which checkpoint file is SOURCE": a checkpoint file, an output folder
    (checkpoint.pick_checkpoint's choice), an MLflow run ID or an artifact URI (runs:/...,
    models:/..., downloaded). Yields (local path, lineage); a download lives until the block
    ends, in a temporary folder of UNDER (a training's output folder, whose next writer removes
    it should this process be killed) or else of the system's temp folder.

    Under torchrun, rank 0 alone downloads from MLflow and sends the file to the other ranks
    (other machines included); a path that exists for rank 0 is read by every rank."""
    world = distributed.world()
    remote = distributed.broadcast_object(not Path(source).exists())
    if world.distributed and remote and not world.main:
        with tempfile.TemporaryDirectory(prefix="charseg-rank-") as download_dir:
            yield distributed.broadcast_file(None, Path(download_dir)), ckpt.Lineage()
        return
    local = None if remote else ckpt.local_checkpoint(source, prefer_best=prefer_best, epoch=epoch)
    if local is not None:  # a file or folder: MLflow is not even imported (predict starts sooner)
        yield local, ckpt.Lineage(source_uri=str(local.resolve()))
        return
    from . import tracking

    if under and world.main:
        Path(under).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=ckpt.download_prefix(), suffix=".tmp",
                                     dir=under if world.main else None) as download_dir:
        path, lineage = tracking.download_checkpoint(source, Path(download_dir), prefer_best=prefer_best, epoch=epoch)
        if world.distributed and remote:
            distributed.broadcast_file(path, Path(download_dir))
        yield path, lineage


def replayed_config(source: str) -> tuple[dict[str, Any], str]:
    """`train --config SOURCE`: the settings of a YAML or JSON file (a run's config/config.json,
    `train --print-config` output, or settings written by hand), of a checkpoint file, or that
    an MLflow run logged (its ID, runs:/...). Returns them (config.replayed_settings) and what
    the new run's charseg.config_source tag says: the file's absolute path or the run."""
    path = Path(source)
    if not path.exists():
        from . import tracking

        return _settings(tracking.run_config(source), source), source
    if path.suffix == ".pth":
        values = ckpt.load_checkpoint(path)["config"]
    else:
        import yaml  # YAML is a superset of JSON: one parser for both

        try:
            values = yaml.safe_load(path.read_text())
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            raise CharsegError(f"{path}: cannot read it as a YAML or JSON config: {reason(exc)}") from exc
    return _settings(values, str(path)), str(path.resolve())


def _settings(values: object, source: str) -> dict[str, Any]:
    try:
        return replayed_settings(values, source)
    except ValueError as exc:
        raise CharsegError(str(exc)) from exc


def resume_job(source: str, epoch: int, overrides: dict[str, Any], choices: "TrackingChoices",
               register_as: str | None = None) -> None:
    """`charseg resume`: SOURCE's checkpoint (of EPOCH when given) continued with OVERRIDES, as
    one tracked run linked to the run it continues."""
    if not Path(source).exists():  # to be downloaded: write next to nothing temporary
        overrides.setdefault("output_dir", runner.default_output_dir("resume"))
    if "output_dir" in overrides:
        overrides["output_dir"] = distributed.broadcast_object(overrides["output_dir"])
    with resolve_source(source, prefer_best=False, epoch=epoch or None,
                        under=overrides.get("output_dir")) as (path, lineage):
        try:
            plan = runner.plan_resume(path, overrides, shown_as=source)
        except runner.TrainingAlreadyComplete as exc:
            click.echo(str(exc))
            return
        # A checkpoint file names the run that wrote it: link to it as a resume by run ID does.
        lineage.source_run_id = lineage.source_run_id or plan.state.get("run_id", "")
        tracked(choices, plan.config.output_dir, lineage, lambda tracker: runner.resume(plan, tracker=tracker),
                register_as=register_as)


def finetune_job(source: str, overrides: dict[str, Any], choices: "TrackingChoices",
                 register_as: str | None = None) -> None:
    """`charseg finetune`: SOURCE's weights (its best checkpoint, else its latest) trained on
    with OVERRIDES (data_dir among them) as one tracked run."""
    overrides["output_dir"] = distributed.broadcast_object(overrides.get("output_dir")
                                                           or runner.default_output_dir("finetune"))
    with resolve_source(source, prefer_best=True, under=overrides["output_dir"]) as (path, lineage):
        tracked(choices, overrides["output_dir"], lineage, lambda tracker: runner.finetune(path, overrides, tracker),
                register_as=register_as)


@dataclass
class TrackingChoices:
    """The TRACKING options of a training command."""

    experiment_name: str | None
    log_checkpoints: str
    system_metrics: bool
    offline: bool

    @classmethod
    def pop(cls, options: dict[str, Any]) -> "TrackingChoices":
        return cls(*(options.pop(f.name) for f in dataclasses.fields(cls)))
