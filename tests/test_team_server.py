"""The team deployment of deploy/: a real PostgreSQL, an S3 server and `mlflow server` with
MLflow's basic-auth app in front of both; users train, resume by run ID, fine-tune and register
through it, others cannot read their experiments; a deleted run is collected and brought back
from the backups; the stack starts again on its own data."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from charseg.tracking.environment import environment

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "deploy"))
import local_stack  # noqa: E402  (deploy/ is a folder of recipes, not a package)
import team_users  # noqa: E402
from conftest import LIGHT, cli_args  # noqa: E402

USERS = {"alice": "alice-pw-7341-x", "bob": "bob-pw-2210-xyz"}  # MLflow wants 12 characters or more

# LIGHT, validated.
ARGS = [*cli_args({**{k: v for k, v in LIGHT.items() if k not in ("batch_size", "rpn_proposals_test")},
                   "val_fraction": 0.25}), "--no-system-metrics", "--experiment-name", "team"]

# One worker runs this module: the stack (PostgreSQL, S3, mlflow server) starts once, not once per worker.
pytestmark = [pytest.mark.server, pytest.mark.slow, pytest.mark.xdist_group("team-stack"),
              pytest.mark.skipif(local_stack.postgres_bin() is None,
                                 reason="PostgreSQL is not installed (apt-get install postgresql): no initdb/pg_ctl")]


def as_user(user: str, password: str | None = None):
    """MLFLOW_TRACKING_USERNAME/PASSWORD of USER in this process for the block."""
    return environment(MLFLOW_TRACKING_USERNAME=user, MLFLOW_TRACKING_PASSWORD=password or USERS[user])


@pytest.fixture(scope="session")  # once per pytest-xdist worker
def stack():
    # Not under pytest's tmp folders: they are private to this user and PostgreSQL runs as `postgres`.
    root = Path(tempfile.mkdtemp(prefix="charseg-team-stack-"))
    root.chmod(0o755)
    running = local_stack.Stack(root / "stack")
    try:
        running.start()
        with as_user(local_stack.ADMIN, running.admin_password):
            for user, password in USERS.items():
                team_users.add_user(running.tracking_uri, user, password)
        yield running
    finally:
        running.stop()
        shutil.rmtree(root, ignore_errors=True)


def _python(stack, *args: str, user: str = "alice", password: str | None = None, ok: bool = True) -> str:
    """Run python with ARGS as USER, a client of the team server; its stdout (its stderr too when not OK)."""
    # A client needs the server's URI and its user only: no database, no S3 credentials (the artifact proxy).
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_S3"))}
    env.update({"MLFLOW_TRACKING_URI": stack.tracking_uri, "MLFLOW_TRACKING_USERNAME": user,
                "MLFLOW_TRACKING_PASSWORD": password or USERS[user]})
    started = time.monotonic()
    done = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=300)
    assert (done.returncode == 0) == ok, done.stdout[-2000:] + done.stderr[-3000:]
    print(f"{time.monotonic() - started:.1f} s: {' '.join(args[:3])}")
    return done.stdout if ok else done.stdout + done.stderr


def _charseg(stack, *args: str, **user) -> str:
    return _python(stack, "-m", "charseg", *args, **user)


def _run_id(output: str) -> str:
    return output.split("MLflow run ")[1].split()[0]


def test_train_resume_finetune_register_through_postgres_and_s3(stack, tiny_dataset, tmp_path):
    first = _run_id(_charseg(stack, "train", str(tiny_dataset), *ARGS, "--epochs", "2",
                             "--output-dir", str(tmp_path / "train"), "--register-as", "charseg-team"))
    resumed_out = _charseg(stack, "resume", first, "--epochs", "3", "--output-dir", str(tmp_path / "resume"),
                           "--experiment-name", "team", "--no-system-metrics")
    second = _run_id(resumed_out)
    third = _run_id(_charseg(stack, "finetune", "", str(tiny_dataset), "--run-id", second, "--epochs", "1",
                             "--output-dir", str(tmp_path / "finetune"), "--experiment-name", "team",
                             "--no-system-metrics"))

    with as_user("alice"):
        _check_alices_runs(stack, tmp_path, first, second, third)
    _check_access(stack, tiny_dataset, tmp_path)


def _check_alices_runs(stack, tmp_path, first, second, third):
    client = MlflowClient(stack.tracking_uri)
    runs = {r.info.run_id: r for r in client.search_runs([client.get_experiment_by_name("team").experiment_id])}
    assert set(runs) == {first, second, third}
    assert all(r.info.status == "FINISHED" for r in runs.values())
    assert runs[second].data.tags["charseg.source_run_id"] == first
    assert runs[third].data.tags["charseg.mode"] == "finetune"
    version = client.get_model_version_by_alias("charseg-team", "champion")
    assert version.run_id == first

    # The checkpoints are in the bucket, byte for byte what each run wrote.
    objects = local_stack.bucket_objects(stack)
    for run_id, folder in ((first, "train"), (second, "resume"), (third, "finetune")):
        [key] = [k for k in objects if run_id in k and k.endswith("checkpoints/model_final.pth")]
        assert objects[key] == (tmp_path / folder / "model_final.pth").read_bytes(), key
    # The registered model downloads through the server (no S3 credentials: the artifact proxy),
    # as the serving machine gets it: the best checkpoint, byte for byte.
    fetched = Path(_python(stack, "-c", "import mlflow, sys; print(mlflow.artifacts.download_artifacts("
                                  "'models:/charseg-team@champion', dst_path=sys.argv[1]))", str(tmp_path / "m")).strip())
    [weights] = list(fetched.rglob("*.pth"))
    assert weights.read_bytes() == (tmp_path / "train" / "best.pth").read_bytes()

    # ... and the runs, params and metrics are in PostgreSQL.
    import psycopg

    with psycopg.connect(host="127.0.0.1", port=stack.pg_port, user="postgres", dbname=local_stack.DATABASE) as db:
        assert db.execute("SELECT count(*) FROM runs").fetchone()[0] == 3
        assert db.execute("SELECT value FROM params WHERE run_uuid = %s AND key = 'epochs'",
                          (second,)).fetchone()[0] == "3"
        assert db.execute("SELECT count(*) FROM metrics WHERE run_uuid = %s AND key = 'train_epoch/loss'",
                          (second,)).fetchone()[0] == 1  # epoch 3 only: the resume continued the numbering


def _check_access(stack, tiny_dataset, tmp_path):
    """Bob reads nothing of Alice's until granted; a wrong password is one line and no run."""
    team = MlflowClient(stack.tracking_uri).get_experiment_by_name  # as whom: the env of each call
    with as_user("alice"):
        experiment_id = team("team").experiment_id
    with as_user("bob"), pytest.raises(MlflowException, match="403|PERMISSION_DENIED"):
        MlflowClient(stack.tracking_uri).get_experiment(experiment_id)
    denied = _charseg(stack, "evaluate", str(tiny_dataset), "--model", str(tmp_path / "train"), "--experiment-name",
                      "team", "--out", str(tmp_path / "m.json"), user="bob", ok=False)
    assert "has no permission" in denied and "Traceback" not in denied, denied
    refused = _charseg(stack, "train", str(tiny_dataset), *ARGS, "--epochs", "1", "--output-dir",
                       str(tmp_path / "refused"), password="not-alices", ok=False)
    assert "refused the credentials of user 'alice'" in refused and "Traceback" not in refused, refused
    assert not (tmp_path / "refused" / "offline-tracking").exists()  # a refusal is no server away: no failover
    with as_user(local_stack.ADMIN, stack.admin_password):
        team_users.grant(stack.tracking_uri, "bob", "experiment", "team", "READ")
    with as_user("bob"):
        assert MlflowClient(stack.tracking_uri).get_experiment(experiment_id).name == "team"


