"""Everything MLflow: the run's lifecycle, params, metrics, artifacts and checkpoint lookup.

The only module that imports mlflow. The runner talks to `MlflowTracker` through the
small Tracker protocol; the CLI uses `tracked_run` and `resolve_checkpoint`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import re
import socket
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import mlflow
from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.tracking import MlflowClient

from . import checkpoint as ckpt
from .checkpoint import Lineage
from .errors import CharsegError
from .precision import PrecisionError
from .serving import CharsegPredictor

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
DEFAULT_EXPERIMENT = "charseg"
CHECKPOINT_DIR = "checkpoints"  # artifact folder of every checkpoint
TAG_MODE = "charseg.mode"
TAG_SOURCE_RUN = "charseg.source_run_id"
TAG_SOURCE_CHECKPOINT = "charseg.source_checkpoint"
TAG_FAILURE = "charseg.failure_reason"
TAG_GIT_COMMIT = "mlflow.source.git.commit"
TAG_WRITER = "charseg.writer"  # "PID n on HOST into FOLDER": the process that trains the run
TAG_RESUMED_BY = "charseg.resumed_by"
TAG_PRECISION = "charseg.precision"  # fp32 | bf16 | fp16: what --precision resolved to
# A RUNNING source run on another host whose last step metric is older than this is taken
# as dead (a preempted machine) when resumed; a step is logged every training iteration.
ABANDONED_AFTER_S = 900
TAG_BEST_METRIC = "charseg.best_metric"
TAG_BEST_EPOCH = "charseg.best_epoch"
TAG_BEST_VALUE = "charseg.best_value"
_RUN_ID_RE = re.compile(r"^[0-9a-f]{32}$")

log = logging.getLogger("charseg")


class TrackingError(CharsegError):
    """A run, artifact or tracking server cannot be used as asked."""


def configure(experiment_name: str | None = None) -> None:
    """Point mlflow at MLFLOW_TRACKING_URI (default sqlite:///mlflow.db) and the experiment.

    Under `mlflow run` the run (and so its experiment) already exists: leave it alone.
    Set every time: an offline run earlier in this process left mlflow on its own store.
    """
    mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI)
    if os.environ.get("MLFLOW_RUN_ID"):
        return
    name = _experiment_name(experiment_name)
    try:
        mlflow.set_experiment(name)
    except MlflowException as exc:
        raise TrackingError(f"cannot use experiment {name!r} at {mlflow.get_tracking_uri()}: {exc.message}") from exc


def _experiment_name(given: str | None) -> str:
    """--experiment-name, else $MLFLOW_EXPERIMENT_NAME, else charseg."""
    return given or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT


def current_tracking_uri() -> str:
    """The tracking URI in use (after `configure`)."""
    return mlflow.get_tracking_uri()


def lineage_tags(lineage: Lineage) -> dict[str, str]:
    """The tags that record where a resume, fine-tune or evaluation started from."""
    tags = {TAG_SOURCE_CHECKPOINT: lineage.source_uri} if lineage.source_uri else {}
    if lineage.source_run_id:
        tags[TAG_SOURCE_RUN] = lineage.source_run_id
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
        params.update({"data.train_images": len(splits.train), "data.val_images": len(splits.val)})
        params["log_checkpoints"] = self.log_checkpoints
        _log_params(_flatten("", params))
        writer = f"{ckpt.this_process()} into {Path(config.output_dir).resolve()}"
        # The precision the run uses (its param holds what was asked, e.g. auto, under `mlflow run`).
        mlflow.set_tags({TAG_MODE: config.mode, TAG_WRITER: writer, TAG_PRECISION: config.precision,
                         **lineage_tags(self.lineage)})
        if config.mode == "resume" and self.lineage.source_run_id:
            close_abandoned_run(self.lineage.source_run_id, self.run_id)
        mlflow.log_dict({"config": config.to_dict(), "model_spec": spec.to_dict()}, "config/config.json")
        mlflow.log_text(report.format(), "data/dataset_report.txt")
        mlflow.log_text("".join(f"{s.image_path}\n" for s in splits.val), "data/val_images.txt")
        log_datasets([(config.data_dir, "training", splits.train), (config.val_dir or config.data_dir, "validation",
                                                                     splits.val),
                      (config.heldout_dir, "heldout", splits.heldout)])
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
        except Exception as exc:  # MLflow wraps connection errors in MlflowException, not always
            if not self._server_uri or self.continuing:
                raise
            self._fail_over(exc)
        action(self._client, self._target)

    def _fail_over(self, exc: Exception) -> None:
        output_dir = self._config.output_dir
        store = offline_store(output_dir)
        experiment_id = _local_experiment(store, self._experiment_name)
        local = MlflowClient(_store_uri(store))
        run = local.create_run(experiment_id, tags={TAG_CONTINUES: self._run})
        self._client, self._target, self.continuing = local, run.info.run_id, True
        _stop_system_metrics(self._run)
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
            _sync_run(local, server, local.get_run(continuation), self._experiment_name)
        except Exception as exc:  # the server went away again: stay local, try after the next epoch
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


def log_datasets(entries: list[tuple[str | None, str, list]]) -> None:
    """Log each (folder, context, samples) with samples as an MLflow dataset input of the
    active run: name = the folder's name, source = the folder, digest over the samples' file
    names and contents (data.samples_digest). The UI's Datasets panel and search_runs then
    answer which data trained a model."""
    import warnings

    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    from .data import samples_digest

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


def close_abandoned_run(run_id: str, resumed_by: str) -> bool:
    """End run RUN_ID as KILLED when it is still RUNNING but its writer is dead (a SIGKILL or
    a lost machine never ends a run): on this host, when its PID is gone; on another, when
    its last step metric is older than ABANDONED_AFTER_S. The end time is that last
    activity; a tag names the resuming run. Returns whether it was closed."""
    client = MlflowClient()
    run = client.get_run(run_id)
    if run.info.status != "RUNNING":
        return False
    found = re.match(r"PID (\d+) on (\S+)", run.data.tags.get(TAG_WRITER, ""))
    history = client.get_metric_history(run_id, "train_step/loss")
    last_activity = max([m.timestamp for m in history] + [run.info.start_time or 0])
    if found and found.group(2) == socket.gethostname():
        alive = _pid_alive(int(found.group(1)))
    else:
        alive = time.time() * 1000 - last_activity < ABANDONED_AFTER_S * 1000
    if alive:
        log.warning("warning: source run %s is still RUNNING and its writer (%s) looks alive: left as it is", run_id,
                    run.data.tags.get(TAG_WRITER, "unknown"))
        return False
    client.set_tag(run_id, TAG_RESUMED_BY, resumed_by)
    client.set_tag(run_id, TAG_FAILURE, f"its process stopped without ending the run; resumed by run {resumed_by}")
    client.set_terminated(run_id, RunStatus.to_string(RunStatus.KILLED), end_time=last_activity)
    log.info("source run %s was left RUNNING by a process that died: marked KILLED", run_id)
    return True


def _pid_alive(pid: int) -> bool:
    """Whether process PID of this host lives (this process, which is resuming, is not the writer)."""
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


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


def _stop_system_metrics(run_id: str) -> None:
    """Stop MLflow's system-metrics sampler of RUN_ID (it would poll a server that is gone)."""
    from mlflow.tracking import fluent

    monitor = getattr(fluent, "run_id_to_system_metrics_monitor", {}).pop(run_id, None)
    if monitor is not None:
        with contextlib.suppress(Exception):
            monitor._shutdown_event.set()


TAG_CONTINUES = "charseg.continues_run_id"  # on a local run: the server run whose rest it records (failover)
TAG_CAUGHT_UP = "charseg.caught_up"  # on such a run: copied into the server run already
# Each call to a tracking server gets this many retries (MLflow's default, 7, waits about four
# minutes) before a running training fails over to its local store; $MLFLOW_HTTP_REQUEST_MAX_RETRIES
# set by the user wins.
FAILOVER_RETRIES = 2
OFFLINE_DIR = "offline-tracking"  # inside the output folder: mlflow.db and artifacts/ of runs made offline
TAG_OFFLINE_RUN = "charseg.offline_run_id"  # on a server's run: the offline run `charseg sync` copied
SERVER_PROBE_TIMEOUT_S = 5


def offline_store(output_dir: str | Path) -> Path:
    """The local tracking store of OUTPUT_DIR (runs made with --offline or while the server was down)."""
    return Path(output_dir).resolve() / OFFLINE_DIR


def _store_uri(store: Path) -> str:
    return f"sqlite:///{store / 'mlflow.db'}"


def server_reachable(uri: str) -> bool:
    """Whether an http(s) tracking server answers its /health within SERVER_PROBE_TIMEOUT_S
    (MLflow's own client would retry for minutes); any other store is local: True."""
    if not uri.startswith(("http://", "https://")):
        return True
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({})) if "127.0.0.1" in uri or \
        "localhost" in uri else urllib.request.build_opener()
    try:
        with opener.open(uri.rstrip("/") + "/health", timeout=SERVER_PROBE_TIMEOUT_S):
            return True
    except OSError:
        return False


