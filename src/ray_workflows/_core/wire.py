"""The wire between the runner and a worker: what one Ray task of workflow tasks is
sent, and what it returns, typed once for both sides.

A Ray task runs a *group*: one or more *units*, one after another, each a single
attempt or a fused pair (a producer and its only consumer, run back to back).
:func:`ray_workflows._core.worker.execute_group` is the only entry point. Each unit is
described by a :class:`Unit`; each attempt by an :class:`Attempt`. Where an
attempt's fields are plain data (the function's bytes, no live ObjectRefs) they
travel pickled together with the group's other plain attempts, as one argument:
Ray's submission cost is per argument. Otherwise its four fields are arguments of
their own, so that Ray resolves a function kept in the object store and tracks the
ObjectRefs. Every attempt returns two values: its :class:`Receipt` (as the plain
tuple :meth:`Receipt.wire`, which Ray serializes several times faster than a
dataclass) and its output value.

Everything fixed about a task is pickled once into a ``header`` (bytes travel
through Ray's fast path) and only the attempt number and live ObjectRefs are
added per submission.
"""

from __future__ import annotations

import contextlib
import dataclasses
import pickle
from typing import Any, NamedTuple

from ray import cloudpickle

from ray_workflows._core.options import TaskOptions
from ray_workflows._core.plan import Plan, TaskSpec
from ray_workflows._core.signing import open_ref, ref_of
from ray_workflows.storage import Storage

#: What an attempt's fields may be to travel pickled with others (no ObjectRefs).
PLAIN = (bytes, int, type(None))


class Attempt(NamedTuple):
    """One attempt of one task, as the runner sends it."""

    header: bytes  # see task_header
    attempt: int  # 0 for the first
    func: Any  # the pickled function, or an ObjectRef of it (resolved by Ray)
    refs: tuple[Any, Any] | None  # (live argument refs, nested upstream refs), never resolved

    def plain(self) -> bool:
        return all(type(field) in PLAIN for field in self)


class Unit(NamedTuple):
    """Where one unit of a group finds its attempts and input values among the
    arguments of the Ray task."""

    attempts: int  # 1, or 2 for a fused pair
    packed: bool  # its attempts are in the group's packed argument...
    values: int  # ...else they are its first 4 * attempts arguments; then its values
    split: int  # a pair: how many of the values are the producer's
    slot: int  # a pair: the consumer's input that is the producer's output

    @property
    def returns(self) -> int:
        return 2 * self.attempts


@dataclasses.dataclass
class TaskCall:
    """Everything a worker needs for one attempt, apart from the function and values."""

    workflow_id: str
    task_id: str
    storage: Storage
    func_key: str
    args: bytes
    arg_refs: list[Any]  # ObjectRef, or the storage key of a checkpointed object
    direct_slots: list[int | None]  # per upstream: its position in the values
    nested_refs: list[Any]  # per upstream: an ObjectRef of its output, if used nested
    attempt: int
    options: TaskOptions
    epoch: int  # of the lease its runner holds: the output is written under it


def task_header(
    workflow_id: str, storage: Storage, spec: TaskSpec, slots: list[int | None], epoch: int
) -> bytes:
    """Everything fixed about one task, pickled once for all its attempts. Live
    ObjectRefs are not in it: they travel beside it, so Ray tracks them."""
    keys = spec.arg_refs if all(isinstance(r, str) for r in spec.arg_refs) else None
    fields = (
        workflow_id,
        spec.task_id,
        ref_of(storage),
        spec.func_key,
        spec.args,
        keys,
        slots,
        spec.options,
        epoch,
    )
    # Plain pickle is several times faster, and enough: the fields are plain data
    # (exception classes to retry on are already cloudpickled bytes in the options).
    with contextlib.suppress(Exception):
        return pickle.dumps(fields, protocol=5)
    data: bytes = cloudpickle.dumps(fields)
    return data


def call_of(header: bytes, attempt: int, refs: tuple[Any, Any] | None) -> TaskCall:
    wid, tid, uri, func_key, args, keys, slots, options, epoch = pickle.loads(header)
    arg_refs, nested = refs if refs is not None else (None, None)
    return TaskCall(
        workflow_id=wid,
        task_id=tid,
        storage=open_ref(uri),
        func_key=func_key,
        args=args,
        arg_refs=keys if arg_refs is None else arg_refs,
        direct_slots=slots,
        nested_refs=nested if nested is not None else [None] * len(slots),
        attempt=attempt,
        options=options,
        epoch=epoch,
    )


def pickled_error(exc: BaseException) -> bytes:
    """An attempt's exception as it travels: cloudpickled, or, if it cannot pickle,
    a RuntimeError with its text (it still reaches the user)."""
    try:
        data: bytes = cloudpickle.dumps(exc)
        return data
    except Exception:
        return pickle.dumps(RuntimeError(f"{type(exc).__qualname__}: {exc}"))


class Unavailable:
    """The value output of an attempt that produced no value: it failed, or continued
    into a sub-workflow. The engine submits consumers ahead of their inputs (Ray
    starts them the moment the inputs exist); one handed this instead of a value does
    not run, and the engine submits it again once its input really exists."""

    def __reduce__(self) -> Any:
        return (_unavailable, ())

    def __repr__(self) -> str:
        return "<no value>"


UNAVAILABLE = Unavailable()


def _unavailable() -> Unavailable:
    return UNAVAILABLE


@dataclasses.dataclass
class Receipt:
    kind: str  # "value" | "continuation" | "error" | "skipped"
    start_time: float
    end_time: float
    writes: dict[str, bytes] = dataclasses.field(default_factory=dict)
    record: bytes | None = None  # a small output record, for the engine to commit
    plan: Plan | None = None
    error: bytes | None = None  # the pickled exception
    error_text: str = ""
    retryable: bool = False
    # The value as pickled for its record (payload, refs), kept in this process for a
    # fused consumer's copy (see worker._pair); never sent.
    pickled: tuple[bytes, list[Any]] | None = dataclasses.field(default=None, repr=False)

    def wire(self) -> tuple[Any, ...]:
        """The receipt as a tuple of plain values: Ray serializes that with msgpack,
        several times cheaper per task than pickling the dataclass."""
        return (
            self.kind,
            self.start_time,
            self.end_time,
            self.writes or None,
            self.record,
            self.plan,
            self.error,
            self.error_text,
            self.retryable,
        )

    @classmethod
    def unwire(cls, data: tuple[Any, ...]) -> Receipt:
        kind, start, end, writes, record, plan, error, text, retryable = data
        return cls(kind, start, end, writes or {}, record, plan, error, text, retryable)


__all__ = [
    "PLAIN",
    "UNAVAILABLE",
    "Attempt",
    "Receipt",
    "TaskCall",
    "Unavailable",
    "Unit",
    "call_of",
    "pickled_error",
    "task_header",
]
