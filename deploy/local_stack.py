"""A team tracking server on one machine: PostgreSQL (runs, params, metrics, registry), an
S3-compatible object store (checkpoints and other artifacts) and `mlflow server` in front of
both, serving artifacts through its proxy so clients need no S3 credentials.

    python deploy/local_stack.py STACK_DIR [--mlflow-port 5000]

starts all three in STACK_DIR (a new folder), prints the MLFLOW_TRACKING_URI for clients and
runs until Ctrl-C, which stops them. The S3 server here is moto's (an in-memory S3 for trying
the recipe and for the tests); in production point MLFLOW_S3_ENDPOINT_URL and the AWS_*
variables at MinIO, Ceph or AWS S3 and the backend store at your PostgreSQL (deploy/README.md).
The PostgreSQL binaries come from the Debian/Ubuntu package (postgresql-15, found under
/usr/lib/postgresql/*/bin or on PATH); as root, the database runs as the `postgres` user, as
PostgreSQL requires.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

BUCKET = "charseg-artifacts"
DATABASE = "mlflow"
# The S3 credentials the moto server accepts (any); a real store has its own.
S3_ENV = {"AWS_ACCESS_KEY_ID": "charseg-local", "AWS_SECRET_ACCESS_KEY": "charseg-local",
          "AWS_DEFAULT_REGION": "us-east-1"}
LOOPBACK = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def postgres_bin() -> Path | None:
    """The folder of initdb and pg_ctl: on PATH, else the newest /usr/lib/postgresql/*/bin."""
    on_path = shutil.which("pg_ctl")
    if on_path:
        return Path(on_path).resolve().parent  # /usr/local/bin/pg_ctl may link to the package's
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(p.split("/")[4]))
    return Path(found[-1]).parent if found else None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_service(args: list[str], log_path: Path, **kwargs) -> subprocess.Popen:
    """Start a server in its own process group, output to a file (a full pipe would block it)."""
    return subprocess.Popen(args, stdout=open(log_path, "w"), stderr=subprocess.STDOUT, start_new_session=True,
                            **kwargs)


def wait_until_up(proc: subprocess.Popen, url: str, log_path: Path, seconds: float = 180) -> None:
    """Poll `url` until it answers; fail with the server's log if it dies or takes too long."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            with LOOPBACK.open(url, timeout=2):
                return
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not come up; its log {log_path}:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.5)


def stop_service(proc: subprocess.Popen, grace: float = 20) -> None:
    """Stop the server and every process it started (mlflow spawns uvicorn and workers): SIGTERM,
    then SIGKILL after `grace` seconds (uvicorn waits that long for a client that holds a
    connection open); grace 0 kills at once, as a machine that is lost."""
    try:
        if not grace:
            raise subprocess.TimeoutExpired(proc.args, 0)
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _as_database_user(args: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: run its tools as `postgres` then."""
    return ["runuser", "-u", "postgres", "--", *args] if os.geteuid() == 0 else args


def _run(args: list[str]) -> None:
    done = subprocess.run(args, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(args)} failed ({done.returncode}): {(done.stderr or done.stdout)[-2000:]}")


@dataclass
class Stack:
    """The three services of a team tracking server, started in `root`."""

    root: Path
    pg_port: int = 0
    s3_port: int = 0
    mlflow_port: int = 0
    processes: list[subprocess.Popen] = field(default_factory=list)

    @property
    def backend_store_uri(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.pg_port}/{DATABASE}"

    @property
    def s3_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    @property
    def tracking_uri(self) -> str:
        return f"http://127.0.0.1:{self.mlflow_port}"

    @property
    def artifacts_destination(self) -> str:
        return f"s3://{BUCKET}/mlflow"

    def start(self) -> "Stack":
        self.root.mkdir(parents=True, exist_ok=True)
        self.pg_port, self.s3_port = self.pg_port or free_port(), self.s3_port or free_port()
        self.mlflow_port = self.mlflow_port or free_port()
        self._start_postgres()
        self._start_s3()
        self._start_mlflow()
        return self

    def _start_postgres(self) -> None:
        binaries = postgres_bin()
        if binaries is None:
            raise RuntimeError("PostgreSQL is not installed (no pg_ctl on PATH or under /usr/lib/postgresql); "
                               "apt-get install postgresql")
        data = self.root / "postgres"
        data.mkdir()
        if os.geteuid() == 0:
            shutil.chown(data, "postgres", "postgres")
            os.chmod(self.root, 0o755)  # the postgres user must reach its folder
        _run(_as_database_user([str(binaries / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
                                "--encoding=UTF8"]))
        # trust on 127.0.0.1 only, for this local stack; a shared server uses passwords (README).
        _run(_as_database_user([str(binaries / "pg_ctl"), "-D", str(data), "-l", str(data / "server.log"), "-w", "-o",
                                f"-p {self.pg_port} -k {data} -c listen_addresses=127.0.0.1", "start"]))
        import psycopg

        with psycopg.connect(host="127.0.0.1", port=self.pg_port, user="postgres", dbname="postgres",
                             autocommit=True) as connection:
            connection.execute(f"CREATE DATABASE {DATABASE}")

    def _start_s3(self) -> None:
        self._start([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.s3_port)], "s3.log",
                    f"{self.s3_endpoint}/moto-api/")
        import boto3

        boto3.client("s3", endpoint_url=self.s3_endpoint, **_boto_credentials()).create_bucket(Bucket=BUCKET)

    def server_env(self) -> dict[str, str]:
        """What `mlflow server` needs to reach the object store."""
        return {**os.environ, **S3_ENV, "MLFLOW_S3_ENDPOINT_URL": self.s3_endpoint}

    def _start_mlflow(self) -> None:
        self._start([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.mlflow_port),
                     "--backend-store-uri", self.backend_store_uri, "--artifacts-destination",
                     self.artifacts_destination, "--serve-artifacts", "--workers", "2"], "mlflow-server.log",
                    f"{self.tracking_uri}/health", env=self.server_env(), cwd=self.root)

    def _start(self, args: list[str], log_name: str, url: str, **kwargs) -> None:
        """Start a service logging to ROOT/LOG_NAME and wait until URL answers."""
        log = self.root / log_name
        proc = start_service(args, log, **kwargs)
        self.processes.append(proc)
        wait_until_up(proc, url, log)

    def stop(self) -> None:
        for proc in reversed(self.processes):
            stop_service(proc)
        binaries = postgres_bin()
        if binaries and (self.root / "postgres" / "postmaster.pid").exists():
            subprocess.run(_as_database_user([str(binaries / "pg_ctl"), "-D", str(self.root / "postgres"), "-m",
                                              "fast", "-w", "stop"]), capture_output=True)


def _boto_credentials() -> dict[str, str]:
    return {"aws_access_key_id": S3_ENV["AWS_ACCESS_KEY_ID"], "aws_secret_access_key": S3_ENV["AWS_SECRET_ACCESS_KEY"],
            "region_name": S3_ENV["AWS_DEFAULT_REGION"]}


def bucket_objects(stack: Stack) -> dict[str, bytes]:
    """Every object in the stack's bucket: key -> bytes."""
    import boto3

    s3 = boto3.client("s3", endpoint_url=stack.s3_endpoint, **_boto_credentials())
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
            for o in page.get("Contents", [])]
    return {key: s3.get_object(Bucket=BUCKET, Key=key)["Body"].read() for key in keys}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stack_dir", type=Path, help="new folder for the database, logs and the server's cwd")
    parser.add_argument("--mlflow-port", type=int, default=5000, help="port of the tracking server (default 5000)")
    args = parser.parse_args()
    if args.stack_dir.exists() and any(args.stack_dir.iterdir()):
        parser.error(f"{args.stack_dir} is not empty; give a new folder")
    stack = Stack(args.stack_dir, mlflow_port=args.mlflow_port)
    try:
        stack.start()
        print(f"PostgreSQL   {stack.backend_store_uri}\nS3           {stack.s3_endpoint} bucket {BUCKET}\n"
              f"MLflow       {stack.tracking_uri} (artifacts proxied to {stack.artifacts_destination})\n\n"
              f"clients:     export MLFLOW_TRACKING_URI={stack.tracking_uri}\nCtrl-C stops all three.", flush=True)
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    finally:
        stack.stop()


if __name__ == "__main__":
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    main()
