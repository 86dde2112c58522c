"""The team deployment of deploy/: a real PostgreSQL, an S3 server and `mlflow server` in front of
both; train, resume by run ID, fine-tune and register through it, as users of a team server do."""

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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "deploy"))
import local_stack  # noqa: E402  (deploy/ is a folder of recipes, not a package)
from conftest import LIGHT, cli_args  # noqa: E402

# LIGHT, validated, with checkpoints of 0.1 GB, not 0.25, through S3.
ARGS = [*cli_args({**{k: v for k, v in LIGHT.items() if k not in ("batch_size", "rpn_proposals_test")},
                   "val_fraction": 0.25, "fpn_channels": 32}), "--no-system-metrics", "--experiment-name", "team"]

pytestmark = [pytest.mark.server, pytest.mark.slow,
              pytest.mark.skipif(local_stack.postgres_bin() is None,
                                 reason="PostgreSQL is not installed (apt-get install postgresql): no initdb/pg_ctl")]


@pytest.fixture(scope="module")
def stack():
    # Not under pytest's tmp folders: they are private to this user and PostgreSQL runs as `postgres`.
    root = Path(tempfile.mkdtemp(prefix="charseg-team-stack-"))
    root.chmod(0o755)
    running = local_stack.Stack(root / "stack")
    try:
        yield running.start()
    finally:
        running.stop()
        shutil.rmtree(root, ignore_errors=True)


def _python(stack, *args: str) -> str:
    """Run python with ARGS as a client of the team server; its stdout."""
    # A client needs the server's URI only: no database, no S3 credentials (the artifact proxy).
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_S3"))}
    env["MLFLOW_TRACKING_URI"] = stack.tracking_uri
    started = time.monotonic()
    done = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    print(f"{time.monotonic() - started:.1f} s: {' '.join(args[:3])}")
    return done.stdout


def _charseg(stack, *args: str) -> str:
    return _python(stack, "-m", "charseg", *args)


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
