"""Helpers importable by test modules and by the Ray workers that run their tasks."""

from __future__ import annotations

import os
import uuid
from pathlib import Path


def record_run(directory: str | os.PathLike[str], name: str) -> None:
    """Record one execution of task ``name`` as a file (counted across processes)."""
    Path(directory, f"{name}.{os.getpid()}.{uuid.uuid4().hex}").touch()


def count_runs(directory: str | os.PathLike[str], name: str) -> int:
    return sum(1 for p in Path(directory).iterdir() if p.name.startswith(name + "."))
