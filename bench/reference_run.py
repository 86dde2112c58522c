"""What a refactoring must keep: one small run of every workflow, printed as numbers to diff.

    python bench/reference_run.py OUT.json     # on the code before a change, then after; diff

Trains 2 epochs with validation, resumes from epoch 1 to 2 (into another folder), fine-tunes
1 epoch, evaluates, predicts, registers and serves one request through a real
`mlflow models serve`, all through the `charseg` command in fresh processes on tiny generated
pages. Writes every logged loss and metric (MLflow's history), a digest of each
checkpoint's weights, the predict CSVs and the served answer. Two runs of the same code give
the same file (CPU, fp32, no loader workers); so must the code after a refactoring. A script,
not a test: about two minutes on 2 cores, run it alone.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "deploy"))
from local_stack import LOOPBACK, free_port, start_service, stop_service, wait_until_up  # noqa: E402

LIGHT = ["--weights", "none", "--backbone", "resnet18", "--min-size", "64", "--max-size", "64", "--num-workers", "0",
         "--roi-samples", "32", "--rpn-proposals-train", "100", "--rpn-proposals-test", "50", "--batch-size", "2",
         "--warmup-iters", "2", "--log-every", "1", "--val-fraction", "0.25", "--no-system-metrics",
         "--precision", "fp32"]


TIMINGS = ("seconds", "images_per_s")  # metrics that differ from run to run


def charseg(*args: str, env: dict) -> str:
    done = subprocess.run([sys.executable, "-m", "charseg", *args], env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"charseg {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
    return done.stdout


def weights_digest(path: Path) -> str:
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True)["model"]
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(state[name].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def run_record(uri: str, run_id: str) -> dict:
    """Every metric of a run with its history (step -> value), its params and charseg's tags."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    run = client.get_run(run_id)
    history = {key: [(m.step, round(m.value, 6)) for m in client.get_metric_history(run_id, key)]
               for key in sorted(run.data.metrics) if not key.startswith("system/") and not key.endswith(TIMINGS)}
    params = {k: v for k, v in run.data.params.items() if k not in ("output_dir", "data_dir", "init_checkpoint")
              and not k.startswith("data.")}
    tags = {k: v for k, v in run.data.tags.items() if k in ("charseg.mode", "charseg.precision",
                                                            "charseg.best_metric", "charseg.best_epoch")}
    return {"status": run.info.status, "metrics": history, "params": params, "tags": tags}


def run_id_of(output: str) -> str:
    return next(line.split()[2] for line in output.splitlines() if line.startswith("MLflow run "))


def serve_one(uri: str, image: Path, work: Path, env: dict) -> list:
    port = free_port()
    log = work / "serve.log"
    proc = start_service([sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/reference@champion",
                          "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)], log, env=env, cwd=work)
    try:
        wait_until_up(proc, f"http://127.0.0.1:{port}/ping", log, 180)
        body = json.dumps({"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(
            image.read_bytes()).decode()]]}, "params": {"score_threshold": 0.0}}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                         headers={"Content-Type": "application/json"})
        with LOOPBACK.open(request, timeout=120) as response:
            answer = json.loads(response.read())["predictions"]
    finally:
        stop_service(proc)
    return [{**row, "score": round(row["score"], 5), "box": [round(v, 3) for v in row["box"]]} for row in answer]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="JSON file to write")
    args = parser.parse_args()
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="charseg-reference-") as tmp:
        work = Path(tmp)
        uri = f"sqlite:///{work / 'mlflow.db'}"
        env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONPATH": str(ROOT),
               "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
        data = work / "data"
        charseg("generate", str(data), "--num-images", "8", "--size", "64", "--chars-per-image", "2-4",
                "--font-size", "14-24", "--seed", "3", env=env)
        record: dict = {}
        out = charseg("train", str(data), *LIGHT, "--epochs", "2", "--output-dir", str(work / "train"),
                      "--register-as", "reference", env=env)
        train_run = run_id_of(out)
        record["train"] = run_record(uri, train_run)
        record["train"]["weights"] = {p.name: weights_digest(p) for p in sorted((work / "train").glob("*.pth"))}
        out = charseg("resume", str(work / "train"), "--epoch", "1", "--epochs", "2", "--num-workers", "0",
                      "--output-dir", str(work / "resumed"), "--no-system-metrics", env=env)
        record["resume"] = run_record(uri, run_id_of(out))
        record["resume"]["weights"] = weights_digest(work / "resumed" / "model_final.pth")
        out = charseg("finetune", str(work / "train" / "model_final.pth"), str(data), "--epochs", "1",
                      "--num-workers", "0", "--output-dir", str(work / "finetuned"), "--no-system-metrics", env=env)
        record["finetune"] = run_record(uri, run_id_of(out))
        record["finetune"]["weights"] = weights_digest(work / "finetuned" / "model_final.pth")
        out = charseg("evaluate", str(data), "--model", str(work / "train"), "--precision", "fp32",
                      "--score-threshold", "0.05", "--out", str(work / "metrics.json"), env=env)
        record["evaluate"] = json.loads((work / "metrics.json").read_text())
        charseg("predict", str(data / "images"), "--model", str(work / "train" / "model_final.pth"),
                "--precision", "fp32", "--score-threshold", "0.05", "--out", str(work / "predicted"), env=env)
        record["predict"] = {p.name: p.read_text() for p in sorted((work / "predicted" / "annotations").glob("*.csv"))}
        from mlflow.tracking import MlflowClient

        version = MlflowClient(uri).get_model_version_by_alias("reference", "champion")
        record["register"] = {"version": version.version, "of_the_training_run": version.run_id == train_run}
        record["serve"] = serve_one(uri, data / "images" / "00001.png", work, env)
        text = json.dumps(record, indent=1, sort_keys=True).replace(str(work), "WORK")
    Path(args.out).write_text(text + "\n")
    print(f"wrote {args.out} in {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
