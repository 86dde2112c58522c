"""What a training run records: `MlflowTracker` (params, metrics, checkpoints, images, best
model; failing over to the output folder's store when the server stops answering) and the
records of an evaluation."""

from __future__ import annotations

import logging
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
from mlflow.entities import Metric, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from .. import checkpoint as ckpt
from ..checkpoint import Lineage
from .run import close_abandoned_run, stop_system_metrics
from .store import (SERVER_AWAY, TrackingError, access_refused, local_experiment, offline_store, server_is_away,
                    server_reachable, store_uri)
from .sync import sync_run
from .tags import (CHECKPOINT_DIR, CONFIG_ARTIFACT, TAG_BEST_EPOCH, TAG_BEST_METRIC, TAG_BEST_VALUE, TAG_CAUGHT_UP,
                   TAG_CONFIG_SOURCE, TAG_CONTINUES, TAG_FAILURE, TAG_GIT_COMMIT, TAG_MODE, TAG_PRECISION,
                   TAG_SOURCE_CHECKPOINT, TAG_SOURCE_RUN, TAG_STOP_MESSAGE, TAG_STOP_REASON, TAG_WRITER)

log = logging.getLogger("charseg")


def lineage_tags(lineage: Lineage) -> dict[str, str]:
    """The tags that record where a resume, fine-tune or evaluation started from, and where a
    train --config took its settings."""
    tags = {TAG_SOURCE_CHECKPOINT: lineage.source_uri} if lineage.source_uri else {}
    if lineage.source_run_id:
        tags[TAG_SOURCE_RUN] = lineage.source_run_id
    if lineage.config_source:
        tags[TAG_CONFIG_SOURCE] = lineage.config_source
    return tags


def _flatten(prefix: str, values: dict) -> dict[str, str]:
    flat: dict[str, str] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flatten(f"{prefix}{key}.", value))
        else:  # booleans as MLproject writes them (true/false)
            flat[f"{prefix}{key}"] = str(value).lower() if isinstance(value, bool) else str(value)
    return flat