def _local_experiment(store: Path, name: str) -> str:
    """The ID of experiment NAME in the local STORE (created with its artifacts inside STORE)."""
    store.mkdir(parents=True, exist_ok=True)
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)  # "Creating initial MLflow database tables"
    client = MlflowClient(_store_uri(store))
    experiment = client.get_experiment_by_name(name)
    return experiment.experiment_id if experiment else client.create_experiment(
        name, artifact_location=str(store / "artifacts"))


def _use_offline_store(store: Path, experiment_name: str | None) -> None:
    """Point mlflow at STORE, with the experiment's artifacts inside it."""
    name = _experiment_name(experiment_name)
    _local_experiment(store, name)
    mlflow.set_tracking_uri(_store_uri(store))
    mlflow.set_experiment(name)


@contextlib.contextmanager
def tracked_run(experiment_name: str | None = None, system_metrics: bool = False, output_dir: str | None = None,
                offline: bool = False, tracker: MlflowTracker | None = None) -> Iterator[str]:
    """Start (or, under `mlflow run`, attach to) a run; end it FINISHED, FAILED or KILLED.

    system_metrics: MLflow samples CPU, memory, disk, network (and GPU with nvidia-ml-py)
    into `system/*` metrics while the run lasts (every $MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL
    seconds, default 10). offline (or a tracking server that does not answer at the start,
    when OUTPUT_DIR is given): the run is recorded in OUTPUT_DIR/offline-tracking instead,
    for `charseg sync` to upload; a server that answers again when the run ends gets it then.
    A server that stops answering mid-run: TRACKER (the run's MlflowTracker) records the rest
    locally and catches up when it answers again (MlflowTracker._send).
    Yields the run ID. A failure sets the tag charseg.failure_reason.
    """
    server = os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    failover = False
    if output_dir and not os.environ.get("MLFLOW_RUN_ID"):
        failover = not offline and not server_reachable(server)
        if failover:
            log.warning("warning: tracking server %s does not answer: recording this run in %s; it is uploaded "
                        "when the run ends if the server is back, else run `charseg sync %s`", server,
                        offline_store(output_dir), output_dir)
    elif offline:
        raise TrackingError("--offline: under `mlflow run` the run already exists on the tracking server; run "
                            "`charseg train ... --offline` directly")
    server_env = os.environ.get("MLFLOW_TRACKING_URI")
    if offline or failover:
        _use_offline_store(offline_store(output_dir), experiment_name)
    else:
        configure(experiment_name)
    try:
        with _failing_over_quickly(server):
            yield from _run_lifecycle(system_metrics, tracker)
    finally:
        if offline or failover:
            # mlflow.set_tracking_uri also set $MLFLOW_TRACKING_URI: give later commands of this
            # process (sync) the server again; mlflow's own URI stays on the store the run is in.
            os.environ.pop("MLFLOW_TRACKING_URI", None) if server_env is None else \
                os.environ.__setitem__("MLFLOW_TRACKING_URI", server_env)
    if failover and server_reachable(server):
        for line in sync_offline_runs(output_dir, server):
            log.info("tracking server %s answers again: %s", server, line)


