"""MLflow tracking against a real `mlflow server` (sqlite backend, artifact proxy) on 127.0.0.1."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import LIGHT_ARGS
from mlflow.tracking import MlflowClient

from charseg import checkpoint as ckpt
from charseg import tracking
from charseg.cli import cli

pytestmark = [pytest.mark.server]


@pytest.fixture
def server(mlflow_server, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    return MlflowClient(mlflow_server)


def run_cli(*args: str) -> str:
    result = CliRunner().invoke(cli, list(args))
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.output


def run_id_of(output: str) -> str:
    return output.split("MLflow run ")[1].split()[0]


def datasets(client: MlflowClient, run_id: str) -> dict[str, tuple[str, str]]:
    """context -> (dataset name, digest) of a run's dataset inputs."""
    return {t.value: (i.dataset.name, i.dataset.digest) for i in client.get_run(run_id).inputs.dataset_inputs
            for t in i.tags if t.key == "mlflow.data.context"}


def steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return [m.step for m in client.get_metric_history(run_id, key)]


@contextlib.contextmanager
def paused(proc: subprocess.Popen):
    """Hold PROC (SIGSTOP) for the block: what the block does to its server happens between
    the same two of its steps however fast the machine trains."""
    proc.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        proc.send_signal(signal.SIGCONT)


def artifacts(client: MlflowClient, run_id: str, folder: str) -> list[str]:
    return sorted(Path(f.path).name for f in client.list_artifacts(run_id, folder))