def test_a_collected_run_comes_back_from_the_backups_and_the_stack_restarts_on_its_data(stack, tiny_dataset,
                                                                                        tmp_path):
    run_id = _run_id(_charseg(stack, "train", str(tiny_dataset), *ARGS, "--epochs", "1", "--experiment-name", "ops",
                              "--output-dir", str(tmp_path / "run")))
    written = (tmp_path / "run" / "model_final.pth").read_bytes()
    stack.backup(tmp_path / "backup")
    with as_user("alice"):
        MlflowClient(stack.tracking_uri).delete_run(run_id)
    # The server's admin collects deleted runs: rows from PostgreSQL, artifacts through the proxy.
    env = {**stack.server_env(), "MLFLOW_TRACKING_URI": stack.tracking_uri, "MLFLOW_TRACKING_USERNAME":
           local_stack.ADMIN, "MLFLOW_TRACKING_PASSWORD": stack.admin_password}
    done = subprocess.run([sys.executable, "-m", "mlflow", "gc", "--backend-store-uri", stack.backend_store_uri,
                           "--artifacts-destination", stack.artifacts_destination, "--run-ids", run_id],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    with stack.connect() as db:
        assert db.execute("SELECT count(*) FROM runs WHERE run_uuid = %s", (run_id,)).fetchone()[0] == 0
    assert not [key for key in local_stack.bucket_objects(stack) if run_id in key]

    # Back: the databases from pg_dump, the checkpoints from the bucket's versions.
    stack.restore(tmp_path / "backup")
    assert local_stack.undelete(stack, "") > 0
    with as_user("alice"):
        client = MlflowClient(stack.tracking_uri)
        client.restore_run(run_id)
        assert client.get_run(run_id).info.lifecycle_stage == "active"
        fetched = client.download_artifacts(run_id, "checkpoints/model_final.pth", str(tmp_path / "back"))
    assert Path(fetched).read_bytes() == written

    # Started again on its folder: the same runs, users and checkpoints.
    stack.stop()
    stack.start()
    with as_user("alice"):
        fetched = MlflowClient(stack.tracking_uri).download_artifacts(run_id, "checkpoints/model_final.pth",
                                                                       str(tmp_path / "again"))
    assert Path(fetched).read_bytes() == written
