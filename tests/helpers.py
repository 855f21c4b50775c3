"""Helpers importable by test modules and by the Ray workers that run their tasks."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote


def faulty_uri(inner: Path, control: Path) -> str:
    """A ``faulty`` storage over the directory ``inner``, told what to fail by the JSON
    file ``control`` (see ray_workflows.testing)."""
    return f"faulty://?inner={quote(str(inner), safe='')}&control={quote(str(control), safe='')}"


def record_run(directory: str | os.PathLike[str], name: str) -> None:
    """Record one execution of task ``name`` as a file (counted across processes)."""
    Path(directory, f"{name}.{os.getpid()}.{uuid.uuid4().hex}").touch()


def count_runs(directory: str | os.PathLike[str], name: str) -> int:
    return sum(1 for p in Path(directory).iterdir() if p.name.startswith(name + "."))


def wait_for(predicate: Callable[[], bool], timeout: float = 60.0) -> None:
    """Poll ``predicate`` every 50 ms until it is true; TimeoutError after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(0.05)
