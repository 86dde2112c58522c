"""`charseg sync`: copy the runs of an output folder's offline store into the tracking server,
adding only what the server's copy lacks."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from .environment import environment
from .store import DEFAULT_TRACKING_URI, TrackingError, offline_store, server_reachable, store_uri
from .tags import OFFLINE_DIR, TAG_CAUGHT_UP, TAG_CONTINUES, TAG_OFFLINE_RUN


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
    source, target = MlflowClient(store_uri(store)), MlflowClient(target_uri)
    from tqdm import tqdm  # a bar on a terminal only

    runs = [(experiment.name, run) for experiment in source.search_experiments()
            for run in source.search_runs([experiment.experiment_id], max_results=50000)]
    lines = []
    for experiment_name, run in tqdm(runs, desc="syncing runs", unit="run", disable=None, leave=False):
        copy = sync_run(source, target, run, experiment_name)
        lines.append(f"offline run {run.info.run_id} -> run {copy} at {target_uri}")
    return lines


def sync_run(source: MlflowClient, target: MlflowClient, run, experiment_name: str) -> str:
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
    with environment(MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false"):
        yield