@pytest.fixture(scope="module")
def trained_run(mlflow_server, tiny_dataset, tmp_path_factory):
    """One 2-epoch training run over HTTP with every checkpoint logged; shared by the tests below."""
    out = tmp_path_factory.mktemp("trained")
    env = {"MLFLOW_TRACKING_URI": mlflow_server, "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "1"}
    old = {k: os.environ.get(k) for k in (*env, "MLFLOW_EXPERIMENT_ID")}
    os.environ.update(env)
    try:
        output = run_cli("train", str(tiny_dataset), *LIGHT_ARGS, "--epochs", "2", "--output-dir", str(out),
                         "--log-checkpoints", "all", "--experiment-name", "tracking-tests")
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    return run_id_of(output)


def test_train_run_records_params_metrics_tags_and_artifacts(server, trained_run):
    run = server.get_run(trained_run)
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["epochs"] == "2" and params["lr"] == "0.005" and params["seed"] == "15107"
    assert params["backbone"] == "resnet18" and params["weights"] == "none" and params["mode"] == "train"
    assert params["data.images_used"] == "4" and params["data.images_skipped"] == "0"
    assert int(params["data.instances"]) >= 8
    assert run.data.tags["charseg.mode"] == "train"
    assert steps(server, trained_run, "train_epoch/loss") == [1, 2]
    assert steps(server, trained_run, "train_epoch/lr") == [1, 2]
    assert steps(server, trained_run, "train_epoch/images_per_s") == [1, 2]
    assert steps(server, trained_run, "train_step/loss") == [1, 2, 3, 4]  # 2 steps per epoch, log_every 1
    assert "train_step/loss_mask" in run.data.metrics
    assert artifacts(server, trained_run, "checkpoints") == [
        "model_epoch_001.pth", "model_epoch_002.pth", "model_final.pth"]
    assert artifacts(server, trained_run, "config") == ["config.json"]
    assert artifacts(server, trained_run, "data") == ["dataset_report.txt", "val_images.txt"]
    # The UI's Datasets panel, System metrics tab, description and source commit.
    from charseg.data.dataset import samples_digest, scan_dataset

    assert datasets(server, trained_run) == {"training": ("data", samples_digest(scan_dataset(
        Path(run.data.params["data_dir"])).samples))}
    assert any(key.startswith("system/cpu_utilization") for key in run.data.metrics), sorted(run.data.metrics)
    assert "system/system_memory_usage_megabytes" in run.data.metrics
    description = run.data.tags["mlflow.note.content"]
    assert description.startswith("charseg train: ") and "2 epochs" in description
    assert "final model model_final.pth" in description
    assert len(run.data.tags["mlflow.source.git.commit"]) == 40


def test_resume_from_run_id_continues_the_steps(server, trained_run, tmp_path):
    output = run_cli("resume", trained_run, "--epochs", "3", "--num-workers", "0", "--output-dir", str(tmp_path))
    resumed = run_id_of(output)
    run = server.get_run(resumed)
    assert run.info.status == "FINISHED"
    assert run.data.tags["charseg.mode"] == "resume"
    assert run.data.tags["charseg.source_run_id"] == trained_run
    assert run.data.tags["charseg.source_checkpoint"] == f"runs:/{trained_run}/checkpoints/model_final.pth"
    assert steps(server, resumed, "train_epoch/loss") == [3]
    assert steps(server, resumed, "train_step/loss") == [5, 6]
    assert datasets(server, resumed) == datasets(server, trained_run)  # the same data, the same digest
    # Default policy last: the latest epoch, uploaded before validating it, then the final model.
    assert artifacts(server, resumed, "checkpoints") == ["last.pth", "model_final.pth"]
    assert ckpt.load_checkpoint(tmp_path / "model_final.pth")["epoch"] == 3


def test_resume_from_a_chosen_epoch(server, trained_run, tmp_path):
    output = run_cli("resume", trained_run, "--epoch", "1", "--num-workers", "0", "--output-dir", str(tmp_path))
    assert steps(server, run_id_of(output), "train_epoch/loss") == [2]


def test_resume_of_a_finished_run_says_so(server, trained_run):
    output = run_cli("resume", trained_run)
    assert "already finished all 2 epochs" in output and trained_run in output


def test_finetune_from_run_id(server, trained_run, tiny_dataset, tmp_path):
    output = run_cli("finetune", "", str(tiny_dataset), "--run-id", trained_run, "--epochs", "1",
                     "--num-workers", "0", "--output-dir", str(tmp_path))
    run = server.get_run(run_id_of(output))
    assert run.data.tags["charseg.mode"] == "finetune"
    assert run.data.tags["charseg.source_run_id"] == trained_run
    assert run.data.params["lr_factor"] == "0.2"
    assert steps(server, run.info.run_id, "train_epoch/loss") == [1]
    assert not list(tmp_path.glob(".download-*"))  # downloaded into the output folder, removed after


def test_finetune_accepts_an_artifact_uri(server, trained_run, tiny_dataset, tmp_path):
    uri = f"runs:/{trained_run}/checkpoints/model_epoch_001.pth"
    output = run_cli("finetune", uri, str(tiny_dataset), "--epochs", "1", "--num-workers", "0",
                     "--output-dir", str(tmp_path), "--log-checkpoints", "none")
    run = server.get_run(run_id_of(output))
    assert run.data.tags["charseg.source_checkpoint"] == uri
    assert artifacts(server, run.info.run_id, "checkpoints") == []


def test_runs_started_in_one_process_get_names_of_their_own_and_leave_its_random_sequence(tmp_path, monkeypatch):
    """MLflow names a run from Python's `random`, which training seeds: two runs started after
    training from the same seed were both named glamorous-foal-105 (seed 4) before. (A server
    names a run itself; the embedded store names it in this process.)"""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    names, draws = [], []
    for _ in range(2):
        random.seed(4)  # the state a training run with seed 4 leaves behind
        with tracking.tracked_run("run-names") as run_id:
            draws.append(random.random())
        names.append(MlflowClient(uri).get_run(run_id).info.run_name)
    assert names[0] != names[1]
    random.seed(4)
    assert draws == [random.random()] * 2


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


def test_unknown_run_id_is_one_clear_error(server):
    result = CliRunner().invoke(cli, ["resume", "0" * 32])
    assert result.exit_code == 1
    assert f"run {'0' * 32} not found" in result.output


def test_run_without_checkpoint_is_one_clear_error(server):
    run = server.create_run(server.create_experiment("empty-run")).info.run_id
    result = CliRunner().invoke(cli, ["resume", run])
    assert result.exit_code == 1
    assert f"run {run} has no checkpoint under checkpoints/ (it has: none)" in result.output


def test_checkpoint_of_another_class_count_is_one_clear_error(server, tmp_path):
    run = server.create_run(server.create_experiment("ninety-one")).info.run_id
    state = ckpt.make_checkpoint(epoch=1, model={}, optimizer={}, scheduler={}, warmup={}, seed=1, rng={},
                                 config={}, model_spec={}, num_classes=91, metrics={}, best={})
    path = ckpt.save_checkpoint(state, tmp_path / "model_final.pth")
    server.log_artifact(run, str(path), "checkpoints")
    result = CliRunner().invoke(cli, ["resume", run])
    assert result.exit_code == 1 and "91-class model, charseg expects 2" in result.output


def test_non_finite_loss_marks_the_run_failed(server, tiny_dataset, tmp_path):
    result = CliRunner().invoke(cli, ["train", str(tiny_dataset), *LIGHT_ARGS, "--lr", "1e6", "--clip-grad-norm", "0",
                                      "--warmup-iters", "0", "--output-dir", str(tmp_path),
                                      "--experiment-name", "failing"])
    assert result.exit_code == 1 and "non-finite loss" in result.output
    exp = server.get_experiment_by_name("failing")
    run = server.search_runs([exp.experiment_id])[0]
    assert run.info.status == "FAILED"
    assert "non-finite loss" in run.data.tags["charseg.failure_reason"]


def stop_after_first_checkpoint(mlflow_server: str, dataset: Path, out: Path, experiment: str, log_path: Path,
                                sig: int) -> subprocess.Popen:
    """A 50-epoch `charseg train` process, sent `sig` once epoch 1's checkpoint exists; returns it ended."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server}
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "charseg", "train", str(dataset), *LIGHT_ARGS,
                                 "--epochs", "50", "--output-dir", str(out), "--experiment-name", experiment],
                                env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while not (out / "model_epoch_001.pth").exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(log_path.read_text()[-3000:])
            time.sleep(0.2)
        proc.send_signal(sig)
        proc.wait(timeout=120)
    return proc


def test_ctrl_c_ends_the_run_killed_with_a_complete_checkpoint(mlflow_server, tiny_dataset, tmp_path):
    log_path = tmp_path.parent / f"{tmp_path.name}-train.log"
    proc = stop_after_first_checkpoint(mlflow_server, tiny_dataset, tmp_path, "interrupted", log_path, signal.SIGINT)
    assert proc.returncode != 0, log_path.read_text()[-3000:]
    client = MlflowClient(mlflow_server)
    run = client.search_runs([client.get_experiment_by_name("interrupted").experiment_id])[0]
    assert run.info.status == "KILLED"
    latest = ckpt.find_latest(tmp_path)
    assert latest is not None and ckpt.load_checkpoint(latest)["epoch"] >= 1
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_full_disk_is_one_line_and_a_failed_run_with_earlier_checkpoints_intact(server, tiny_dataset, tmp_path,
                                                                                  monkeypatch):
    """Disk full during epoch 2's write (torch.save's own error) and before epoch 3 (too little
    free space to start it): one line naming the file and the sizes, the run FAILED with it."""
    from collections import namedtuple

    real_save, saves = ckpt.torch.save, []

    def save_until_full(obj, f, *args, **kwargs):
        saves.append(1)
        if len(saves) == 2:  # epoch 2's checkpoint
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 8384 vs 8272")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(ckpt.torch, "save", save_until_full)
    result = CliRunner().invoke(cli, ["train", str(tiny_dataset), *LIGHT_ARGS, "--epochs", "3", "--output-dir",
                                      str(tmp_path), "--experiment-name", "disk-full"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"no space left on device writing {tmp_path / 'model_epoch_002.pth'}: " in result.output
    assert "GB free, a checkpoint needs about" in result.output and "pass --output-dir elsewhere" in result.output
    assert ckpt.load_checkpoint(tmp_path / "model_epoch_001.pth")["epoch"] == 1
    assert not list(tmp_path.glob(".*.tmp")) and not (tmp_path / "model_epoch_002.pth").exists()
    run = server.search_runs([server.get_experiment_by_name("disk-full").experiment_id])[0]
    assert run.info.status == "FAILED"
    assert run.data.tags["charseg.failure_reason"].startswith("no space left on device writing")

    monkeypatch.setattr(ckpt.torch, "save", real_save)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda path: usage(10**12, 10**12 - 1000, 1000))
    result = CliRunner().invoke(cli, ["resume", str(tmp_path / "model_epoch_001.pth"), "--epochs", "3"])
    assert result.exit_code == 1 and "0.00 GB free" in result.output
    assert f"writing {tmp_path / 'model_epoch_002.pth'}" in result.output
    assert "epoch 2/3 finished" not in result.output  # refused before training epoch 2, not after


def test_resume_from_the_file_of_a_killed_run_links_it_and_ends_it_killed(mlflow_server, tiny_dataset, tmp_path,
                                                                       monkeypatch):
    """SIGKILL never ends a run: the resume (from a file, which names its run) ends the source
    KILLED at its last activity, points it at the resuming run and links back to it."""
    out = tmp_path / "run"
    proc = stop_after_first_checkpoint(mlflow_server, tiny_dataset, out, "sigkilled", tmp_path / "train.log",
                                       signal.SIGKILL)
    client = MlflowClient(mlflow_server)
    source = client.search_runs([client.get_experiment_by_name("sigkilled").experiment_id])[0]
    assert source.info.status == "RUNNING" and source.info.end_time is None
    assert source.data.tags["charseg.writer"].startswith(f"PID {proc.pid} on ")
    latest = ckpt.find_latest(out)
    assert ckpt.load_checkpoint(latest)["run_id"] == source.info.run_id

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    before = time.time() * 1000
    resumed = run_id_of(run_cli("resume", str(latest), "--epochs", str(ckpt.load_checkpoint(latest)["epoch"] + 1),
                                "--experiment-name", "sigkilled"))
    source = client.get_run(source.info.run_id)
    assert source.info.status == "KILLED"
    assert source.info.end_time <= before  # its last activity, not the time of the resume
    assert source.data.tags["charseg.resumed_by"] == resumed
    assert client.get_run(resumed).data.tags["charseg.source_run_id"] == source.info.run_id


def test_a_running_source_on_another_host_is_closed_only_when_silent(server):
    experiment = server.create_experiment("elsewhere")
    hours_ago = int(time.time() * 1000) - 2 * 3600 * 1000
    silent = server.create_run(experiment, start_time=hours_ago, tags={"charseg.writer": "PID 1 on gone-host into /x"})
    busy = server.create_run(experiment, start_time=hours_ago, tags={"charseg.writer": "PID 1 on busy-host into /y"})
    server.log_metric(busy.info.run_id, "train_step/loss", 1.0, step=7)
    assert tracking.close_abandoned_run(silent.info.run_id, "r1")
    assert not tracking.close_abandoned_run(busy.info.run_id, "r2")
    assert server.get_run(silent.info.run_id).info.status == "KILLED"
    assert server.get_run(silent.info.run_id).info.end_time == hours_ago
    assert server.get_run(busy.info.run_id).info.status == "RUNNING"
    assert not tracking.close_abandoned_run(silent.info.run_id, "r3")  # ended runs are left alone


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
    generate_dataset(data, num_images=6, width=128, height=128, chars_per_image=(3, 6), seed=4)
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
    args = ["train", str(data), "--weights", "none", "--backbone", "resnet18", "--min-size", "128", "--max-size", "128",
            "--num-workers", "0", "--roi-samples", "32", "--rpn-proposals-train", "100", "--warmup-iters", "2",
            "--log-every", "1", "--val-fraction", "0.2", "--epochs", "8", "--log-checkpoints", "all",
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
        stop_service(proc)
        wait_for(lambda: "stopped answering" in log_path.read_text(), "failover warning")
        wait_for(lambda: (out / "model_epoch_004.pth").exists(), "epoch 4 while the server is down")
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
        assert len(names) == 10  # 8 epochs, best.pth, model_final.pth
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
                                        "--epochs", "3", "--output-dir", str(out), "--log-checkpoints", "all",
                                        "--experiment-name", "away", "--register-as", "away-model",
                                        "--fpn-channels", "32"],  # smaller checkpoints to upload
                                       env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 180
        while not (out / "model_epoch_001.pth").exists():
            assert trainer.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.1)
        with paused(trainer):  # the server is gone before epochs 2 and 3
            stop_service(proc)
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
        assert steps(client, run.info.run_id, "train_epoch/loss") == [1, 2, 3]
        assert artifacts(client, run.info.run_id, "checkpoints") == [
            "model_epoch_001.pth", "model_epoch_002.pth", "model_epoch_003.pth", "model_final.pth"]
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


def test_environment_sets_for_a_block_and_restores_what_was_there(monkeypatch):
    from charseg.tracking.environment import environment

    monkeypatch.setenv("CHARSEG_KEPT", "before")
    monkeypatch.delenv("CHARSEG_SET", raising=False)
    with environment("CHARSEG_KEPT", CHARSEG_SET="1"):
        assert os.environ["CHARSEG_SET"] == "1"
        os.environ["CHARSEG_KEPT"] = "changed in the block"
    assert os.environ["CHARSEG_KEPT"] == "before" and "CHARSEG_SET" not in os.environ
    with pytest.raises(RuntimeError), environment(CHARSEG_KEPT=None):
        assert "CHARSEG_KEPT" not in os.environ
        raise RuntimeError
    assert os.environ["CHARSEG_KEPT"] == "before"
