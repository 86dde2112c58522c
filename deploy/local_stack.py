"""A team tracking server on one machine: PostgreSQL (runs, params, metrics, registry), an
S3-compatible object store (checkpoints and other artifacts) and `mlflow server` in front of
both, serving artifacts through its proxy so clients need no S3 credentials.

    python deploy/local_stack.py STACK_DIR [--mlflow-port 5000] [--no-auth]

starts all three in STACK_DIR, prints the MLFLOW_TRACKING_URI for clients and runs until
Ctrl-C, which stops them; started again on the same folder it goes on with its data. The
server runs MLflow's basic-auth app (users and permissions in a second PostgreSQL database;
the admin's password generated into STACK_DIR/secrets, never a process argument). The S3
server here is moto's (in memory: the bucket is saved into STACK_DIR/s3-snapshot when the
stack stops and loaded when it starts); in production point MLFLOW_S3_ENDPOINT_URL and the
AWS_* variables at MinIO, Ceph or AWS S3 and the backend store at your PostgreSQL
(deploy/README.md).
The PostgreSQL binaries come from the Debian/Ubuntu package (postgresql-15, found under
/usr/lib/postgresql/*/bin or on PATH); as root, the database runs as the `postgres` user, as
PostgreSQL requires.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import secrets
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
AUTH_DATABASE = "mlflow_auth"  # the basic-auth app's users and permissions
ADMIN = "admin"
# Users get no access to what others made until it is granted; each user manages what they create.
DEFAULT_PERMISSION = "NO_PERMISSIONS"
AUTH_CACHE_SECONDS = 60
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


def start_service(args: list[str], log_path: Path, env: dict | None = None, **kwargs) -> subprocess.Popen:
    """Start a server in its own process group, output to a file (a full pipe would block it).
    An `mlflow server` starts without its job runner (MLflow's GenAI jobs; charseg has none),
    which is otherwise eight more Python processes, each importing MLflow as the server starts."""
    env = {**(os.environ if env is None else env), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    return subprocess.Popen(args, stdout=open(log_path, "w"), stderr=subprocess.STDOUT, start_new_session=True,
                            env=env, **kwargs)


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
    """The three services of a team tracking server, kept in `root`: a new folder, or one a
    stack ran in before (its database, bucket snapshot, secrets and ports are used again)."""

    root: Path
    pg_port: int = 0
    s3_port: int = 0
    mlflow_port: int = 0
    auth: bool = True
    processes: list[subprocess.Popen] = field(default_factory=list)

    @property
    def backend_store_uri(self) -> str:
        return self.database_uri(DATABASE)

    def database_uri(self, database: str) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.pg_port}/{database}"

    @property
    def s3_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    @property
    def tracking_uri(self) -> str:
        return f"http://127.0.0.1:{self.mlflow_port}"

    @property
    def artifacts_destination(self) -> str:
        return f"s3://{BUCKET}/mlflow"

    @property
    def admin_password(self) -> str:
        return self._secret("admin-password")

    def start(self) -> "Stack":
        self.root.mkdir(parents=True, exist_ok=True)
        saved = json.loads((self.root / "ports.json").read_text()) if (self.root / "ports.json").exists() else {}
        self.pg_port, self.s3_port = self.pg_port or free_port(), self.s3_port or free_port()
        self.mlflow_port = self.mlflow_port or saved.get("mlflow") or free_port()  # clients keep their URI
        (self.root / "ports.json").write_text(json.dumps({"mlflow": self.mlflow_port}))
        self._start_postgres()
        self._start_s3()
        self._start_mlflow()
        return self

    def _secret(self, name: str) -> str:
        """A random secret kept in ROOT/secrets/NAME (readable by this user only), made once."""
        folder = self.root / "secrets"
        folder.mkdir(mode=0o700, exist_ok=True)
        path = folder / name
        if not path.exists():
            path.touch(mode=0o600)
            path.write_text(secrets.token_urlsafe(24))
        return path.read_text().strip()

    def _start_postgres(self) -> None:
        binaries = postgres_bin()
        if binaries is None:
            raise RuntimeError("PostgreSQL is not installed (no pg_ctl on PATH or under /usr/lib/postgresql); "
                               "apt-get install postgresql")
        data = self.root / "postgres"
        if not (data / "PG_VERSION").exists():
            data.mkdir(exist_ok=True)
            if os.geteuid() == 0:
                shutil.chown(data, "postgres", "postgres")
                os.chmod(self.root, 0o755)  # the postgres user must reach its folder
            _run(_as_database_user([str(binaries / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
                                    "--encoding=UTF8"]))
        # trust on 127.0.0.1 only, for this local stack; a shared server uses passwords (README).
        _run(_as_database_user([str(binaries / "pg_ctl"), "-D", str(data), "-l", str(data / "server.log"), "-w", "-o",
                                f"-p {self.pg_port} -k {data} -c listen_addresses=127.0.0.1", "start"]))
        with self.connect("postgres") as connection:
            present = {row[0] for row in connection.execute("SELECT datname FROM pg_database")}
            for database in (DATABASE, AUTH_DATABASE):
                if database not in present:
                    connection.execute(f"CREATE DATABASE {database}")

    def connect(self, database: str = DATABASE):
        import psycopg

        return psycopg.connect(host="127.0.0.1", port=self.pg_port, user="postgres", dbname=database, autocommit=True)

    def _start_s3(self) -> None:
        self._start([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.s3_port)], "s3.log",
                    f"{self.s3_endpoint}/moto-api/")
        s3 = self.s3_client()
        s3.create_bucket(Bucket=BUCKET)
        # Every overwrite and delete keeps the object's earlier version: a deleted run's
        # checkpoints can be brought back (deploy/README.md, Backups).
        s3.put_bucket_versioning(Bucket=BUCKET, VersioningConfiguration={"Status": "Enabled"})
        snapshot = self.root / "s3-snapshot"
        for path in sorted(p for p in snapshot.rglob("*") if p.is_file()) if snapshot.is_dir() else []:
            s3.put_object(Bucket=BUCKET, Key=path.relative_to(snapshot).as_posix(), Body=path.read_bytes())

    def s3_client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.s3_endpoint, **_boto_credentials())

    def server_env(self) -> dict[str, str]:
        """What `mlflow server` needs: the object store's endpoint and credentials, and for the
        auth app its configuration and secrets (in the environment, not in `ps` output)."""
        env = {**os.environ, **S3_ENV, "MLFLOW_S3_ENDPOINT_URL": self.s3_endpoint}
        if self.auth:
            config = self.root / "basic_auth.ini"
            config.touch(mode=0o600)
            # A checked password is trusted for a minute per worker: each request otherwise re-hashes
            # it (PBKDF2), and a training run sends many; a changed password waits out that minute.
            config.write_text(f"[mlflow]\ndefault_permission = {DEFAULT_PERMISSION}\n"
                              f"database_uri = {self.database_uri(AUTH_DATABASE)}\nadmin_username = {ADMIN}\n"
                              f"auth_cache_ttl_seconds = {AUTH_CACHE_SECONDS}\n")
            env.update({"MLFLOW_AUTH_CONFIG_PATH": str(config), "MLFLOW_AUTH_ADMIN_PASSWORD": self.admin_password,
                        "MLFLOW_FLASK_SERVER_SECRET_KEY": self._secret("flask-secret-key")})
        return env

    def _start_mlflow(self) -> None:
        self._start([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.mlflow_port),
                     "--backend-store-uri", self.backend_store_uri, "--artifacts-destination",
                     self.artifacts_destination, "--serve-artifacts", "--workers", "2",
                     *(["--app-name", "basic-auth"] if self.auth else [])], "mlflow-server.log",
                    f"{self.tracking_uri}/health", env=self.server_env(), cwd=self.root)

    def _start(self, args: list[str], log_name: str, url: str, **kwargs) -> None:
        """Start a service logging to ROOT/LOG_NAME and wait until URL answers."""
        log = self.root / log_name
        proc = start_service(args, log, **kwargs)
        self.processes.append(proc)
        wait_until_up(proc, url, log)

    def backup(self, folder: Path) -> None:
        """pg_dump (custom format) of the tracking and the auth database into FOLDER."""
        folder.mkdir(parents=True, exist_ok=True)
        for database in (DATABASE, AUTH_DATABASE):
            with open(folder / f"{database}.dump", "wb") as out:
                done = subprocess.run(_as_database_user([str(postgres_bin() / "pg_dump"), "-h", "127.0.0.1", "-p",
                                                         str(self.pg_port), "-U", "postgres", "-Fc", database]),
                                      stdout=out, stderr=subprocess.PIPE, text=False)
            if done.returncode:
                raise RuntimeError(f"pg_dump {database} failed: {done.stderr.decode()[-2000:]}")

    def restore(self, folder: Path) -> None:
        """Put the databases back as FOLDER's backup has them: the tracking server stops, each
        database is emptied and restored (pg_restore --clean) in one transaction, the server
        starts again."""
        mlflow_server = self.processes.pop()
        stop_service(mlflow_server)
        for database in (DATABASE, AUTH_DATABASE):
            with open(folder / f"{database}.dump", "rb") as dump:
                done = subprocess.run(_as_database_user([
                    str(postgres_bin() / "pg_restore"), "-h", "127.0.0.1", "-p", str(self.pg_port), "-U", "postgres",
                    "--clean", "--if-exists", "--single-transaction", "-d", database]), stdin=dump, capture_output=True)
            if done.returncode:
                raise RuntimeError(f"pg_restore {database} failed: {done.stderr.decode()[-2000:]}")
        self._start_mlflow()

    def save_bucket(self) -> None:
        """The bucket's current objects into ROOT/s3-snapshot (moto keeps them in memory only)."""
        snapshot = self.root / "s3-snapshot"
        shutil.rmtree(snapshot, ignore_errors=True)
        for key, body in bucket_objects(self).items():
            path = snapshot / key
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(body)

    def stop(self) -> None:
        if len(self.processes) >= 2:  # the S3 server is up: keep its objects for the next start
            with contextlib.suppress(Exception):
                self.save_bucket()
        for proc in reversed(self.processes):
            stop_service(proc)
        self.processes.clear()
        binaries = postgres_bin()
        if binaries and (self.root / "postgres" / "postmaster.pid").exists():
            subprocess.run(_as_database_user([str(binaries / "pg_ctl"), "-D", str(self.root / "postgres"), "-m",
                                              "fast", "-w", "stop"]), capture_output=True)


def _boto_credentials() -> dict[str, str]:
    return {"aws_access_key_id": S3_ENV["AWS_ACCESS_KEY_ID"], "aws_secret_access_key": S3_ENV["AWS_SECRET_ACCESS_KEY"],
            "region_name": S3_ENV["AWS_DEFAULT_REGION"]}


def bucket_objects(stack: Stack) -> dict[str, bytes]:
    """Every object in the stack's bucket (its current versions): key -> bytes."""
    s3 = stack.s3_client()
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
            for o in page.get("Contents", [])]
    return {key: s3.get_object(Bucket=BUCKET, Key=key)["Body"].read() for key in keys}


