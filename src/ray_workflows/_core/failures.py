"""What a task's failure turns into: a retry after a backoff, a value of the task that
catches it, or the workflow's failure.

Catching follows Ray 2.47: a task with ``catch_exceptions=True`` covers its whole
call tree. Its own exception, and its continuation's output task's (which inherits
the flag), are caught in the worker. A failure deeper in the tree (a task of the
sub-workflow it returned that is not the output, or a task of theirs) is caught
here: the nearest task up the chain of *creators* (the task whose continuation
created a task) that catches gives ``(None, exception)`` as its output. A failure
of a task's input is not caught by the task: catching covers calls, not data.
"""

from __future__ import annotations

import pickle
import random
from typing import Any

import ray

from ray_workflows._core import serialization
from ray_workflows._core.dispatch import TaskFailure
from ray_workflows._core.graph import TaskGraph
from ray_workflows._core.plan import TaskSpec
from ray_workflows.exceptions import WorkflowExecutionError

# Backoff between retries: 50 ms doubling to at most 5 s, with jitter.
_BACKOFF_BASE, _BACKOFF_CAP = 0.05, 5.0


def retry_delay(attempts: int) -> float:
    """The backoff before the retry that follows ``attempts`` failed attempts."""
    delay: float = min(_BACKOFF_CAP, _BACKOFF_BASE * 2**attempts) * (0.5 + random.random() / 2)
    return delay


def execution_error(workflow_id: str, failure: TaskFailure) -> WorkflowExecutionError:
    """What a workflow failed by ``failure`` raises to whoever waits for it."""
    return WorkflowExecutionError(
        f"Workflow {workflow_id!r} failed: task {failure.task_id!r} raised "
        f"{(failure.text.strip().splitlines() or ['an error'])[-1]}",
        workflow_id=workflow_id,
        task_id=failure.task_id,
        cause_bytes=failure.error,
    )


class Catchers:
    """The continued tasks of one run that a failure below them may be caught by:
    those that catch, and those with a catcher up their creators. (A run that never
    continues a catching task keeps nothing here.)"""

    def __init__(self) -> None:
        self._creator: dict[str, str] = {}
        self._root: dict[str, str] = {}  # a catcher -> the root of its chain
        # Chain ends completed by a catch while they ran: their receipts are moot.
        self.moot: set[str] = set()

    def continued(self, spec: TaskSpec, root: str) -> None:
        """``spec``'s task returned a continuation that stands for chain ``root``."""
        if spec.catch_exceptions:
            self._root[spec.task_id] = root
        elif spec.creator not in self._creator and spec.creator not in self._root:
            return
        self._creator[spec.task_id] = spec.creator

    def moot_receipt(self, tid: str) -> bool:
        """Whether ``tid``'s receipt is moot: a catch completed it while it ran."""
        if tid not in self.moot:
            return False
        self.moot.discard(tid)
        return True

    def chain_end(self, spec: TaskSpec, graph: TaskGraph) -> str | None:
        """The task whose output is to catch ``spec``'s failure, if any: the current end
        of the chain of the nearest task up ``spec``'s creators that catches."""
        tid = spec.creator
        while tid in self._creator:
            root = self._root.get(tid)
            if root is not None:
                end = next((e for e, r in graph.root_of.items() if r == root), None)
                return end if end in graph.specs else None
            tid = self._creator[tid]
        return None


class _Raised:
    """An exception pickled in the worker, put back as itself where it is unpickled
    (the engine never needs the user's exception classes)."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def __reduce__(self) -> Any:
        return (pickle.loads, (self.data,))


def caught(error: bytes, now: float) -> tuple[Any, bytes]:
    """The output ``(None, exception)`` of a catcher from the pickled ``error``: an
    ObjectRef of it, and its output record."""
    value = (None, _Raised(error))
    record = serialization.encode(
        "value", pickle.dumps(value, protocol=5), start_time=now, end_time=now
    )
    return ray.put(value), record


__all__ = ["Catchers", "caught", "execution_error", "retry_delay"]