class _OutageChatter(logging.Filter):
    """Drops the libraries' own lines about a server that is away (urllib3's retries, the
    system-metrics sampler giving up): charseg says it once, with what happens next."""

    SAID = ("Retrying (", "Failed to get mlflow run", "Failed to log system metrics")

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.SAID)


OUTAGE_LOGGERS = ("urllib3.connectionpool", "mlflow.system_metrics.system_metrics_monitor")


@contextlib.contextmanager
def _failing_over_quickly(uri: str) -> Iterator[None]:
    """While a run talks to a tracking server, give each call FAILOVER_RETRIES retries (unless
    $MLFLOW_HTTP_REQUEST_MAX_RETRIES says otherwise): training does not wait minutes on it."""
    variable = "MLFLOW_HTTP_REQUEST_MAX_RETRIES"
    if not uri.startswith(("http://", "https://")):
        yield
        return
    chatter = _OutageChatter()
    for name in OUTAGE_LOGGERS:
        logging.getLogger(name).addFilter(chatter)
    given = variable in os.environ
    if not given:
        os.environ[variable] = str(FAILOVER_RETRIES)
    try:
        yield
    finally:
        if not given:
            os.environ.pop(variable, None)
        for name in OUTAGE_LOGGERS:
            logging.getLogger(name).removeFilter(chatter)


