"""Workflow ids and task ids: validation, generation and deterministic naming."""

from __future__ import annotations

import hashlib
import re
import time
import unicodedata
import uuid

#: The longest id, in UTF-8 bytes: an id is a file name (with a record suffix and a
#: repeat's ``_<n>``) on file storage, whose names stop at 255 bytes, and a part of an
#: S3 key, which stops at 1,024.
MAX_ID_LENGTH = 200
# Characters an id cannot hold: control and format characters (zero-width, bidi
# overrides), surrogates, line and paragraph separators. They make ids that look the
# same and differ, or that print as something else.
_REFUSED_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})
# Only ids the allocator can generate: a suffix >= 1 without leading zeros.
_SUFFIXED = re.compile(r"^(.*)_([1-9]\d*)$")


def new_workflow_id() -> str:
    """A fresh, unique, time-sortable workflow id."""
    return f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:12]}"


def check_id(value: object, what: str = "workflow_id") -> str:
    """Validate a workflow or task id; return it in Unicode normal form C (so that the
    same visible id is the same id, however it was typed); raise
    ``TypeError``/``ValueError`` naming the problem."""
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a str, got {type(value).__name__}: {value!r}")
    value = unicodedata.normalize("NFC", value)
    size = len(value.encode("utf-8", "surrogatepass"))
    refused = next((ch for ch in value if unicodedata.category(ch) in _REFUSED_CATEGORIES), None)
    problem = None
    if not value:
        problem = "it is empty"
    elif size > MAX_ID_LENGTH:
        problem = f"it is {size} bytes long in UTF-8 (at most {MAX_ID_LENGTH})"
    elif "/" in value or "\\" in value:
        problem = "it contains a path separator ('/' or '\\')"
    elif ".." in value or value == ".":
        problem = "it contains '..' or is '.'"
    elif refused is not None:
        problem = (
            f"it contains the invisible or control character U+{ord(refused):04X} "
            f"({unicodedata.category(refused)})"
        )
    if problem:
        raise ValueError(
            f"Invalid {what} {value[:60]!r}: {problem}. Use up to {MAX_ID_LENGTH} bytes of "
            "printable characters without '/', '\\' or '..', e.g. 'order-1234'."
        )
    return value


def slug(name: str) -> str:
    """ASCII slug of a qualified name: ``outer.<locals>.inner`` -> ``outer.locals.inner``."""
    text = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode("ascii")
    text = re.sub(r"[^\w.\-\s]", "", text).strip()
    return re.sub(r"[-\s]+", "-", text)


def default_task_name(func: object) -> str:
    """``<module>.<slug(qualname)>`` of a function; a name too long for an id (with
    room for a repeat's ``_<n>``) keeps its end and a short hash of the whole."""
    module = getattr(func, "__module__", None) or "unknown"
    qualname = getattr(func, "__qualname__", None) or getattr(func, "__name__", None) or "task"
    name = f"{module}.{slug(str(qualname))}"
    if len(name) > _MAX_DEFAULT_NAME:  # ASCII: characters are bytes
        digest = hashlib.sha256(name.encode()).hexdigest()[:8]
        name = f"{digest}.{name[-(_MAX_DEFAULT_NAME - 9) :]}"
    return name


_MAX_DEFAULT_NAME = MAX_ID_LENGTH - 20


class IdAllocator:
    """Assigns readable, deterministic task ids within one workflow.

    The first task with base name ``b`` gets ``b``; later ones ``b_1``, ``b_2``...
    An id that two different bases would produce (an explicit ``f_1`` next to a
    generated ``f_1``) is an error, not a silent overwrite. The state is a counter
    per base name, so it stays small however many tasks a workflow runs.
    """

    def __init__(self, counters: dict[str, int] | None = None) -> None:
        self.counters: dict[str, int] = dict(counters or {})

    @staticmethod
    def counters_of(task_ids: list[str]) -> dict[str, int]:
        """Counters under which none of ``task_ids`` would be allocated again: every id
        is taken as a base used once, and ``b_<n>`` as the n-th repeat of ``b``."""
        counters: dict[str, int] = {}
        for tid in task_ids:
            counters[tid] = max(counters.get(tid, 0), 1)
            match = _SUFFIXED.match(tid)
            if match:
                base, n = match.group(1), int(match.group(2)) + 1
                counters[base] = max(counters.get(base, 0), n)
        return counters

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
