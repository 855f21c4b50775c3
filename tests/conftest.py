"""Shared fixtures: one real local Ray for the whole session, real storage directories."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Ray workers import the functions defined in test modules by name: let them find them.
os.environ["PYTHONPATH"] = os.pathsep.join(
    [str(TESTS_DIR), os.environ.get("PYTHONPATH", "")]
).rstrip(os.pathsep)

import ray  # noqa: E402
import s3server  # noqa: E402

# Before ray.init: Ray workers inherit the environment, so the S3 tests' workers find
# the local test servers' credentials through the standard AWS chain.
s3server.configure_aws_environment()

import ray_workflows as workflow  # noqa: E402
from ray_workflows._core import config  # noqa: E402
from ray_workflows._core.manager import NAMESPACE, manager_name  # noqa: E402
from ray_workflows._core.settings import ENV_HOST, Settings  # noqa: E402

NUM_CPUS = 4


@pytest.fixture(scope="session", autouse=True)
def ray_session() -> Iterator[None]:
    """A real local Ray, started once (``address="local"`` never joins a stray cluster)."""
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=NUM_CPUS, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[s3server.S3Server]:
    """A real S3 server (SeaweedFS) on 127.0.0.1 for the session, started when asked for."""
    with s3server.seaweedfs(tmp_path_factory.mktemp("seaweedfs")) as server:
        yield server


@pytest.fixture(scope="session")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[s3server.S3Server]:
    """moto's S3 server on 127.0.0.1 for the session, started when asked for."""
    with s3server.moto(tmp_path_factory.mktemp("moto")) as server:
        yield server


@pytest.fixture(scope="session")
def session_storage(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("storage"))


@pytest.fixture
def storage(session_storage: str) -> str:
    """The session's storage, selected for this test (one manager serves many tests)."""
    workflow.init(session_storage)
    return session_storage


@pytest.fixture
def fresh_storage(tmp_path: Path) -> Iterator[str]:
    """A storage of this test's own (its own manager, removed afterwards)."""
    uri = str(tmp_path / "storage")
    workflow.init(uri)
    yield uri
    kill_manager(uri)


@pytest.fixture
def short_ttl_storage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A storage of this test's own whose manager grants and holds 1.5 s leases (and
    so sweeps for expired ones every 1.5 s); its manager is removed afterwards."""
    monkeypatch.setenv("RAY_WORKFLOWS_LEASE_TTL", "1.5")
    uri = str(tmp_path / "storage")
    workflow.init(uri)
    yield uri
    kill_manager(uri)


def kill_manager(uri: str, *, no_restart: bool = True) -> None:
    try:
        handle = ray.get_actor(manager_name(config.normalise_storage(uri)), namespace=NAMESPACE)
    except ValueError:
        return
    ray.kill(handle, no_restart=no_restart)
    config.forget_managers()


@pytest.fixture
def faulty(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A ``faulty`` storage of this test's own and its control file (see helpers.faulty_uri)."""
    from helpers import faulty_uri

    control = tmp_path / "faults.json"
    uri = faulty_uri(tmp_path / "inner", control)
    workflow.init(uri)
    yield uri, control
    kill_manager(uri)


@pytest.fixture
def wid(request: pytest.FixtureRequest) -> str:
    """A workflow id unique to this test."""
    name = request.node.name[:120].replace("/", "_").replace("[", "_").replace("]", "_")
    return f"{name}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def hosted_runs(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Small chains started in this test are hosted (ray_workflows._core.host; off by default)."""
    yield from _hosting(monkeypatch, True)


@pytest.fixture
def manager_runs(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Workflows started in this test run in the manager, never in a Ray task that
    hosts them (see ray_workflows._core.host): for tests of the manager's scheduler, whose
    small chains would otherwise be hosted."""
    yield from _hosting(monkeypatch, False)


def _hosting(monkeypatch: pytest.MonkeyPatch, on: bool) -> Iterator[None]:
    """Hosting on or off for one test: in the settings the driver has already (read
    once, at ``workflow.init``), and in its environment for settings built later in the
    test (a ``workflow.init`` after this fixture); as it was afterwards."""
    monkeypatch.setenv(ENV_HOST, "1" if on else "0")
    before = config.override(host=on)
    yield
    config.override(host=before.host if before is not None else Settings.host)


@pytest.fixture
def counter_dir(tmp_path: Path) -> Path:
    """A directory where tasks record each execution (one file per run) for counting."""
    path = tmp_path / "runs"
    path.mkdir()
    return path


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """The fault matrix's table (tests/fault_table.py), if its tests ran."""
    import fault_table

    if fault_table.ROWS:
        terminalreporter.write_sep("=", "fault matrix")
        terminalreporter.write_line(fault_table.render(fault_table.ROWS))
