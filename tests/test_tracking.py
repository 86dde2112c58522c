"""MLflow tracking against a real `mlflow server` (sqlite backend, artifact proxy) on 127.0.0.1."""

from __future__ import annotations

import os
import random
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
from charseg.tracking.environment import environment

# One worker runs this module: its trained_run fixture trains once, not once per worker.
pytestmark = [pytest.mark.server, pytest.mark.xdist_group("tracking")]


def run_id_of(output: str) -> str:
    return output.split("MLflow run ")[1].split()[0]


@pytest.fixture(scope="session")  # once per pytest-xdist worker
def trained_run(mlflow_server, tiny_dataset, tmp_path_factory):
    """One 2-epoch training run over HTTP with every checkpoint logged; shared by the tests below."""
    out = tmp_path_factory.mktemp("trained")
    with environment("MLFLOW_EXPERIMENT_ID", MLFLOW_TRACKING_URI=mlflow_server,
                     MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL="1"):
        output = run_cli("train", str(tiny_dataset), *LIGHT_ARGS, "--epochs", "2", "--output-dir", str(out),
                         "--log-checkpoints", "all", "--experiment-name", "tracking-tests")
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
                     "--num-workers", "0", "--output-dir", str(tmp_path), "--replay-dir", str(tiny_dataset),
                     "--replay-pages", "2")
    run = server.get_run(run_id_of(output))
    # The replayed pages are a dataset input of their own, listed as an artifact.
    assert run.data.params["data.replay_images"] == "2" and "replay" in datasets(server, run.info.run_id)
    assert "replay_images.txt" in artifacts(server, run.info.run_id, "data")
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


def test_sigterm_ends_the_run_killed_at_once_with_one_line_and_exit_143(mlflow_server, tiny_dataset, tmp_path):
    """What `timeout`, SLURM and Kubernetes send: the checkpoint being written completes, the run
    is KILLED with the reason right away (not left RUNNING for a later resume to close), one
    line says so, and the exit status is 128 + 15."""
    log_path = tmp_path.parent / f"{tmp_path.name}-train.log"
    proc = stop_after_first_checkpoint(mlflow_server, tiny_dataset, tmp_path, "terminated", log_path, signal.SIGTERM)
    output = log_path.read_text()
    assert proc.returncode == 143, output[-3000:]
    assert "Traceback" not in output
    assert [line for line in output.splitlines() if line.startswith("Stopped:")] == [
        "Stopped: stopped by SIGTERM; a training run ends KILLED with its last checkpoint complete (`charseg resume` "
        "continues it)"]
    client = MlflowClient(mlflow_server)
    run = client.search_runs([client.get_experiment_by_name("terminated").experiment_id])[0]
    assert run.info.status == "KILLED"
    assert run.data.tags["charseg.failure_reason"] == "stopped by SIGTERM; the last checkpoint is complete"
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
