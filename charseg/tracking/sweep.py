"""A sweep's parent MLflow run: its trials are child runs (mlflow.parentRunId) under it, and it
carries the best trial's params, metric and run as they change."""

from __future__ import annotations

import contextlib
from typing import Iterator

import mlflow
from .environment import environment
from .run import ending_active_run
from .store import configure
from .tags import BEST_PARAM_PREFIX, TAG_BEST_TRIAL, TAG_BEST_TRIAL_RUN, TAG_SWEEP


@contextlib.contextmanager
def parent_run(experiment_name: str | None, folder: str, run_id: str | None = None,
               params: dict | None = None) -> Iterator[tuple[str, str]]:
    """The sweep's parent run for the block, new (with PARAMS: the settings every trial starts
    from, the space) or (RUN_ID, a sweep resumed after a kill) the one it had; yields its ID and
    its experiment's name (the trials' too). Ends FINISHED, KILLED (Ctrl-C, SIGTERM) or FAILED
    with the reason."""
    configure(experiment_name)
    run = mlflow.start_run(run_id=run_id) if run_id else mlflow.start_run(tags={TAG_SWEEP: folder})
    if not run_id and params:
        mlflow.log_params(params)
    # Under `mlflow run` the parent is the project's run ($MLFLOW_RUN_ID): the trials must start
    # child runs of their own, not attach to it again.
    with ending_active_run(), environment(MLFLOW_RUN_ID=None):
        yield run.info.run_id, mlflow.get_experiment(run.info.experiment_id).name


def log_best_trial(parent_run_id: str, trial_number: int, metric: str, value: float, params: dict,
                   trial_run_id: str) -> None:
    """Record on the parent run the best trial so far: metric best/METRIC at step = its trial
    number, its sampled settings as best.* tags, its child run."""
    client = mlflow.MlflowClient()
    client.log_metric(parent_run_id, f"best/{metric}", value, step=trial_number)
    client.set_tag(parent_run_id, TAG_BEST_TRIAL_RUN, trial_run_id)
    client.set_tag(parent_run_id, TAG_BEST_TRIAL, str(trial_number))
    for name, setting in params.items():
        client.set_tag(parent_run_id, f"{BEST_PARAM_PREFIX}{name}", str(setting))