@dataclass
class MlflowTracker:
    """Reports a training run to the active MLflow run (see `tracked_run`)."""

    log_checkpoints: str = "last"  # all | last | none: which checkpoints become artifacts
    lineage: Lineage = field(default_factory=Lineage)
    # A sweep's trial (sweep.PruningReporter): told each validation, its `stop` ends the run.
    reporter: object = None
    _config: object = None
    _best: dict | None = None
    # Where the run's records go from start(): the run on its tracking store, or, after the
    # server stopped answering mid-run, a local run that continues it (`continuing`).
    _client: MlflowClient | None = None
    _target: str = ""
    _run: str = ""  # the run's own ID
    _server_uri: str = ""  # the tracking server, when the store is one (http/https)
    _experiment_name: str = ""
    continuing: bool = False

    @property
    def run_id(self) -> str:
        """The run's ID ("" outside a run), also while its records go to the local store."""
        if self._run:
            return self._run
        run = mlflow.active_run()
        return run.info.run_id if run else ""

    def start(self, config, report, spec, splits) -> None:
        """Params (config, model spec, dataset facts, split), tags, config, dataset report and
        validation image list artifacts."""
        active = mlflow.active_run()
        self._run = self._target = active.info.run_id
        self._client = MlflowClient(mlflow.get_tracking_uri())
        uri = mlflow.get_tracking_uri()
        self._server_uri = uri if uri.startswith(("http://", "https://")) else ""
        self._experiment_name = self._client.get_experiment(active.info.experiment_id).name
        params = config.to_dict()
        params.update({f"model.{k}": v for k, v in spec.to_dict().items()})
        params.update({f"data.{k}": v for k, v in report.summary().items()})
        params.update({"data.train_images": len(splits.train), "data.val_images": len(splits.val),
                       "data.replay_images": len(splits.replay)})
        params["log_checkpoints"] = self.log_checkpoints
        _log_params(_flatten("", params))
        writer = f"{ckpt.this_process()} into {Path(config.output_dir).resolve()}"
        # The precision the run uses (its param holds what was asked, e.g. auto, under `mlflow run`).
        mlflow.set_tags({TAG_MODE: config.mode, TAG_WRITER: writer, TAG_PRECISION: config.precision,
                         **lineage_tags(self.lineage)})
        if config.mode == "resume" and self.lineage.source_run_id:
            close_abandoned_run(self.lineage.source_run_id, self.run_id)
        mlflow.log_dict({"config": config.to_dict(), "model_spec": spec.to_dict()}, CONFIG_ARTIFACT)
        mlflow.log_text(report.format(), "data/dataset_report.txt")
        mlflow.log_text("".join(f"{s.image_path}\n" for s in splits.val), "data/val_images.txt")
        if splits.replay:
            mlflow.log_text("".join(f"{s.image_path}\n" for s in splits.replay), "data/replay_images.txt")
        log_datasets([(config.data_dir, "training", splits.train), (config.val_dir or config.data_dir, "validation",
                                                                     splits.val),
                      (config.heldout_dir, "heldout", splits.heldout), (config.replay_dir, "replay", splits.replay)])
        self._config = config
        _tag_git_commit()
        self._describe()

    def _describe(self, best: dict | None = None, final: Path | None = None) -> None:
        """The run's description (the UI's Overview): mode, data, epochs, best metric, where the
        checkpoints are."""
        config = self._config
        lines = [f"charseg {config.mode}: {config.data_dir}, {config.epochs} epochs, {config.backbone} "
                 f"(weights {config.weights})."]
        if self.lineage.source_uri:
            lines.append(f"From {self.lineage.source_uri}.")
        if best and best.get("value") is not None:
            lines.append(f"Best validation {best['metric']} {best['value']:.4f} at epoch {best['epoch']} "
                         f"(checkpoints/best.pth).")
        lines.append(f"Checkpoints: {Path(config.output_dir).resolve()}"
                     + (f"; final model {final.name}." if final else " (training)."))
        text = "\n\n".join(lines)
        self._send(lambda client, run: client.set_tag(run, "mlflow.note.content", text))

    def log_step(self, step: int, losses: dict[str, float], lr: float) -> None:
        metrics = {f"train_step/{k}": v for k, v in losses.items()}
        metrics["train_step/lr"] = lr
        self._metrics(metrics, step)

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        self._metrics({f"train_epoch/{k}": v for k, v in metrics.items() if k != "epoch"}, epoch)
        self.catch_up()

    def _metrics(self, metrics: dict[str, float], step: int) -> None:
        # Timestamps are taken now: a call that fails over is repeated with the same points.
        now = int(time.time() * 1000)
        points = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        self._send(lambda client, run: client.log_batch(run, metrics=points))

    def _send(self, action) -> None:
        """action(client, run ID) against the run's store. When a tracking server stops
        answering (after FAILOVER_RETRIES retries), the run's records go to the output
        folder's local store from then on (one warning) and the action is repeated there."""
        try:
            action(self._client, self._target)
            return
        except SERVER_AWAY as exc:
            refused = access_refused(exc) if isinstance(exc, MlflowException) else None
            if refused:  # the password changed or the user was removed while the run trained
                folder = getattr(self._config, "output_dir", "OUTPUT_DIR")  # None before the run's config is set
                raise TrackingError(f"tracking server {self._server_uri} refused run {self._run} mid-run: {refused}; "
                                    f"its checkpoints are in {folder}: `charseg resume {folder}` continues") from exc
            if not self._server_uri or self.continuing or not server_is_away(exc):
                raise
            self._fail_over(exc)
        action(self._client, self._target)

    def _fail_over(self, exc: Exception) -> None:
        output_dir = self._config.output_dir
        store = offline_store(output_dir)
        experiment_id = local_experiment(store, self._experiment_name)
        local = MlflowClient(store_uri(store))
        run = local.create_run(experiment_id, tags={TAG_CONTINUES: self._run})
        self._client, self._target, self.continuing = local, run.info.run_id, True
        stop_system_metrics(self._run)
        text = str(exc)
        reason = "connection refused" if "Connection refused" in text else text.split(" with exception ")[-1][:120]
        log.warning("warning: tracking server %s stopped answering (%s): recording the rest of run %s in %s; it "
                    "catches up when the server answers again (checked after each epoch), else run `charseg sync "
                    "%s`. System metrics stop here.", self._server_uri, reason, self._run, store, output_dir)

    def catch_up(self) -> bool:
        """When the run records locally and its server answers again, copy the local records
        into the server's run and go back to it. Returns whether the run is on its server."""
        if not self.continuing:
            return True
        if not server_reachable(self._server_uri):
            return False
        local, continuation = self._client, self._target
        server = MlflowClient(self._server_uri)
        try:
            sync_run(local, server, local.get_run(continuation), self._experiment_name)
        except SERVER_AWAY as exc:  # the server went away again: stay local, try after the next epoch
            if not server_is_away(exc):
                raise
            log.debug("catching up with %s failed: %s", self._server_uri, exc)
            return False
        local.set_tag(continuation, TAG_CAUGHT_UP, "true")
        if local.get_run(continuation).info.status == "RUNNING":
            local.set_terminated(continuation, "FINISHED")
        self._client, self._target, self.continuing = server, self._run, False
        log.info("tracking server %s answers again: run %s caught up", self._server_uri, self._run)
        return True

    def finish(self, status: str, reason: str | None) -> None:
        """End a run whose records went local: the local run ends with STATUS (and REASON),
        then catches up when the server answers; otherwise `charseg sync` uploads it later."""
        if reason:
            self._client.set_tag(self._target, TAG_FAILURE, reason)
        self._client.set_terminated(self._target, status)
        if not self.catch_up():
            log.warning("warning: tracking server %s does not answer: run %s stays RUNNING there until `charseg sync "
                        "%s` uploads the rest (kept in %s)", self._server_uri, self._run, self._config.output_dir,
                        offline_store(self._config.output_dir))

    def log_checkpoints_of_epoch(self, epoch: int, paths: list[Path], final: bool) -> None:
        """Upload this epoch's checkpoint files as the policy says.

        all: every file under its own name; last: one `last.pth` overwritten each epoch and
        the final model; none: nothing.
        """
        if final:
            self._describe(self._best, paths[0])
        if self.log_checkpoints == "all":
            for path in paths:
                self._artifact(path)
        elif self.log_checkpoints == "last":
            final_paths = [p for p in paths if p.name == ckpt.FINAL_NAME]
            if final_paths:
                self._artifact(final_paths[0])
            elif paths:
                self._send(lambda client, run: _log_artifact_as(client, run, paths[0], ckpt.LAST_NAME))

    def _artifact(self, path: Path, folder: str = CHECKPOINT_DIR) -> None:
        self._send(lambda client, run: client.log_artifact(run, str(path), folder))

    def _images(self, prefix: str, epoch: int, overlays: list) -> None:
        for name, image in overlays:
            self._send(lambda client, run: client.log_image(run, image, key=f"{prefix}_{name}", step=epoch))

    def log_validation(self, epoch: int, metrics: dict[str, float], overlays: list) -> None:
        """Validation metrics (step = epoch) and images with predicted outlines."""
        self._metrics({f"val/{k}": v for k, v in metrics.items()}, epoch)
        self._images("val_predictions", epoch, overlays)
        if self.reporter is not None:
            self.reporter.report(epoch, metrics)

    def log_heldout(self, epoch: int, metrics: dict[str, float] | None, overlays: list) -> None:
        """Held-out pages with predicted outlines (step = epoch); the final model's metrics."""
        if metrics is not None:
            self._metrics({f"heldout/{k}": v for k, v in metrics.items()}, epoch)
        self._images("heldout_predictions", epoch, overlays)

    def log_best(self, path: Path, best: dict) -> None:
        """best.pth as checkpoints/best.pth (unless the policy is none); best epoch and value."""
        if self.log_checkpoints != "none":
            self._artifact(path)
        self._metrics({"best_epoch": best["epoch"], f"best/{best['metric']}": best["value"]}, best["epoch"])
        tags = [RunTag(TAG_BEST_METRIC, best["metric"]), RunTag(TAG_BEST_EPOCH, str(best["epoch"])),
                RunTag(TAG_BEST_VALUE, str(best["value"]))]
        self._send(lambda client, run: client.log_batch(run, tags=tags))
        self._best = best
        self._describe(best)

    def stop_requested(self, epoch: int):
        """The Stop a sweep's pruner asked for after this epoch's validation, else None."""
        return getattr(self.reporter, "stop", None)

    def log_stop(self, stop) -> None:
        """A run that a stopping rule (training/stopping.py) ended before its last epoch: the rule
        and its message as tags, the epoch as the metric stopped_epoch."""
        tags = [RunTag(TAG_STOP_REASON, stop.reason), RunTag(TAG_STOP_MESSAGE, stop.message)]
        self._send(lambda client, run: client.log_batch(run, tags=tags))
        self._metrics({"stopped_epoch": stop.epoch}, stop.epoch)