def undelete(stack: Stack, prefix: str) -> int:
    """Bring back the objects under PREFIX that were deleted (their delete markers removed, so
    each one's last version is current again, as `aws s3api delete-object --version-id` does).
    Returns how many came back."""
    s3 = stack.s3_client()
    markers = [m for page in s3.get_paginator("list_object_versions").paginate(Bucket=BUCKET, Prefix=prefix)
               for m in page.get("DeleteMarkers", []) if m["IsLatest"]]
    for marker in markers:
        s3.delete_object(Bucket=BUCKET, Key=marker["Key"], VersionId=marker["VersionId"])
    return len(markers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stack_dir", type=Path, help="folder for the database, bucket snapshot, secrets and logs "
                                                      "(new, or one a stack ran in: it goes on with its data)")
    parser.add_argument("--mlflow-port", type=int, default=0,
                        help="port of the tracking server (default: the folder's last one, else 5000)")
    parser.add_argument("--no-auth", action="store_true", help="no basic-auth app: anyone who reaches the port "
                                                               "reads and writes everything")
    args = parser.parse_args()
    port = args.mlflow_port or (0 if (args.stack_dir / "ports.json").exists() else 5000)
    stack = Stack(args.stack_dir, mlflow_port=port, auth=not args.no_auth)
    try:
        stack.start()
        auth = (f"\nadmin:       user {ADMIN}, password in {stack.root / 'secrets' / 'admin-password'}; add users "
                f"with deploy/team_users.py" if stack.auth else "\nno authentication (--no-auth)")
        print(f"PostgreSQL   {stack.backend_store_uri}\nS3           {stack.s3_endpoint} bucket {BUCKET}\n"
              f"MLflow       {stack.tracking_uri} (artifacts proxied to {stack.artifacts_destination}){auth}\n\n"
              f"clients:     export MLFLOW_TRACKING_URI={stack.tracking_uri}\nCtrl-C stops all three.", flush=True)
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    finally:
        stack.stop()


if __name__ == "__main__":
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    main()