def _run_lifecycle(system_metrics: bool, tracker: MlflowTracker | None = None) -> Iterator[str]:
    """Start the run, yield its ID, end it FINISHED, FAILED (tag charseg.failure_reason) or KILLED."""
    # MLflow draws a new run's name from Python's `random`, which training seeds: a second run
    # in one process (the Python API, a benchmark) would be named like the first. Name it from
    # fresh entropy and leave the process's own random sequence where it was.
    state = random.getstate()
    random.seed()
    try:
        run = mlflow.start_run(log_system_metrics=system_metrics)
    except MlflowException as exc:
        raise TrackingError(f"cannot start an MLflow run at {mlflow.get_tracking_uri()}: {exc.message}") from exc
    finally:
        random.setstate(state)
    try:
        yield run.info.run_id
    except KeyboardInterrupt:
        _end_run(RunStatus.KILLED, "interrupted (Ctrl-C); the last checkpoint is complete", tracker)
        raise
    except BaseException as exc:
        _end_run(RunStatus.FAILED, (str(exc) or type(exc).__name__)[:5000], tracker)
        raise
    _end_run(RunStatus.FINISHED, None, tracker)


def _end_run(status: int, reason: str | None, tracker: MlflowTracker | None) -> None:
    """End the active run with STATUS (and REASON as charseg.failure_reason). A run whose
    records went local (its server stopped answering) ends there and catches up if it can."""
    status_name = RunStatus.to_string(status)
    if tracker is not None and tracker.continuing:
        tracker.finish(status_name, reason)
        if tracker.continuing:  # the server is still away: forget the run here without asking it
            _stop_system_metrics(mlflow.active_run().info.run_id)
            retries = os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES")
            os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
            try:
                mlflow.end_run(status_name)  # pops the run first, then fails to reach the server
            except Exception:
                pass
            finally:
                os.environ.pop("MLFLOW_HTTP_REQUEST_MAX_RETRIES") if retries is None else \
                    os.environ.__setitem__("MLFLOW_HTTP_REQUEST_MAX_RETRIES", retries)
            return
    if reason:
        mlflow.set_tag(TAG_FAILURE, reason)
    mlflow.end_run(status_name)


def sync_offline_runs(output_dir: str | Path, tracking_uri: str | None = None) -> list[str]:
    """Copy every run of OUTPUT_DIR's offline store into the tracking server (TRACKING_URI,
    default $MLFLOW_TRACKING_URI): experiment by name, params, tags, dataset inputs, every
    metric with its steps and timestamps, artifacts, status and times. Idempotent: the
    server's copy carries the tag charseg.offline_run_id, and only what it lacks is added, so
    running it twice (or after an interrupted sync) duplicates nothing. Returns one line per run.
    """
    store = offline_store(output_dir)
    if not (store / "mlflow.db").is_file():
        raise TrackingError(f"{output_dir}: no offline runs here (no {OFFLINE_DIR}/mlflow.db); runs made with "
                            "--offline or while the server was down are kept there")
    target_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    if not server_reachable(target_uri):
        raise TrackingError(f"tracking server {target_uri} does not answer; try again when it is up")
    source, target = MlflowClient(_store_uri(store)), MlflowClient(target_uri)
    lines = []
    for experiment in source.search_experiments():
        for run in source.search_runs([experiment.experiment_id], max_results=50000):
            copy = _sync_run(source, target, run, experiment.name)
            lines.append(f"offline run {run.info.run_id} -> run {copy} at {target_uri}")
    return lines