def log_datasets(entries: list[tuple[str | None, str, list]]) -> None:
    """Log each (folder, context, samples) with samples as an MLflow dataset input of the
    active run: name = the folder's name, source = the folder, digest over the samples' file
    names and contents (data/dataset.samples_digest). The UI's Datasets panel and search_runs then
    answer which data trained a model."""
    import warnings

    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    from ..data.dataset import samples_digest

    for folder, context, samples in entries:
        if not folder or not samples:
            continue
        path = Path(folder).resolve()
        with warnings.catch_warnings():  # "can be interpreted in multiple ways": both are the local source
            warnings.simplefilter("ignore")
            source = resolve_dataset_source(str(path))
        mlflow.log_input(MetaDataset(source, name=path.name, digest=samples_digest(samples)), context=context)


def _tag_git_commit() -> None:
    """Record the project's git commit (as `mlflow run` does) when charseg runs from a checkout."""
    import subprocess

    if mlflow.active_run().data.tags.get(TAG_GIT_COMMIT):
        return
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                                text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return
    if commit.returncode == 0 and re.fullmatch(r"[0-9a-f]{40}", commit.stdout.strip()):
        mlflow.set_tag(TAG_GIT_COMMIT, commit.stdout.strip())


def _log_params(params: dict[str, str]) -> None:
    # Under `mlflow run` the run already holds the MLproject parameters as the user gave
    # them (MLflow refuses to change a param): keep those and add only the other keys.
    existing = MlflowClient().get_run(mlflow.active_run().info.run_id).data.params
    new = {k: v[:6000] for k, v in params.items() if k not in existing}
    if new:
        mlflow.log_params(new)


def _log_artifact_as(client: MlflowClient, run_id: str, path: Path, name: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:  # a link: no copy of a 0.3 GB file where links work
        client.log_artifact(run_id, str(ckpt.link_or_copy(path, Path(tmp) / name)), CHECKPOINT_DIR)


def log_evaluation(metrics: dict[str, float], source: Lineage, data_dir: str, samples: list, json_path: Path) -> None:
    """Record a standalone evaluation in the active run: metrics (step 0), tags, the data as
    an `evaluation` dataset input, JSON artifact."""
    mlflow.set_tags({TAG_MODE: "evaluate", **lineage_tags(source)})
    mlflow.log_param("data_dir", data_dir)
    log_datasets([(data_dir, "evaluation", samples)])
    mlflow.log_metrics({f"eval/{k}": v for k, v in metrics.items()}, step=0)
    mlflow.log_artifact(str(json_path), "evaluation")
