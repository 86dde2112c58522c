"""Model registry: pyfunc with signature, champion alias, load in a fresh process, real serving."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import LIGHT_ARGS, LOCAL, _free_port, start_service, stop_service, wait_until_up
from mlflow.tracking import MlflowClient

from charseg import checkpoint as ckpt
from charseg import tracking
from charseg.cli import cli
from charseg.tracking.environment import environment

NAME = "charseg-test"


# One worker runs this module: its registry fixture trains once, not once per worker.
pytestmark = [pytest.mark.server, pytest.mark.xdist_group("registry")]


@pytest.fixture(scope="session")  # once per pytest-xdist worker
def registry(tiny_dataset, tmp_path_factory):
    """A sqlite store holding one trained, validated run registered as NAME (the champion)."""
    root = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with environment("MLFLOW_EXPERIMENT_ID", MLFLOW_TRACKING_URI=uri), contextlib.chdir(root):
        # The last --val-fraction wins over the one in LIGHT_ARGS.
        result = CliRunner().invoke(cli, ["train", str(tiny_dataset), *LIGHT_ARGS, "--epochs", "2", "--val-fraction",
                                          "0.25", "--output-dir", str(root / "out"), "--register-as", NAME])
    assert result.exit_code == 0, result.output
    run_id = result.output.split("MLflow run ")[1].split()[0]
    return {"uri": uri, "root": root, "run_id": run_id, "output": result.output}


@pytest.fixture
def client(registry, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry["uri"])
    return MlflowClient(registry["uri"])


def test_train_registers_the_best_checkpoint_as_champion(registry, client):
    assert "it is the first champion" in registry["output"]
    version = client.get_model_version_by_alias(NAME, "champion")
    assert version.run_id == registry["run_id"]
    assert version.tags["charseg.metric"] == "segm_AP"
    best = ckpt.load_checkpoint(registry["root"] / "out" / "best.pth")["best"]
    assert float(version.tags["charseg.metric_value"]) == best["value"]
    assert version.tags["charseg.checkpoint"] == "best.pth"
    inputs = {t.value: i.dataset for i in client.get_run(registry["run_id"]).inputs.dataset_inputs for t in i.tags}
    assert set(inputs) == {"training", "validation"} and inputs["training"].digest != inputs["validation"].digest
    assert version.description.startswith(f"charseg best.pth of run {registry['run_id']}: validation segm_AP ")
    assert f"digest {inputs['training'].digest}, training" in version.description
    run = client.get_run(registry["run_id"])
    assert run.data.tags["charseg.best_epoch"] == str(best["epoch"])
    assert [m.step for m in client.get_metric_history(registry["run_id"], "val/segm_AP")] == [1, 2]
    images = [f.path for f in client.list_artifacts(registry["run_id"], "images")]
    assert images, "validation overlays are logged as MLflow images"


def test_champion_moves_only_for_a_better_metric(registry, client, tmp_path):
    best_path = registry["root"] / "out" / "best.pth"
    state = ckpt.load_checkpoint(best_path)
    current = float(client.get_model_version_by_alias(NAME, "champion").tags["charseg.metric_value"])

    worse = ckpt.save_checkpoint({**state, "best": {**state["best"], "value": current - 1.0}}, tmp_path / "worse.pth")
    result = tracking.register_checkpoint(worse, NAME, registry["run_id"])
    assert not result.champion and "does not beat champion" in result.message
    assert str(client.get_model_version_by_alias(NAME, "champion").version) != result.version

    better = ckpt.save_checkpoint({**state, "best": {**state["best"], "value": current + 1.0}}, tmp_path / "best.pth")
    result = tracking.register_checkpoint(better, NAME, registry["run_id"])
    assert result.champion and "beats champion" in result.message
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == result.version


def test_register_command_for_a_run(registry, client):
    result = CliRunner().invoke(cli, ["register", registry["run_id"], "--name", "by-command"])
    assert result.exit_code == 0, result.output
    assert str(client.get_model_version_by_alias("by-command", "champion").version) == "1"
    bad = CliRunner().invoke(cli, ["register", "not-a-run", "--name", "x"])
    assert bad.exit_code == 2 and "not an MLflow run ID" in bad.output


def test_champion_predicts_in_a_fresh_process(registry, tiny_dataset):
    code = f"""