def _sync_run(source: MlflowClient, target: MlflowClient, run, experiment_name: str) -> str:
    continues = run.data.tags.get(TAG_CONTINUES)
    if continues:  # the rest of a server run recorded locally while the server was away: into that run
        copy_id = target.get_run(continues).info.run_id
    else:
        experiment = target.get_experiment_by_name(experiment_name)
        experiment_id = experiment.experiment_id if experiment else target.create_experiment(experiment_name)
        found = target.search_runs([experiment_id], f"tags.`{TAG_OFFLINE_RUN}` = '{run.info.run_id}'")
        if found:
            copy = found[0]
        else:
            copy = target.create_run(experiment_id, start_time=run.info.start_time, run_name=run.info.run_name,
                                     tags={TAG_OFFLINE_RUN: run.info.run_id})
        copy_id = copy.info.run_id
    have = target.get_run(copy_id).data
    params = [Param(k, v) for k, v in run.data.params.items() if k not in have.params]
    local_only = (TAG_OFFLINE_RUN, TAG_CONTINUES, TAG_CAUGHT_UP)
    tags = [RunTag(k, v) for k, v in run.data.tags.items()
            if have.tags.get(k) != v and not k.startswith("mlflow.run") and k not in local_only]
    for start in range(0, max(len(params), len(tags)), 100):
        target.log_batch(copy_id, params=params[start:start + 100], tags=tags[start:start + 100])
    for key in run.data.metrics:
        present = {(m.step, m.timestamp, m.value) for m in target.get_metric_history(copy_id, key)}
        missing = [Metric(key, m.value, m.timestamp, m.step) for m in source.get_metric_history(run.info.run_id, key)
                   if (m.step, m.timestamp, m.value) not in present]
        for start in range(0, len(missing), 1000):
            target.log_batch(copy_id, metrics=missing[start:start + 1000])
    if run.inputs and run.inputs.dataset_inputs and not target.get_run(copy_id).inputs.dataset_inputs:
        target.log_inputs(copy_id, datasets=list(run.inputs.dataset_inputs))
    _sync_artifacts(source, target, run.info.run_id, copy_id, "")
    caught_up = run.data.tags.get(TAG_CAUGHT_UP)  # a part of a run that went on on its server
    if run.info.status != "RUNNING" and not caught_up and target.get_run(copy_id).info.status != run.info.status:
        target.set_terminated(copy_id, run.info.status, end_time=run.info.end_time)
    return copy_id


def _sync_artifacts(source: MlflowClient, target: MlflowClient, run_id: str, copy_id: str, folder: str) -> None:
    """Upload the files under FOLDER that the copy lacks (or holds with another size)."""
    present = {f.path: f for f in target.list_artifacts(copy_id, folder or None)}
    for item in source.list_artifacts(run_id, folder or None):
        if item.is_dir:
            _sync_artifacts(source, target, run_id, copy_id, item.path)
        elif item.path not in present or present[item.path].file_size != item.file_size:
            with tempfile.TemporaryDirectory() as tmp, _no_progress_bars():
                local = source.download_artifacts(run_id, item.path, tmp)
                target.log_artifact(copy_id, local, str(Path(item.path).parent) if "/" in item.path else None)


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """MLflow draws a progress bar per artifact download; a sync copies many small files."""
    previous = os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    try:
        yield
    finally:
        os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR") if previous is None else \
            os.environ.__setitem__("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", previous)


@dataclass
class Registration:
    """The outcome of registering a checkpoint in the model registry."""

    name: str
    version: str
    metric: str | None
    value: float | None
    champion: bool
    message: str


CHAMPION = "champion"
TAG_VERSION_METRIC = "charseg.metric"
TAG_VERSION_VALUE = "charseg.metric_value"


