"""A tracking server that is down at the start, lost mid-run or still away at the end: the run
goes on in the output folder's local store, catches up or is synced by `charseg sync`; only a
server that is away moves a run there."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import LIGHT_ARGS, artifacts, datasets, run_cli, steps
from mlflow.tracking import MlflowClient

from charseg import checkpoint as ckpt
from charseg import tracking
from charseg.cli import cli

pytestmark = [pytest.mark.server]


@contextlib.contextmanager
def paused(proc: subprocess.Popen):
    """Hold PROC (SIGSTOP) for the block: what the block does to its server happens between
    the same two of its steps however fast the machine trains."""
    proc.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        proc.send_signal(signal.SIGCONT)


def test_a_run_after_an_offline_run_in_one_process_goes_to_the_tracking_server_again(tmp_path, monkeypatch):
    """An offline run points mlflow at OUTPUT_DIR's store; the next run of the process (the
    Python API, a notebook) belongs on $MLFLOW_TRACKING_URI again, not in that store."""
    uri = f"sqlite:///{tmp_path / 'server.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with tracking.tracked_run("air-gapped", output_dir=str(tmp_path / "out"), offline=True) as offline_run:
        pass
    with tracking.tracked_run("back-online") as online_run:
        pass
    server = MlflowClient(uri)
    assert server.get_run(online_run).info.experiment_id == server.get_experiment_by_name("back-online").experiment_id
    assert server.get_experiment_by_name("air-gapped") is None
    local = MlflowClient(f"sqlite:///{tracking.offline_store(tmp_path / 'out') / 'mlflow.db'}")
    assert local.get_run(offline_run).info.status == "FINISHED"
    assert local.get_experiment_by_name("back-online") is None


def test_a_server_down_at_the_start_records_offline_and_sync_uploads_it_once(tiny_dataset, tmp_path, monkeypatch):
    """The server is down when training starts: the run goes to the output folder's offline
    store at once (no minutes of retries), with a warning. The server comes back on the same
    port: `charseg sync` uploads the run with every param, metric step and checkpoint byte,
    and a second sync duplicates nothing."""
    import sys as _sys

    from conftest import _free_port, start_service, stop_service, wait_until_up

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    out = tmp_path / "out"
    started = time.monotonic()
    result = CliRunner().invoke(cli, ["train", str(tiny_dataset), *LIGHT_ARGS, "--epochs", "2", "--output-dir",
                                      str(out), "--log-checkpoints", "all", "--experiment-name", "failover"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert time.monotonic() - started < 120
    assert f"tracking server {url} does not answer: recording this run in {out / 'offline-tracking'}" in result.output
    offline = MlflowClient(f"sqlite:///{out / 'offline-tracking' / 'mlflow.db'}")
    [local] = offline.search_runs([offline.get_experiment_by_name("failover").experiment_id])
    assert local.info.status == "FINISHED"

    root = tmp_path / "server"
    root.mkdir()
    proc = start_service([_sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                          "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination",
                          str(root / "artifacts"), "--workers", "1"], root / "server.log", cwd=root)
    try:
        wait_until_up(proc, f"{url}/health", root / "server.log")
        first = run_cli("sync", str(out))
        second = run_cli("sync", str(out))
        server = MlflowClient(url)
        [copy] = server.search_runs([server.get_experiment_by_name("failover").experiment_id])
        assert first.split(" -> run ")[1].split()[0] == second.split(" -> run ")[1].split()[0] == copy.info.run_id
        assert copy.info.status == "FINISHED" and copy.data.tags["charseg.offline_run_id"] == local.info.run_id
        assert copy.info.start_time == local.info.start_time and copy.info.end_time == local.info.end_time
        assert copy.data.params == local.data.params
        for key in local.data.metrics:
            mine = [(m.step, m.timestamp, m.value) for m in offline.get_metric_history(local.info.run_id, key)]
            theirs = [(m.step, m.timestamp, m.value) for m in server.get_metric_history(copy.info.run_id, key)]
            assert sorted(theirs) == sorted(mine), key
        assert artifacts(server, copy.info.run_id, "checkpoints") == [
            "model_epoch_001.pth", "model_epoch_002.pth", "model_final.pth"]
        downloaded = Path(server.download_artifacts(copy.info.run_id, "checkpoints/model_final.pth", str(tmp_path)))
        assert downloaded.read_bytes() == (out / "model_final.pth").read_bytes()
        assert datasets(server, copy.info.run_id) == datasets(offline, local.info.run_id)
    finally:
        stop_service(proc)


def test_offline_on_purpose_and_sync_errors_are_one_line(tiny_dataset, tmp_path, server):
    out = tmp_path / "out"
    output = run_cli("train", str(tiny_dataset), *LIGHT_ARGS, "--epochs", "1", "--output-dir", str(out), "--offline",
                     "--experiment-name", "air-gapped")
    assert "does not answer" not in output and (out / "offline-tracking" / "mlflow.db").is_file()
    assert server.get_experiment_by_name("air-gapped") is None  # nothing reached the server
    result = CliRunner().invoke(cli, ["sync", str(tmp_path)])
    assert result.exit_code == 1 and "no offline runs here" in result.output
    result = CliRunner().invoke(cli, ["sync", str(out), "--tracking-uri", "http://127.0.0.1:9"])
    assert result.exit_code == 1 and "does not answer; try again when it is up" in result.output
    assert " -> run " in run_cli("sync", str(out))
    assert len(server.search_runs([server.get_experiment_by_name("air-gapped").experiment_id])) == 1


def test_a_server_lost_mid_run_fails_over_and_the_run_catches_up(tmp_path):
    """The server goes away after epoch 1 for longer than the client's retries, then comes back
    on the same port and store before training ends: training never fails, records the rest
    locally (one warning), and catches up by itself. The server's run then has every param,
    per-step and per-epoch metric (same steps and values) of an undisturbed run, and every
    checkpoint (same bytes); a later `charseg sync` adds nothing."""
    from conftest import _free_port, start_service, stop_service, wait_until_up

    from charseg.data.generate import generate_dataset

    data = tmp_path / "data"
    generate_dataset(data, num_images=6, width=96, height=96, chars_per_image=(3, 6), seed=4)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    root = tmp_path / "server"
    root.mkdir()

    def start_server() -> subprocess.Popen:
        proc = start_service([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                              "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination",
                              str(root / "artifacts"), "--workers", "1"], root / "server.log", cwd=root)
        wait_until_up(proc, f"{url}/health", root / "server.log")
        return proc

    env = {**os.environ, "MLFLOW_TRACKING_URI": url, "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "1"}
    args = ["train", str(data), "--weights", "none", "--backbone", "resnet18", "--min-size", "96", "--max-size", "96",
            "--num-workers", "0", "--roi-samples", "32", "--rpn-proposals-train", "100", "--warmup-iters", "2",
            "--log-every", "1", "--val-fraction", "0.2", "--epochs", "4", "--log-checkpoints", "all",
            "--experiment-name", "midrun", "--fpn-channels", "32"]  # 32: checkpoints of 0.1 GB, not 0.25
    proc = start_server()
    try:
        calm = subprocess.run([sys.executable, "-m", "charseg", *args, "--output-dir", str(tmp_path / "calm")],
                              env=env, capture_output=True, text=True, timeout=300)
        assert calm.returncode == 0, calm.stderr[-3000:]
        out, log_path = tmp_path / "stormy", tmp_path / "stormy.log"
        with open(log_path, "w") as log:
            trainer = subprocess.Popen([sys.executable, "-m", "charseg", *args, "--output-dir", str(out)], env=env,
                                       stdout=log, stderr=subprocess.STDOUT)

        def wait_for(condition, what: str, seconds: float = 180) -> None:
            deadline = time.monotonic() + seconds
            while not condition():
                assert trainer.poll() is None, f"training ended before {what}: {log_path.read_text()[-3000:]}"
                assert time.monotonic() < deadline, f"no {what}: {log_path.read_text()[-3000:]}"
                time.sleep(0.2)

        wait_for(lambda: (out / "model_epoch_001.pth").exists(), "epoch 1")
        stop_service(proc, grace=0)  # the server's machine is lost
        wait_for(lambda: "stopped answering" in log_path.read_text(), "failover warning")
        wait_for(lambda: (out / "model_epoch_002.pth").exists(), "epoch 2 while the server is down")
        # Hold training while the server restarts: on a fast machine the last epochs took less
        # time than the server's start-up, so the run ended before there was a server to catch up with.
        with paused(trainer):
            assert not (out / ckpt.FINAL_NAME).exists(), "training finished before the server could come back"
            proc = start_server()
        assert trainer.wait(timeout=300) == 0, log_path.read_text()[-3000:]
        output = log_path.read_text()
        assert output.count("stopped answering") == 1 and "caught up" in output

        client = MlflowClient(url)
        calm_run, run = sorted(client.search_runs([client.get_experiment_by_name("midrun").experiment_id]),
                               key=lambda r: r.info.start_time)
        assert run.info.status == "FINISHED" and run.info.run_id in output
        different = {"output_dir"}  # the two runs' own folders
        assert {k: v for k, v in run.data.params.items() if k not in different} == \
               {k: v for k, v in calm_run.data.params.items() if k not in different}
        timing = ("seconds", "images_per_s")
        keys = {k for k in calm_run.data.metrics if not k.startswith("system/")}
        assert keys <= set(run.data.metrics)
        for key in keys:
            got = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]
            want = [(m.step, m.value) for m in client.get_metric_history(calm_run.info.run_id, key)]
            if key.endswith(timing):
                assert sorted(s for s, _ in got) == sorted(s for s, _ in want), key
            else:
                assert sorted(got) == sorted(want), key
        names = artifacts(client, run.info.run_id, "checkpoints")
        assert names == artifacts(client, calm_run.info.run_id, "checkpoints")
        assert len(names) == 6  # 4 epochs, best.pth, model_final.pth
        for name in names:
            fetched = Path(client.download_artifacts(run.info.run_id, f"checkpoints/{name}", str(tmp_path / "dl")))
            assert fetched.read_bytes() == (out / name).read_bytes(), name

        points = {key: len(client.get_metric_history(run.info.run_id, key)) for key in keys}
        env_sync = {**env}
        again = subprocess.run([sys.executable, "-m", "charseg", "sync", str(out)], env=env_sync, capture_output=True,
                               text=True, timeout=300)
        assert again.returncode == 0, again.stderr[-2000:]
        assert {key: len(client.get_metric_history(run.info.run_id, key)) for key in keys} == points
        assert [r.info.run_id for r in client.search_runs([calm_run.info.experiment_id])].count(run.info.run_id) == 1
        assert len(client.search_runs([calm_run.info.experiment_id])) == 2
    finally:
        stop_service(proc)


def test_a_server_still_away_when_training_ends_is_synced_into_the_same_run(tiny_dataset, tmp_path):
    """The server goes away after epoch 1 and is back only after training ended: the server's
    run stays RUNNING (training said so), and `charseg sync` copies the rest and the final
    status into that run, not a new one."""
    from conftest import _free_port, start_service, stop_service, wait_until_up

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    root = tmp_path / "server"
    root.mkdir()
    command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
               "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination",
               str(root / "artifacts"), "--workers", "1"]
    proc = start_service(command, root / "server.log", cwd=root)
    wait_until_up(proc, f"{url}/health", root / "server.log")
    out, log_path = tmp_path / "out", tmp_path / "train.log"
    env = {**os.environ, "MLFLOW_TRACKING_URI": url}
    try:
        with open(log_path, "w") as log:
            trainer = subprocess.Popen([sys.executable, "-m", "charseg", "train", str(tiny_dataset), *LIGHT_ARGS,
                                        "--epochs", "2", "--output-dir", str(out), "--log-checkpoints", "all",
                                        "--experiment-name", "away", "--register-as", "away-model"],
                                       env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 180
        while not (out / "model_epoch_001.pth").exists():
            assert trainer.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.1)
        with paused(trainer):  # the server is gone before epoch 2
            stop_service(proc, grace=0)
        assert trainer.wait(timeout=300) == 0, log_path.read_text()[-3000:]
        output = log_path.read_text()
        assert "stopped answering" in output and "stays RUNNING there until `charseg sync" in output
        assert "not registered as away-model" in output and "Retrying (" not in output

        proc = start_service(command, root / "server.log", cwd=root)
        wait_until_up(proc, f"{url}/health", root / "server.log")
        client = MlflowClient(url)
        [run] = client.search_runs([client.get_experiment_by_name("away").experiment_id])
        assert run.info.status == "RUNNING"
        synced = subprocess.run([sys.executable, "-m", "charseg", "sync", str(out)], env=env, capture_output=True,
                                text=True, timeout=300)
        assert synced.returncode == 0, synced.stderr[-2000:]
        [run] = client.search_runs([client.get_experiment_by_name("away").experiment_id])
        assert run.info.status == "FINISHED"
        assert steps(client, run.info.run_id, "train_epoch/loss") == [1, 2]
        assert artifacts(client, run.info.run_id, "checkpoints") == [
            "model_epoch_001.pth", "model_epoch_002.pth", "model_final.pth"]
    finally:
        stop_service(proc)


def test_only_a_server_that_is_away_moves_a_run_to_its_local_store():
    import requests
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    from charseg.tracking.store import server_is_away

    assert server_is_away(MlflowException("API request to http://x failed with exception Max retries exceeded"))
    assert server_is_away(requests.exceptions.ConnectionError("refused")) and server_is_away(ConnectionRefusedError())
    assert not server_is_away(MlflowException("bad metric", error_code=INVALID_PARAMETER_VALUE))
    assert not server_is_away(FileNotFoundError("checkpoint.pth")) and not server_is_away(ValueError("a bug"))


@pytest.mark.parametrize("error", [ValueError("a bug in charseg"), FileNotFoundError("no such checkpoint")])
def test_a_bug_while_recording_raises_instead_of_failing_over(error):
    tracker = tracking.MlflowTracker()
    tracker._server_uri = "http://127.0.0.1:9"

    def action(client, run):
        raise error

    with pytest.raises(type(error)):
        tracker._send(action)
    assert not tracker.continuing


@pytest.mark.parametrize("json_body", [True, False])
def test_a_refusal_mid_run_is_one_line_naming_the_resume_not_a_failover(json_body, monkeypatch):
    from mlflow.exceptions import MlflowException, RestException

    tracker = tracking.MlflowTracker()
    tracker._server_uri, tracker._run = "http://127.0.0.1:9", "abc"
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")

    def action(client, run):  # what MLflow raises for a basic-auth server's 401 (a JSON body or text)
        if json_body:
            raise RestException({"error_code": "UNAUTHENTICATED", "message": "You are not authenticated."})
        raise MlflowException("API request to endpoint /api/2.0/mlflow/runs/log-batch failed with error code "
                              "401 != 200. Response body: 'You are not authenticated.'")

    with pytest.raises(tracking.TrackingError, match="refused run abc mid-run: the server refused the credentials "
                                                     "of user 'alice'.*charseg resume"):
        tracker._send(action)
    assert not tracker.continuing
