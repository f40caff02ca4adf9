"""Real servers for tests: a `ray start --head` cluster with token auth and an `mlflow server`, both on
loopback, started as users start them and stopped by PID."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import psutil

BIN = Path(sys.executable).parent  # the venv's ray / mlflow commands


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_env(**extra: str) -> dict:
    env = {**os.environ, "RAY_AUTH_MODE": "token", "MLFLOW_DISABLE_TELEMETRY": "true",
           "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", **extra}
    env.pop("RAY_ADDRESS", None)
    return env


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM a server's process group, then SIGKILL it if its graceful shutdown outlasts 30 s (seen in CI for
    mlflow server on a loaded machine): the port must be free when this returns."""
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


@dataclass
class RayHead:
    dashboard: str  # http://127.0.0.1:PORT, what `ray job submit --address` takes
    temp_dir: Path
    env: dict  # the environment its `ray` commands use: a fresh home folder, as on a new user's machine

    def stop(self) -> None:
        """Kill this cluster's processes only (`ray stop` would stop every cluster of this user)."""
        mine = [p for p in psutil.process_iter(["cmdline"]) if str(self.temp_dir) in " ".join(p.info["cmdline"] or [])]
        for p in mine:
            p.send_signal(signal.SIGTERM)
        # Most exit at once; one of Ray's always outlasts any grace (measured: 15 s of 15), and this cluster's state
        # is thrown away with its folder, so the rest are killed after a short grace.
        _, alive = psutil.wait_procs(mine, timeout=3)
        for p in alive:
            p.kill()
        shutil.rmtree(self.temp_dir, ignore_errors=True)  # its sessions, logs and the home folder made for it


def start_ray_head(num_cpus: int = 2) -> RayHead:
    """`ray start --head` as docs/scale_out.md has a user run it, from an empty home folder: the token first
    (`ray get-auth-token --generate`: `ray start` does not write one), then the head."""
    # Short temp dir: Ray's unix socket paths under it must stay below 108 characters.
    temp_dir = Path(tempfile.mkdtemp(prefix="rh", dir="/tmp"))
    # The packaged model's converted copy stays where this machine has it (converting again costs a minute).
    from qlora.model_source import cache_root
    env = server_env(HOME=str(temp_dir / "home"), QLORA_CACHE=str(cache_root()))
    subprocess.run([str(BIN / "ray"), "get-auth-token", "--generate"], env=env, check=True, capture_output=True,
                   timeout=60)
    dash = free_port()
    cmd = [str(BIN / "ray"), "start", "--head", f"--port={free_port()}", "--dashboard-host=127.0.0.1",
           f"--dashboard-port={dash}", f"--ray-client-server-port={free_port()}",
           f"--dashboard-agent-listen-port={free_port()}", f"--num-cpus={num_cpus}", f"--temp-dir={temp_dir}",
           "--disable-usage-stats"]
    subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=120)
    head = RayHead(f"http://127.0.0.1:{dash}", temp_dir, env)
    _wait_http(head.dashboard + "/api/version", 60)
    return head


@dataclass
class MlflowServer:
    uri: str
    proc: subprocess.Popen
    folder: Path  # backend store and artifacts: a server restarted on it sees the same runs

    def stop(self) -> None:
        stop_group(self.proc)  # the server and its gunicorn/uvicorn workers


def start_mlflow_server(folder: Path, port: int | None = None) -> MlflowServer:
    port = port or free_port()
    folder.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}", "--artifacts-destination", str(folder / "artifacts")],
        env=server_env(), stdout=open(folder / "server.log", "ab"), stderr=subprocess.STDOUT, start_new_session=True)
    server = MlflowServer(f"http://127.0.0.1:{port}", proc, folder)
    _wait_http(server.uri + "/health", 300)  # a first start in a fresh environment (no .pyc yet) on busy cores: ~2 min
    return server


def _wait_http(url: str, timeout: float) -> None:
    deadline = time.time() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except urllib.error.HTTPError:  # answered (e.g. 401 without the auth token): it is up
            return
        except Exception as e:
            if time.time() > deadline:
                raise TimeoutError(f"{url} did not answer within {timeout} s ({e})") from None
            time.sleep(1)


@dataclass
class S3Server:
    """moto's S3-compatible server (a real HTTP server on loopback, not an in-process mock)."""
    endpoint: str
    proc: subprocess.Popen

    def env(self, key: str = "testing", secret: str = "testing") -> dict:
        """What a user sets for an S3-compatible store (pyarrow, boto3 and Ray Data read these)."""
        return {"AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": secret, "AWS_ENDPOINT_URL": self.endpoint,
                "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}

    def client(self):
        import boto3
        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id="testing",
                            aws_secret_access_key="testing", region_name="us-east-1")

    def stop(self) -> None:
        stop_group(self.proc)


def start_s3_server(folder: Path) -> S3Server:
    port = free_port()
    folder.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], env=server_env(),
                            stdout=open(folder / "moto.log", "ab"), stderr=subprocess.STDOUT, start_new_session=True)
    server = S3Server(f"http://127.0.0.1:{port}", proc)
    _wait_http(server.endpoint, 60)
    return server
