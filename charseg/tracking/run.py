"""A run's lifecycle: start it (on the server, or on the output folder's store when the server
is away), end it FINISHED, FAILED or KILLED, and close runs whose process died."""

from __future__ import annotations

import contextlib
import logging
import os
import random
import re
import socket
import time
from typing import TYPE_CHECKING, Iterator

import mlflow
from mlflow.entities import RunStatus
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from ..errors import Stopped
from .environment import environment
from .store import (DEFAULT_TRACKING_URI, SERVER_AWAY, TrackingError, configure, offline_store, server_reachable,
                    use_offline_store)
from .sync import sync_offline_runs
from .tags import TAG_FAILURE, TAG_RESUMED_BY, TAG_WRITER

if TYPE_CHECKING:
    from .tracker import MlflowTracker

log = logging.getLogger("charseg")


# A RUNNING source run on another host whose last step metric is older than this is taken
# as dead (a preempted machine) when resumed; a step is logged every training iteration.
ABANDONED_AFTER_S = 900

# Each call to a tracking server gets this many retries (MLflow's default, 7, waits about four
# minutes) before a running training fails over to its local store; $MLFLOW_HTTP_REQUEST_MAX_RETRIES
# set by the user wins.
FAILOVER_RETRIES = 2


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
    # An offline store's mlflow.set_tracking_uri also sets $MLFLOW_TRACKING_URI: later commands
    # of this process (sync) get the server again; mlflow's own URI stays on the run's store.
    with environment("MLFLOW_TRACKING_URI"):
        if offline or failover:
            use_offline_store(offline_store(output_dir), experiment_name)
        else:
            configure(experiment_name)
        with _failing_over_quickly(server):
            yield from _run_lifecycle(system_metrics, tracker)
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
    try:
        with environment(**({} if variable in os.environ else {variable: str(FAILOVER_RETRIES)})):
            yield
    finally:
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
        # Inside a run of this process (a sweep's parent), a child run.
        run = mlflow.start_run(log_system_metrics=system_metrics, nested=mlflow.active_run() is not None)
    except MlflowException as exc:
        raise TrackingError(f"cannot start an MLflow run at {mlflow.get_tracking_uri()}: {exc.message}") from exc
    finally:
        random.setstate(state)
    with ending_active_run(tracker):
        yield run.info.run_id


@contextlib.contextmanager
def ending_active_run(tracker: MlflowTracker | None = None) -> Iterator[None]:
    """End the active run when the block ends: FINISHED, KILLED on Ctrl-C or SIGTERM
    (errors.Stopped) or FAILED, the reason in charseg.failure_reason (_end_run)."""
    try:
        yield
    except KeyboardInterrupt as exc:
        how = str(exc) if isinstance(exc, Stopped) else "interrupted (Ctrl-C)"
        _end_run(RunStatus.KILLED, f"{how}; the last checkpoint is complete", tracker)
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
            stop_system_metrics(mlflow.active_run().info.run_id)
            with environment(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0"), contextlib.suppress(*SERVER_AWAY):
                mlflow.end_run(status_name)  # pops the run first, then fails to reach the server
            return
    if reason:
        mlflow.set_tag(TAG_FAILURE, reason)
    mlflow.end_run(status_name)


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


def stop_system_metrics(run_id: str) -> None:
    """Stop MLflow's system-metrics sampler of RUN_ID (it would poll a server that is gone)."""
    from mlflow.tracking import fluent

    monitor = getattr(fluent, "run_id_to_system_metrics_monitor", {}).pop(run_id, None)
    if monitor is not None:
        with contextlib.suppress(Exception):
            monitor._shutdown_event.set()
