"""Checkpoints held by MLflow: a run's checkpoint artifacts and `runs:/` or `models:/` URIs,
downloaded to a local file."""

from __future__ import annotations

import json
import re
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from .. import checkpoint as ckpt
from ..checkpoint import Lineage
from .store import TrackingError, configure
from .tags import CHECKPOINT_DIR, CONFIG_ARTIFACT

_RUN_ID_RE = re.compile(r"^[0-9a-f]{32}$")


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


def run_config(source: str) -> dict:
    """The settings a training run logged (CONFIG_ARTIFACT): SOURCE is its run ID, runs:/RUN_ID,
    or runs:/RUN_ID/PATH of a JSON artifact."""
    if is_run_id(source):
        uri = f"runs:/{source}/{CONFIG_ARTIFACT}"
    elif source.startswith("runs:/"):
        run, _, path = source.removeprefix("runs:/").strip("/").partition("/")
        uri = f"runs:/{run}/{path or CONFIG_ARTIFACT}"
    else:
        raise TrackingError(f"{source}: no such file, and not a run ID or runs:/ URI whose config to replay")
    configure()
    try:
        return json.loads(mlflow.artifacts.load_text(uri))
    except MlflowException as exc:
        raise TrackingError(f"cannot read {uri}: {exc.message} (a run logs its config as {CONFIG_ARTIFACT} when "
                            "training starts)") from exc
    except json.JSONDecodeError as exc:
        raise TrackingError(f"{uri} is not JSON: {exc}") from exc


def download_checkpoint(source: str, dst_dir: Path, *, prefer_best: bool = False,
                        epoch: int | None = None) -> tuple[Path, Lineage]:
    """Download the checkpoint SOURCE names in MLflow (a run ID, or an artifact URI: runs:/...,
    models:/...) into DST_DIR; return it and its lineage. Which checkpoint of a run:
    checkpoint.pick_checkpoint. Local files and folders are jobs.resolve_source's."""
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
