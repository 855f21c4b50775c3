"""Workflow ids and task ids: validation, generation and deterministic naming."""

from __future__ import annotations

import re
import time
import unicodedata
import uuid

MAX_ID_LENGTH = 200
# Only ids the allocator can generate: a suffix >= 1 without leading zeros.
_SUFFIXED = re.compile(r"^(.*)_([1-9]\d*)$")


def new_workflow_id() -> str:
    """A fresh, unique, time-sortable workflow id."""
    return f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:12]}"


def check_id(value: object, what: str = "workflow_id") -> str:
    """Validate a workflow or task id; raise ``TypeError``/``ValueError`` naming the problem."""
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a str, got {type(value).__name__}: {value!r}")
    problem = None
    if not value:
        problem = "it is empty"
    elif len(value) > MAX_ID_LENGTH:
        problem = f"it is {len(value)} characters long (at most {MAX_ID_LENGTH})"
    elif "/" in value or "\\" in value:
        problem = "it contains a path separator ('/' or '\\')"
    elif ".." in value or value == ".":
        problem = "it contains '..' or is '.'"
    elif any(unicodedata.category(ch) == "Cc" for ch in value):
        problem = "it contains a control character"
    if problem:
        raise ValueError(
            f"Invalid {what} {value[:60]!r}: {problem}. Use up to {MAX_ID_LENGTH} printable "
            "characters without '/', '\\' or '..', e.g. 'order-1234'."
        )
    return value


def slug(name: str) -> str:
    """ASCII slug of a qualified name: ``outer.<locals>.inner`` -> ``outer.locals.inner``."""
    text = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode("ascii")
    text = re.sub(r"[^\w.\-\s]", "", text).strip()
    return re.sub(r"[-\s]+", "-", text)


def default_task_name(func: object) -> str:
    """``<module>.<slug(qualname)>`` of a function."""
    module = getattr(func, "__module__", None) or "unknown"
    qualname = getattr(func, "__qualname__", None) or getattr(func, "__name__", None) or "task"
    return f"{module}.{slug(str(qualname))}"


class IdAllocator:
    """Assigns readable, deterministic task ids within one workflow.

    The first task with base name ``b`` gets ``b``; later ones ``b_1``, ``b_2``...
    An id that two different bases would produce (an explicit ``f_1`` next to a
    generated ``f_1``) is an error, not a silent overwrite. The state is a counter
    per base name, so it stays small however many tasks a workflow runs.
    """

    def __init__(self, counters: dict[str, int] | None = None) -> None:
        self.counters: dict[str, int] = dict(counters or {})

    def allocate(self, base: str) -> str:
        from ray_workflows.exceptions import TaskIdCollisionError

        n = self.counters.get(base, 0)
        task_id = base if n == 0 else f"{base}_{n}"
        # `task_id` collides if another base produces it too: "x_3" as a bare base
        # name against the 3rd repeat of "x", in either order.
        match = _SUFFIXED.match(task_id)
        if match and (n == 0 and self.counters.get(match.group(1), 0) > int(match.group(2))):
            raise TaskIdCollisionError(
                f"Task id {task_id!r} is already used by a repeat of task {match.group(1)!r}. "
                "Choose another task_id.",
                task_id=task_id,
            )
        if n > 0 and self.counters.get(task_id, 0) > 0:
            raise TaskIdCollisionError(
                f"Task id {task_id!r} (repeat {n} of {base!r}) is already used by a task "
                f"named {task_id!r} explicitly. Choose another task_id.",
                task_id=task_id,
            )
        self.counters[base] = n + 1
        return task_id


__all__ = [
    "MAX_ID_LENGTH",
    "IdAllocator",
    "check_id",
    "default_task_name",
    "new_workflow_id",
    "slug",
]
