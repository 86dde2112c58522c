"""The model registry: a checkpoint as a new version of a registered model, and the rule that
moves the `champion` alias (a better validation metric than the current champion's)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from .. import checkpoint as ckpt
from .pyfunc import LOADER_MODULE, model_signature, requirements
from .tags import CHAMPION, TAG_SOURCE_RUN, TAG_VERSION_CHECKPOINT, TAG_VERSION_METRIC, TAG_VERSION_VALUE


@dataclass
class Registration:
    """The outcome of registering a checkpoint in the model registry."""

    name: str
    version: str
    metric: str | None
    value: float | None
    champion: bool
    message: str


def register_checkpoint(checkpoint_path: Path, name: str, run_id: str) -> Registration:
    """Log the checkpoint as a pyfunc model in run `run_id`, register a new version of NAME,
    and move the `champion` alias to it only when its validation metric beats the champion's."""
    from importlib.resources import files

    active = mlflow.active_run()
    context = (contextlib.nullcontext() if active and active.info.run_id == run_id
               else mlflow.start_run(run_id=run_id))
    with context:
        info = mlflow.pyfunc.log_model(
            name="model", loader_module=LOADER_MODULE, data_path=str(checkpoint_path),
            code_paths=[str(files("charseg"))], signature=model_signature(), pip_requirements=requirements())
    return register_logged_model(info.model_uri, name, run_id, checkpoint_path)


def register_logged_model(model_uri: str, name: str, run_id: str, checkpoint_path: Path,
                          source_run_id: str | None = None) -> Registration:
    """Register MODEL_URI (a model logged in run `run_id` from CHECKPOINT_PATH, itself written
    by SOURCE_RUN_ID, by default the same run) as a new version of NAME, tagged with the
    checkpoint's validation metric, and move the `champion` alias by the champion rule."""
    state = ckpt.load_checkpoint(checkpoint_path)
    best = state["best"] or {}
    metric, value = best.get("metric"), best.get("value")
    version = mlflow.register_model(model_uri, name).version
    client = MlflowClient()
    tags = {TAG_SOURCE_RUN: source_run_id or run_id, TAG_VERSION_CHECKPOINT: Path(checkpoint_path).name}
    if value is not None:
        tags.update({TAG_VERSION_METRIC: metric, TAG_VERSION_VALUE: str(value)})
    for key, tag in tags.items():
        client.set_model_version_tag(name, version, key, tag)
    client.update_model_version(name, version, description=_version_description(
        client, source_run_id or run_id, checkpoint_path, metric, value))
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
    try:
        inputs = client.get_run(run_id).inputs.dataset_inputs
    except MlflowException:  # an exported checkpoint of a run in another store
        inputs = []
    data = [f"{i.dataset.name} (digest {i.dataset.digest}, {t.value})" for i in inputs for t in i.tags
            if t.key == "mlflow.data.context"]
    score = (f"validation {metric} {value:.4f}" if value is not None
             else "no validation metric (trained without validation)")
    return (f"charseg {Path(checkpoint_path).name} of run {run_id}: {score}. "
            f"Data: {'; '.join(data) or 'not recorded'}.")


def _should_crown(metric: str | None, value: float | None, current) -> tuple[bool, str]:
    from ..inference.evaluate import is_better

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
