"""Multi-process training under torchrun (gloo on this CPU): the same run as one process."""

from __future__ import annotations

import os
import textwrap

import pytest
import torch
from conftest import DDP_ARGS, TORCHRUN, run_charseg
from mlflow import MlflowClient

from charseg.data.generate import generate_dataset
from charseg.data.loading import EpochShuffleSampler

# Two processes sum gradients in another order than one: the first epoch's steps (updates
# included) agree to float32 rounding; later, a rounding difference can flip a discrete choice
# (which proposals survive top-k and NMS, which are sampled as positives) and the runs drift apart
# like two runs on different hardware. A flip moves a small component most: under AVX2 kernels
# (ATEN_CPU_CAPABILITY=avx2) the single process's second-epoch loss_box_reg was 0.156 against
# the two processes' 0.177, their total loss 2.655 against 2.682. So the second epoch is compared
# by its total loss only.
FIRST_EPOCH_RTOL = 1e-5
LATER_EPOCH_RTOL = 5e-2


def test_shards_of_all_processes_make_the_single_process_batches():
    for size, world, batch in ((8, 2, 2), (11, 2, 2), (7, 3, 1), (2, 4, 1)):
        single = [i for i, _ in EpochShuffleSampler(size, 5)]
        shards = [[i for i, _ in EpochShuffleSampler(size, 5, rank, world)] for rank in range(world)]
        assert len({len(s) for s in shards}) == 1, "every process takes the same number of steps"
        padded = single + (single * world)[:len(shards[0]) * world - size]  # DistributedSampler's padding
        for step in range(len(shards[0]) // batch):
            together = sorted(i for s in shards for i in s[step * batch:(step + 1) * batch])
            assert together == sorted(padded[step * batch * world:(step + 1) * batch * world])


def _epoch_losses(client: MlflowClient, run_id: str) -> dict[str, list[float]]:
    names = ("loss", "loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg")
    return {n: [m.value for m in sorted(client.get_metric_history(run_id, f"train_epoch/{n}"), key=lambda m: m.step)]
            for n in names}


@pytest.fixture()
def env(tmp_path) -> dict:
    return {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "OMP_NUM_THREADS": "1"}


@pytest.mark.server  # torchrun
def test_two_gloo_processes_train_the_run_one_process_trains(tmp_path, env):
    data = tmp_path / "data"
    generate_dataset(data, num_images=10, width=64, height=64, chars_per_image=(2, 4), font_size=(14, 24), seed=3)
    one = run_charseg("train", str(data), *DDP_ARGS, "--batch-size", "4", "--output-dir", str(tmp_path / "one"), env=env)
    assert one.returncode == 0, one.stderr[-3000:]
    two = run_charseg("train", str(data), *DDP_ARGS, "--batch-size", "2", "--output-dir", str(tmp_path / "two"), env=env,
                   launcher=[*TORCHRUN, "-m", "charseg"])
    assert two.returncode == 0, two.stderr[-3000:]
    assert "x 2 processes (global batch 4)" in two.stderr
    assert "weights identical in all 2 processes" in two.stderr

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name("ddp").experiment_id], order_by=["start_time ASC"])
    assert len(runs) == 2, "one MLflow run per job: rank 1 never touches the tracking server"
    single, parallel = runs
    assert parallel.data.params["world_size"] == "2" and single.data.params["world_size"] == "1"
    assert parallel.info.status == "FINISHED"
    a, b = _epoch_losses(client, single.info.run_id), _epoch_losses(client, parallel.info.run_id)
    for name in a:
        assert len(a[name]) == len(b[name]) == 2
        assert b[name][0] == pytest.approx(a[name][0], rel=FIRST_EPOCH_RTOL), name
    assert b["loss"][1] == pytest.approx(a["loss"][1], rel=LATER_EPOCH_RTOL)
    # rank 0 alone validated and wrote every file
    assert {p.name for p in (tmp_path / "two").glob("*.pth")} == {
        "model_epoch_001.pth", "model_epoch_002.pth", "model_final.pth", "best.pth"}
    assert client.get_metric_history(parallel.info.run_id, "val/segm_AP")

    # resume the 2-process checkpoint of epoch 1 in one process: the per-process batch is kept
    resumed = run_charseg("resume", str(tmp_path / "two" / "model_epoch_001.pth"), "--output-dir",
                       str(tmp_path / "resumed"), "--experiment-name", "ddp", env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "training on cpu: epochs 2-2, 4 steps per epoch" in resumed.stderr
    state = torch.load(tmp_path / "resumed" / "model_final.pth", weights_only=True)
    assert state["epoch"] == 2 and state["config"]["world_size"] == 1


@pytest.mark.server  # torchrun
def test_a_failing_rank_fails_the_job_with_its_error(tmp_path, env):
    data = tmp_path / "data"
    generate_dataset(data, num_images=8, width=64, height=64, chars_per_image=(2, 4), font_size=(14, 24), seed=3)
    launcher = tmp_path / "launch_failing_rank.py"
    launcher.write_text(textwrap.dedent("""
        import os, sys
        from charseg import cli
        from charseg.training import loop
        if os.environ["RANK"] == "1":
            original = loop.train_one_epoch
            def fail_in_epoch_2(model, optimizer, loader, device, epoch, **kwargs):
                if epoch == 2:
                    raise OSError("the disk under rank 1 went away")
                return original(model, optimizer, loader, device, epoch, **kwargs)
            loop.train_one_epoch = fail_in_epoch_2
        sys.argv[0] = "charseg"
        cli.main()
    """))
    out = tmp_path / "out"
    job = run_charseg("train", str(data), *DDP_ARGS, "--batch-size", "2", "--output-dir", str(out), env=env,
                   launcher=[*TORCHRUN, str(launcher)], timeout=240)
    assert job.returncode != 0
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    [run] = client.search_runs([client.get_experiment_by_name("ddp").experiment_id])
    assert run.info.status == "FAILED"
    assert run.data.tags["charseg.failure_reason"] == "rank 1 of 2 failed: the disk under rank 1 went away"
    assert (out / "model_epoch_001.pth").is_file() and not (out / "model_epoch_002.pth").exists()


@pytest.mark.server  # torchrun
def test_sync_batchnorm_on_cpu_processes_is_one_clear_error(tmp_path, env):
    data = tmp_path / "data"
    generate_dataset(data, num_images=4, width=64, height=64, chars_per_image=(2, 4), seed=3)
    args = [a if a != "group" else "batch" for a in DDP_ARGS]  # live BatchNorm
    job = run_charseg("train", str(data), *args, "--batch-size", "1", "--sync-batchnorm", "--output-dir",
                   str(tmp_path / "out"), env=env, launcher=[*TORCHRUN, "-m", "charseg"], timeout=240)
    assert job.returncode != 0
    assert "Error: --sync-batchnorm needs GPUs" in job.stderr
    assert "charseg/runner.py" not in job.stderr  # each rank says one line; the traceback is torchrun's own


@pytest.mark.server  # torchrun
def test_a_stopping_rule_ends_every_process_of_a_torchrun_job(tmp_path, env):
    """Rank 0 decides (it alone validates); rank 1 stops with it instead of waiting for an epoch
    that never comes. An LR that moves nothing keeps the best at epoch 1."""
    data = tmp_path / "data"
    generate_dataset(data, num_images=6, width=64, height=64, chars_per_image=(2, 4), font_size=(14, 24), seed=3)
    job = run_charseg("train", str(data), *DDP_ARGS, "--batch-size", "1", "--epochs", "4", "--lr", "1e-12",
                      "--early-stop-patience", "1", "--output-dir", str(tmp_path / "out"), env=env,
                      launcher=[*TORCHRUN, "-m", "charseg"], timeout=240)
    assert job.returncode == 0, job.stderr[-3000:]
    assert "stopping after epoch 2 of 4: no better segm_AP for 1 epoch (" in job.stderr
    assert "weights identical in all 2 processes" in job.stderr
    state = torch.load(tmp_path / "out" / "model_final.pth", weights_only=True)
    assert state["epoch"] == 2 and state["stopped"]["reason"] == "early_stop"


@pytest.mark.server  # torchrun
def test_sigterm_to_the_launcher_stops_the_job_in_two_lines_with_the_run_killed(tmp_path, env):
    """SIGTERM to the launcher MLproject runs (charseg.cli.torchrun: torchrun itself) reaches
    every process: rank 0 ends the run KILLED at once, one line each from it and the launcher,
    no traceback, exit 143."""
    import signal
    import subprocess
    import sys
    import time

    data = tmp_path / "data"
    out = tmp_path / "out"
    generate_dataset(data, num_images=6, width=64, height=64, chars_per_image=(2, 4), font_size=(14, 24), seed=3)
    launcher = [sys.executable, "-m", "charseg.cli.torchrun", *TORCHRUN[3:], "-m", "charseg"]
    with open(tmp_path / "job.log", "w") as log:
        job = subprocess.Popen([*launcher, "train", str(data), *DDP_ARGS, "--batch-size", "1", "--epochs", "50",
                                "--output-dir", str(out), "--experiment-name", "stopped"], env=env, stdout=log,
                               stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while not (out / "model_epoch_001.pth").exists():
            assert job.poll() is None and time.monotonic() < deadline, (tmp_path / "job.log").read_text()[-3000:]
            time.sleep(0.2)
        job.send_signal(signal.SIGTERM)
        assert job.wait(timeout=60) == 143, (tmp_path / "job.log").read_text()[-3000:]
    output = (tmp_path / "job.log").read_text()
    assert "Traceback" not in output, output[-3000:]
    assert output.count("Stopped: stopped by SIGTERM") == 1
    assert "torchrun: stopped by SIGTERM" in output
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    [run] = client.search_runs([client.get_experiment_by_name("stopped").experiment_id])
    assert run.info.status == "KILLED"
    assert run.data.tags["charseg.failure_reason"] == "stopped by SIGTERM; the last checkpoint is complete"
