"""Shared fixtures: tiny datasets made by the generator, and a light model config for CPU."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from charseg.config import TrainConfig
from charseg.generate import generate_dataset

# Small enough that one step takes well under a second on a 2-core CPU.
LIGHT = dict(weights="none", backbone="resnet18", min_size=64, max_size=64, num_workers=0, roi_samples=32,
             rpn_proposals_train=100, rpn_proposals_test=50, batch_size=2, warmup_iters=2, log_every=1,
             val_fraction=0.0)


def light_config(data_dir: Path, output_dir: Path, **overrides) -> TrainConfig:
    """A TrainConfig for fast CPU tests."""
    return TrainConfig(data_dir=str(data_dir), output_dir=str(output_dir), **{**LIGHT, **overrides})


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """Four 64x64 images with 2-4 characters each (shared read-only across tests)."""
    out = tmp_path_factory.mktemp("tiny") / "data"
    generate_dataset(out, num_images=4, width=64, height=64, chars_per_image=(2, 4), font_size=(14, 24), seed=3)
    return out


@pytest.fixture(autouse=True)
def _charseg_logs(caplog):
    caplog.set_level(logging.INFO, logger="charseg")


@pytest.fixture(autouse=True)
def _isolated_tracking(tmp_path_factory, monkeypatch):
    """Every test tracks into a throw-away sqlite store, never ./mlflow.db of the checkout."""
    store = tmp_path_factory.getbasetemp() / "default-store"
    store.mkdir(exist_ok=True)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store / 'mlflow.db'}")
    monkeypatch.chdir(store)  # default artifact root ./mlruns and outputs/ land here too
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)  # mlflow.set_experiment exports it


# Loopback requests must never go through a proxy; urllib's default opener also caches the
# proxy settings of its first use (which a test may have pointed at a closed port).
LOCAL = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def start_service(args: list[str], log_path: Path, **kwargs) -> subprocess.Popen:
    """Start a server in its own process group, output to a file (a full pipe would block it)."""
    log = open(log_path, "w")
    return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, **kwargs)


def wait_until_up(proc: subprocess.Popen, url: str, log_path: Path, seconds: float = 180) -> None:
    """Poll `url` until it answers; fail with the server's log if it dies or takes too long."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            with LOCAL.open(url, timeout=2):
                return
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_service(proc)
            raise RuntimeError(f"{url} did not come up: {log_path.read_text()[-3000:]}")
        time.sleep(0.5)


def stop_service(proc: subprocess.Popen) -> None:
    """Stop the server and every process it started (mlflow spawns uvicorn and workers)."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory) -> str:
    """A real `mlflow server` on 127.0.0.1 with a sqlite backend and the artifact proxy."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    proc = start_service(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts"),
         "--workers", "1"], root / "server.log", cwd=root)
    url = f"http://127.0.0.1:{port}"
    wait_until_up(proc, f"{url}/health", root / "server.log")
    yield url
    stop_service(proc)
