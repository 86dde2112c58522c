"""Which tracking store a command talks to: $MLFLOW_TRACKING_URI (default SQLite), the
output folder's offline store, and whether a server answers."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import mlflow
import requests
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from ..errors import CharsegError
from .tags import DEFAULT_EXPERIMENT, DEFAULT_TRACKING_URI, OFFLINE_DIR


class TrackingError(CharsegError):
    """A run, artifact or tracking server cannot be used as asked."""


# What a call to a tracking server raises when the server is away or failing: connection
# errors, and MlflowException (MLflow wraps a request that failed after its retries, and the
# server's own errors, in it). `server_is_away` tells which of these are the server's doing.
SERVER_AWAY = (MlflowException, requests.exceptions.RequestException, ConnectionError, TimeoutError)


def server_is_away(exc: BaseException) -> bool:
    """Whether EXC says the server did not answer or failed (a 5xx), not that charseg asked
    for something wrong (a 4xx) or has a bug: only the former moves a run to its local store."""
    if isinstance(exc, MlflowException):
        return exc.get_http_status_code() >= 500
    if isinstance(exc, requests.exceptions.HTTPError):
        return exc.response is None or exc.response.status_code >= 500
    return isinstance(exc, (requests.exceptions.ConnectionError, requests.exceptions.Timeout, ConnectionError,
                            TimeoutError))


def configure(experiment_name: str | None = None) -> None:
    """Point mlflow at MLFLOW_TRACKING_URI (default sqlite:///mlflow.db) and the experiment.

    Under `mlflow run` the run (and so its experiment) already exists: leave it alone.
    Set every time: an offline run earlier in this process left mlflow on its own store.
    """
    mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI)
    if os.environ.get("MLFLOW_RUN_ID"):
        return
    name = chosen_experiment(experiment_name)
    try:
        mlflow.set_experiment(name)
    except MlflowException as exc:
        raise TrackingError(f"cannot use experiment {name!r} at {mlflow.get_tracking_uri()}: "
                            f"{access_refused(exc) or exc.message}") from exc


def access_refused(exc: MlflowException) -> str | None:
    """What to do when a server with authentication (mlflow server --app-name basic-auth)
    refused a request: a sentence for 401 and 403, else None. Such a refusal is no server that
    is away: charseg never fails over to the offline store for it (the server answers)."""
    status = getattr(exc, "get_http_status_code", lambda: None)()
    text = str(exc)
    if status == 401 or "401 != 200" in text:
        user = os.environ.get("MLFLOW_TRACKING_USERNAME")
        if not user:
            return "the server needs a user: set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"
        return (f"the server refused the credentials of user {user!r}: check MLFLOW_TRACKING_PASSWORD (an admin "
                "creates users and resets passwords: deploy/README.md)")
    if status == 403 or "403 != 200" in text:
        return (f"user {os.environ.get('MLFLOW_TRACKING_USERNAME')!r} has no permission for this; ask an admin to "
                "grant it on the experiment or registered model (deploy/README.md, Users and permissions)")
    return None


def chosen_experiment(given: str | None) -> str:
    """--experiment-name, else $MLFLOW_EXPERIMENT_NAME, else charseg."""
    return given or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT


def current_tracking_uri() -> str:
    """The tracking URI in use (after `configure`)."""
    return mlflow.get_tracking_uri()


SERVER_PROBE_TIMEOUT_S = 5


def offline_store(output_dir: str | Path) -> Path:
    """The local tracking store of OUTPUT_DIR (runs made with --offline or while the server was down)."""
    return Path(output_dir).resolve() / OFFLINE_DIR


def store_uri(store: Path) -> str:
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


def local_experiment(store: Path, name: str) -> str:
    """The ID of experiment NAME in the local STORE (created with its artifacts inside STORE)."""
    store.mkdir(parents=True, exist_ok=True)
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)  # "Creating initial MLflow database tables"
    client = MlflowClient(store_uri(store))
    experiment = client.get_experiment_by_name(name)
    return experiment.experiment_id if experiment else client.create_experiment(
        name, artifact_location=str(store / "artifacts"))


def use_offline_store(store: Path, experiment_name: str | None) -> None:
    """Point mlflow at STORE, with the experiment's artifacts inside it."""
    name = chosen_experiment(experiment_name)
    local_experiment(store, name)
    mlflow.set_tracking_uri(store_uri(store))
    mlflow.set_experiment(name)