class ServedModel:
    """A registered model as MLflow serves it: charseg's predictor, whose bad-input errors (an
    image that cannot be read, no `image` column, a precision the device lacks) become
    MlflowExceptions, which `mlflow models serve` answers with their message and status 400
    (any other exception gets a generic message, the reason buried in a stack trace)."""

    def __init__(self, predictor: CharsegPredictor):
        self.predictor = predictor

    def predict(self, model_input, params: dict | None = None):
        try:
            return self.predictor.predict(model_input, params)
        except (CharsegError, PrecisionError) as exc:  # not any ValueError: a bug is no bad request
            raise MlflowException(str(exc), error_code=INVALID_PARAMETER_VALUE) from exc


def _load_pyfunc(data_path: str) -> ServedModel:
    """MLflow's loader_module hook: the checkpoint logged as the model's data."""
    return ServedModel(CharsegPredictor(data_path))


def _model_signature():
    from mlflow.models import ModelSignature
    from mlflow.types import DataType
    from mlflow.types.schema import Array, ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec(DataType.binary, "image")]),
        outputs=Schema([ColSpec(DataType.long, "image_id"), ColSpec(DataType.double, "score"),
                        ColSpec(Array(DataType.double), "box"), ColSpec(Array(DataType.double), "polygon")]),
        params=ParamSchema([ParamSpec("score_threshold", DataType.double, 0.5),
                            ParamSpec("precision", DataType.string, "auto")]))


def _requirements() -> list[str]:
    from importlib.metadata import version

    pinned = ("torch", "torchvision", "mlflow")
    loose = ("numpy", "pandas", "pillow", "opencv-python-headless", "pycocotools", "tqdm")
    return [f"{p}=={version(p).split('+')[0]}" for p in pinned] + list(loose)


def register_checkpoint(checkpoint_path: Path, name: str, run_id: str) -> Registration:
    """Log the checkpoint as a pyfunc model in run `run_id`, register a new version of NAME,
    and move the `champion` alias to it only when its validation metric beats the champion's."""
    from importlib.resources import files

    state = ckpt.load_checkpoint(checkpoint_path)
    best = state["best"] or {}
    metric, value = best.get("metric"), best.get("value")
    active = mlflow.active_run()
    context = (contextlib.nullcontext() if active and active.info.run_id == run_id
               else mlflow.start_run(run_id=run_id))
    with context:
        info = mlflow.pyfunc.log_model(
            name="model", loader_module="charseg.tracking", data_path=str(checkpoint_path),
            code_paths=[str(files("charseg"))], signature=_model_signature(), pip_requirements=_requirements())
    version = mlflow.register_model(info.model_uri, name).version
    client = MlflowClient()
    tags = {TAG_SOURCE_RUN: run_id, "charseg.checkpoint": Path(checkpoint_path).name}
    if value is not None:
        tags.update({TAG_VERSION_METRIC: metric, TAG_VERSION_VALUE: str(value)})
    for key, tag in tags.items():
        client.set_model_version_tag(name, version, key, tag)
    client.update_model_version(name, version, description=_version_description(client, run_id, checkpoint_path,
                                                                                 metric, value))
    try:
        current = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        current = None
    champion, message = _should_crown(metric, value, current)
    if champion:
        client.set_registered_model_alias(name, CHAMPION, version)
    return Registration(name, str(version), metric, value, champion, f"registered {name} version {version}; {message}")


def _version_description(client: MlflowClient, run_id: str, checkpoint_path: Path, metric: str | None,
                         value: float | None) -> str:
    """A registered version's description: its metric, its training data and where it came from."""
    inputs = client.get_run(run_id).inputs.dataset_inputs
    data = [f"{i.dataset.name} (digest {i.dataset.digest}, {t.value})" for i in inputs for t in i.tags
            if t.key == "mlflow.data.context"]
    score = (f"validation {metric} {value:.4f}" if value is not None
             else "no validation metric (trained without validation)")
    return (f"charseg {Path(checkpoint_path).name} of run {run_id}: {score}. "
            f"Data: {'; '.join(data) or 'not recorded'}.")


def _should_crown(metric: str | None, value: float | None, current) -> tuple[bool, str]:
    from .evaluate import is_better

    if value is None:
        return False, "no validation metric in this checkpoint (trained without validation): champion unchanged"
    if current is None:
        return True, f"{metric} {value:.4f}; it is the first champion"
    their_metric = current.tags.get(TAG_VERSION_METRIC)
    their_value = current.tags.get(TAG_VERSION_VALUE)
    if their_metric != metric or their_value is None:
        return False, (f"champion version {current.version} was chosen on {their_metric}, not {metric}: "
                       "champion unchanged")
    if is_better(metric, value, float(their_value)):
        return True, f"{metric} {value:.4f} beats champion version {current.version} ({float(their_value):.4f})"
    return False, (f"{metric} {value:.4f} does not beat champion version {current.version} "
                   f"({float(their_value):.4f}): champion unchanged")


