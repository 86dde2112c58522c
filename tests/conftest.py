"""Shared fixtures: tiny datasets made by the generator, and a light model config for CPU."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from charseg.cli import cli
from charseg.config import TrainConfig
from charseg.data.generate import generate_dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "deploy"))
# The service helpers of deploy/ (a folder of recipes, not a package); LOCAL never goes through a proxy.
from local_stack import LOOPBACK as LOCAL  # noqa: E402,F401
from local_stack import free_port as _free_port  # noqa: E402,F401
from local_stack import start_service, stop_service  # noqa: E402
from local_stack import wait_until_up as _wait_until_up  # noqa: E402

# `make test` runs the tests in several pytest-xdist workers: each worker (and every process a
# test starts, through OMP_NUM_THREADS) gets its share of the cores, since two processes that
# each run a thread per core on a 2-core CPU slow each other down severalfold.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    os.environ["OMP_NUM_THREADS"] = str(max(1, len(os.sched_getaffinity(0)) // _WORKERS))
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

# Small enough that one step takes well under a second on a 2-core CPU; 32 FPN channels (the least
# allowed) make checkpoints of 0.1 GB instead of 0.25 and a light training three times faster.
LIGHT = dict(weights="none", backbone="resnet18", fpn_channels=32, min_size=64, max_size=64, num_workers=0, roi_samples=32,
             rpn_proposals_train=100, rpn_proposals_test=50, batch_size=2, warmup_iters=2, log_every=1,
             val_fraction=0.0)


def cli_args(settings: dict) -> list[str]:
    """TrainConfig settings as charseg's command line spells them (--min-size 64 ...)."""
    return [part for key, value in settings.items()
            for part in (f"--{key.replace('_', '-')}", str(value).lower() if isinstance(value, bool) else str(value))]


# LIGHT on the command line; the commands' own batch size (2) and fitted inference proposals.
LIGHT_ARGS = cli_args({k: v for k, v in LIGHT.items() if k not in ("batch_size", "rpn_proposals_test")})
# LIGHT for torchrun's processes: GroupNorm (per page, so one process and two agree) and validation.
# (each test sets its own per-process batch).
DDP_ARGS = [*cli_args({**{k: v for k, v in LIGHT.items() if k != "batch_size"}, "norm": "group", "val_fraction": 0.2,
                       "epochs": 2}), "--no-system-metrics", "--experiment-name", "ddp"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


def run_charseg(*args: str, env: dict, launcher: list[str] | None = None, timeout: int = 300):
    """`python -m charseg ARGS` (or under LAUNCHER) in a fresh process; its CompletedProcess."""
    command = (launcher or [sys.executable, "-m", "charseg"])
    return subprocess.run([*command, *args], env=env, capture_output=True, text=True, timeout=timeout)


def mlflow_run(entry: str, params: dict, experiment: str, tmp_path: Path) -> MlflowClient:
    """`mlflow run` of this project's ENTRY with PARAMS (--env-manager local, the venv's
    commands on PATH) into a sqlite store in TMP_PATH, asserted to succeed; a client of that store."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_EXPERIMENT")}, "MLFLOW_TRACKING_URI": uri,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    cmd = [sys.executable, "-m", "mlflow", "run", str(Path(__file__).resolve().parents[1]), "-e", entry,
           "--env-manager", "local", "--experiment-name", experiment]
    for key, value in params.items():
        cmd += ["-P", f"{key}={value}"]
    done = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return MlflowClient(uri)


def light_config(data_dir: Path, output_dir: Path, **overrides) -> TrainConfig:
    """A TrainConfig for fast CPU tests."""
    return TrainConfig(data_dir=str(data_dir), output_dir=str(output_dir), **{**LIGHT, **overrides})


def pytest_collection_modifyitems(items):
    """The slow and server tests first (pytest's order otherwise): `make test`'s workers take
    tests as they free up, and a minute-long test that started last would keep one core busy
    while the others have nothing left. The fixtures that train a run or start a server for
    several tests are session-scoped: once per worker; the modules whose fixture costs most
    (a registry, a tracked run, the team stack) are an xdist_group each, so one worker runs them."""
    items.sort(key=lambda item: not (item.get_closest_marker("slow") or item.get_closest_marker("server")))


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """Four 64x64 images with 2-4 characters each (shared read-only across tests)."""
    out = tmp_path_factory.mktemp("tiny") / "data"
    generate_dataset(out, num_images=4, width=64, height=64, chars_per_image=(2, 4), font_size=(14, 24), seed=3)
    return out


@pytest.fixture(scope="session")
def light_checkpoint(tiny_dataset, tmp_path_factory) -> Path:
    """model_final.pth of one light epoch on tiny_dataset, trained once for the tests that only
    need some trained checkpoint to predict or evaluate with (read-only)."""
    from charseg.training import runner

    return runner.train(light_config(tiny_dataset, tmp_path_factory.mktemp("light-run"), epochs=1)).final_checkpoint


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


def wait_until_up(proc: subprocess.Popen, url: str, log_path: Path, seconds: float = 180) -> None:
    """local_stack.wait_until_up, and the server stopped when it does not come up."""
    try:
        _wait_until_up(proc, url, log_path, seconds)
    except RuntimeError:
        stop_service(proc)
        raise


@pytest.fixture
def server(mlflow_server, monkeypatch):
    """An MlflowClient of the session's mlflow_server, which $MLFLOW_TRACKING_URI names for the test."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    return MlflowClient(mlflow_server)


def run_cli(*args: str) -> str:
    """`charseg ARGS` in this process (click's runner); its output, after asserting it succeeded."""
    result = CliRunner().invoke(cli, list(args))
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.output


def datasets(client: MlflowClient, run_id: str) -> dict[str, tuple[str, str]]:
    """context -> (dataset name, digest) of a run's dataset inputs."""
    return {t.value: (i.dataset.name, i.dataset.digest) for i in client.get_run(run_id).inputs.dataset_inputs
            for t in i.tags if t.key == "mlflow.data.context"}


def steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return [m.step for m in client.get_metric_history(run_id, key)]


def artifacts(client: MlflowClient, run_id: str, folder: str) -> list[str]:
    return sorted(Path(f.path).name for f in client.list_artifacts(run_id, folder))


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