import mlflow, pandas as pd
model = mlflow.pyfunc.load_model("models:/{NAME}@champion")
print(model.metadata.get_input_schema().input_names())
frame = pd.DataFrame({{"image": [open({str(tiny_dataset / 'images' / '00001.png')!r}, "rb").read()]}})
out = model.predict(frame, params={{"score_threshold": 0.0}})
print(list(out.columns), len(out), sorted(set(out["image_id"])))
"""
    env = {**os.environ, "MLFLOW_TRACKING_URI": registry["uri"]}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert lines[-2] == "['image']"
    columns, count, ids = lines[-1].split("] ", 1)[0] + "]", *lines[-1].split("] ", 1)[1].split(" ", 1)
    assert columns == "['image_id', 'score', 'box', 'polygon']"
    assert int(count) > 0 and ids == "[0]"


def test_a_model_registered_by_an_earlier_charseg_still_loads(registry, tiny_dataset):
    """Earlier versions logged the pyfunc with loader_module charseg.serving. Such a model
    brings its own copy of charseg, but a process that imported charseg first loads ours."""
    from importlib.resources import files

    import mlflow

    with mlflow.start_run(run_id=registry["run_id"]):
        info = mlflow.pyfunc.log_model(name="earlier", loader_module="charseg.serving",
                                       data_path=str(registry["root"] / "out" / "best.pth"),
                                       code_paths=[str(files("charseg"))])
    code = f"""
import charseg.tracking, mlflow, pandas as pd
model = mlflow.pyfunc.load_model({info.model_uri!r})
frame = pd.DataFrame({{"image": [open({str(tiny_dataset / 'images' / '00001.png')!r}, "rb").read()]}})
print(list(model.predict(frame).columns))
"""
    env = {**os.environ, "MLFLOW_TRACKING_URI": registry["uri"]}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "['image_id', 'score', 'box', 'polygon']"


def test_mlflow_models_serve_answers_with_instances(registry, tiny_dataset, tmp_path):
    port = _free_port()
    # mlflow starts `uvicorn` by name: the environment's bin folder must be on PATH (an activated venv).
    env = {**os.environ, "MLFLOW_TRACKING_URI": registry["uri"],
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    log_path = tmp_path / "serve.log"
    proc = start_service([sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{NAME}@champion",
                          "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)],
                         log_path, env=env, cwd=tmp_path)
    try:
        wait_until_up(proc, f"http://127.0.0.1:{port}/ping", log_path)
        image = base64.b64encode((tiny_dataset / "images" / "00001.png").read_bytes()).decode()
        body = json.dumps({"dataframe_split": {"columns": ["image"], "data": [[image]]},
                           "params": {"score_threshold": 0.0}}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                         headers={"Content-Type": "application/json"})
        with LOCAL.open(request, timeout=120) as response:
            predictions = json.loads(response.read())["predictions"]
        # Bytes that are no image: status 400, and the reason is the answer's message.
        body = json.dumps({"dataframe_split": {"columns": ["image"],
                                               "data": [[image], [base64.b64encode(b"hello").decode()]]}}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                         headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            LOCAL.open(request, timeout=120)
        answer = json.loads(refused.value.read())
    finally:
        stop_service(proc)
    assert predictions and set(predictions[0]) == {"image_id", "score", "box", "polygon"}
    assert len(predictions[0]["box"]) == 4 and len(predictions[0]["polygon"]) >= 6
    assert refused.value.code == 400 and answer["error_code"] == "INVALID_PARAMETER_VALUE"
    assert ("image of row 1: cannot read image (no image format Pillow reads); re-export it as PNG or JPEG"
            in answer["message"]), answer["message"]


def test_resume_and_finetune_register_their_runs_too(registry, client, tiny_dataset, tmp_path):
    out = registry["root"] / "out"
    for args in (["resume", str(out / "model_epoch_001.pth"), "--output-dir", str(tmp_path / "resumed"),
                  "--epochs", "2"],
                 ["finetune", str(out / "model_final.pth"), str(tiny_dataset), "--epochs", "1", "--num-workers", "0",
                  "--output-dir", str(tmp_path / "tuned")]):
        result = CliRunner().invoke(cli, [*args, "--register-as", f"{NAME}-{args[0]}", "--no-system-metrics"])
        assert result.exit_code == 0, result.output
        run_id = result.output.split("MLflow run ")[1].split()[0]
        [version] = client.search_model_versions(f"name='{NAME}-{args[0]}'")
        assert version.run_id == run_id and f"registered {NAME}-{args[0]} version 1" in result.output