def register_run(run_id: str, name: str, dst_dir: Path) -> Registration:
    """Register the best checkpoint (else the final/latest one) of run `run_id` as NAME."""
    path, _ = resolve_checkpoint(run_id, dst_dir, prefer_best=True)
    return register_checkpoint(path, name, run_id)


def log_evaluation(metrics: dict[str, float], source: Lineage, data_dir: str, samples: list, json_path: Path) -> None:
    """Record a standalone evaluation in the active run: metrics (step 0), tags, the data as
    an `evaluation` dataset input, JSON artifact."""
    mlflow.set_tags({TAG_MODE: "evaluate", **lineage_tags(source)})
    mlflow.log_param("data_dir", data_dir)
    log_datasets([(data_dir, "evaluation", samples)])
    mlflow.log_metrics({f"eval/{k}": v for k, v in metrics.items()}, step=0)
    mlflow.log_artifact(str(json_path), "evaluation")


def is_run_id(text: str) -> bool:
    """True for a bare MLflow run ID (32 hex digits)."""
    return bool(_RUN_ID_RE.match(text))


def _checkpoint_artifacts(client: MlflowClient, run_id: str) -> list[str]:
    try:
        client.get_run(run_id)
    except MlflowException as exc:
        raise TrackingError(f"run {run_id} not found at {mlflow.get_tracking_uri()}; check the run ID and "
                            "MLFLOW_TRACKING_URI") from exc
    return [Path(f.path).name for f in client.list_artifacts(run_id, CHECKPOINT_DIR) if not f.is_dir]


def resolve_checkpoint(source: str, dst_dir: Path, *, prefer_best: bool = False,
                       epoch: int | None = None) -> tuple[Path, Lineage]:
    """Turn SOURCE (checkpoint file, output folder, run ID or MLflow artifact URI) into a local
    checkpoint file.

    Which checkpoint of a run: checkpoint.pick_checkpoint(prefer_best, epoch); of a folder:
    checkpoint.folder_checkpoint. Downloads go to dst_dir.
    """
    local = ckpt.local_checkpoint(source, prefer_best=prefer_best, epoch=epoch)
    if local is not None:
        return local, Lineage(source_uri=str(local.resolve()))
    configure()
    client = MlflowClient()
    if is_run_id(source):
        names = _checkpoint_artifacts(client, source)
        name = ckpt.pick_checkpoint(names, prefer_best=prefer_best, epoch=epoch)
        if name is None:
            have = ", ".join(sorted(names)) or "none"
            wanted = f"checkpoint of epoch {epoch}" if epoch else "checkpoint"
            raise TrackingError(f"run {source} has no {wanted} under {CHECKPOINT_DIR}/ (it has: {have}); "
                                "runs logged with --log-checkpoints last keep only the latest, none keeps none")
        uri = f"runs:/{source}/{CHECKPOINT_DIR}/{name}"
        run_id = source
    elif "://" in source or source.startswith(("runs:/", "models:/")):
        uri = source
        run_id = source.split("/")[1] if source.startswith("runs:/") else ""
    else:
        raise TrackingError(f"{source}: no such file or folder, and not a run ID or MLflow URI (runs:/, models:/, ...)")
    try:
        downloaded = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst_dir)))
    except MlflowException as exc:
        raise TrackingError(f"cannot download {uri}: {exc.message}") from exc
    if downloaded.is_dir():  # e.g. a registered model: its data folder holds the checkpoint
        candidates = {p.name: p for p in sorted(downloaded.rglob("*.pth"), reverse=True)}
        if not candidates:
            raise TrackingError(f"{uri} holds no .pth checkpoint")
        name = ckpt.pick_checkpoint(list(candidates), prefer_best=prefer_best) or min(candidates)
        downloaded = candidates[name]
    return downloaded, Lineage(source_run_id=run_id, source_uri=uri)

