"""Helpers importable by test modules and by the Ray workers that run their tasks."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote

import ray


def faulty_uri(inner: Path, control: Path) -> str:
    """A ``faulty`` storage over the directory ``inner``, told what to fail by the JSON
    file ``control``: the test-only plugin in tests/plugins/faulty_storage, which
    ``./dev.sh test`` installs."""
    from ray_workflows import plugins

    if "faulty" not in plugins.available(plugins.STORAGE_GROUP):
        raise RuntimeError(
            "the test-only 'faulty' storage plugin is not installed: run ./dev.sh test, or "
            "uv pip install -e tests/plugins/faulty_storage"
        )
    return f"faulty://?inner={quote(str(inner), safe='')}&control={quote(str(control), safe='')}"


def record_run(directory: str | os.PathLike[str], name: str) -> None:
    """Record one execution of task ``name`` as a file (counted across processes)."""
    Path(directory, f"{name}.{os.getpid()}.{uuid.uuid4().hex}").touch()


def count_runs(directory: str | os.PathLike[str], name: str) -> int:
    return sum(1 for p in Path(directory).iterdir() if p.name.startswith(name + "."))


def lease_record(uri: str, wid: str) -> dict[str, object]:
    """The stored lease record of workflow ``wid`` in storage ``uri`` (it must exist)."""
    import json

    from ray_workflows._core import bridge, config
    from ray_workflows._core.lease import lease_key
    from ray_workflows.storage import open_storage

    raw = bridge.run(open_storage(config.normalise_storage(uri)).get(lease_key(wid)))
    assert raw is not None
    record: dict[str, object] = json.loads(raw)
    return record


def wait_for(predicate: Callable[[], bool], timeout: float = 60.0) -> None:
    """Poll ``predicate`` every 50 ms until it is true; TimeoutError after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(0.05)


@ray.remote
def step(x: int, name: str, runs: str) -> int:
    """Record a run of ``name`` in ``runs``; ``x + 1``."""
    record_run(runs, name)
    return x + 1


@ray.remote
def blocked_step(x: int, name: str, runs: str, gate: str) -> int:
    """:func:`step` that returns only once the file ``gate`` exists."""
    record_run(runs, name)
    while not Path(gate).exists():
        time.sleep(0.02)
    return x + 1
