"""What task attempts do inside a Ray worker.

The runner submits :func:`execute_group` as an ordinary Ray task (with the
tasks' own Ray options, Ray's retries off), for one attempt, a fused pair or a
batch of quick attempts (:mod:`ray_workflows._core.wire`). For each attempt the worker
resolves the arguments,
runs the user function and checkpoints a value result: a big output is written
here, by the worker, so it never travels through the engine; a small one goes
back in the receipt and the engine commits it with others in one write. It
returns two things: a small :class:`Receipt` for the engine and the output value,
which downstream tasks receive through Ray's object store.

"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import pickle
import threading
import time
import traceback
from typing import Any

import ray
from ray import cloudpickle
from ray.dag import DAGNode, FunctionNode

from ray_workflows._core import bridge, context, serialization
from ray_workflows._core.compiler import compile_dag
from ray_workflows._core.options import TaskOptions
from ray_workflows._core.plan import Deref, Up
from ray_workflows._core.store import objects_prefix, read_record, task_key
from ray_workflows._core.wire import (
    UNAVAILABLE,
    Attempt,
    Receipt,
    TaskCall,
    Unit,
    call_of,
    pickled_error,
)
from ray_workflows.storage import Storage, open_storage

#: Value records up to this size go back to the engine in the receipt and are
#: committed in packs; bigger ones are written by the worker itself.
INLINE_RECORD_BYTES = 64 * 1024

#: In a fused pair (see :func:`_pair`), the producer's small output travels with
#: the consumer's receipt; if the consumer is still running this long after the
#: producer finished, the worker writes that output itself instead.
FUSED_FLUSH_SECONDS = 0.02

# True while a workflow task's user function runs: `workflow.continuation` then
# returns the DAG instead of executing it.
in_task: contextvars.ContextVar[bool] = contextvars.ContextVar("in_workflow_task", default=False)


class Continuation:
    """Returned by ``workflow.continuation(dag)`` inside a task: the DAG replaces the result."""

    def __init__(self, dag: DAGNode) -> None:
        self.dag = dag


_functions: collections.OrderedDict[str, Any] = collections.OrderedDict()


def _function(key: str, data: bytes) -> Any:
    func = _functions.get(key)
    if func is None:
        func = _functions[key] = cloudpickle.loads(data)
        if len(_functions) > 256:
            _functions.popitem(last=False)
    return func


def _object_store(
    storage: Storage, workflow_id: str, writes: dict[str, bytes]
) -> serialization.ObjectStore:
    """Objects of one workflow, as a worker sees them: written directly to a shared
    storage, else collected in ``writes`` for the engine to store."""

    def read(key: str) -> bytes | None:
        if key in writes:
            return writes[key]
        return bridge.run(storage.get(key))

    def write(key: str, data: bytes) -> None:
        if storage.shared:
            bridge.run(storage.put_if_absent(key, data))
        else:
            writes[key] = data

    return serialization.ObjectStore(objects_prefix(workflow_id), read, write)


def _arguments(
    call: TaskCall, values: tuple[Any, ...], objects: serialization.ObjectStore
) -> tuple[list[Any], dict[str, Any]]:
    refs = [objects.load_ref(r) if isinstance(r, str) else r for r in call.arg_refs]

    def hook(pid: Any) -> Any:
        return call.nested_refs[pid[1]]

    if refs or any(n is not None for n in call.nested_refs):
        args, kwargs = serialization.loads(call.args, refs, hook)
    else:  # (most tasks: nothing lifted out of the arguments)
        args, kwargs = serialization.loads(call.args, [])

    def resolve(value: Any) -> Any:
        if isinstance(value, Up):
            slot = call.direct_slots[value.index]
            assert slot is not None
            return values[slot]
        if isinstance(value, Deref):
            return ray.get(value.ref)
        return value

    return [resolve(a) for a in args], {k: resolve(v) for k, v in kwargs.items()}


def _inline(node: FunctionNode) -> Any:
    """Run an ``allow_inplace`` continuation task right here, in this worker."""
    args = [ray.get(a) if isinstance(a, ray.ObjectRef) else a for a in node.get_args()]
    kwargs = {
        k: ray.get(v) if isinstance(v, ray.ObjectRef) else v for k, v in node.get_kwargs().items()
    }
    return node._body(*args, **kwargs)


def _call_user(func: Any, args: list[Any], kwargs: dict[str, Any]) -> Any:
    token = in_task.set(True)
    try:
        result = func(*args, **kwargs)
        # Tail calls marked allow_inplace run in this process, without a Ray task,
        # and without growing the stack.
        while True:
            dag = result.dag if isinstance(result, Continuation) else result
            if not (isinstance(dag, FunctionNode) and not dag._get_all_child_nodes()):
                return result
            opts, _ = TaskOptions.from_ray_options(dag.get_options())
            if not opts.allow_inplace:
                return result
            result = _inline(dag)
    finally:
        in_task.reset(token)


def execute_group(units: tuple[Unit, ...], packed: bytes, *args: Any) -> tuple[Any, ...]:
    """The one entry point: run a group of units (see :mod:`ray_workflows._core.wire`) one
    after another in this Ray task; return each attempt's receipt and output value,
    in order. The runner submits one of these per single task, fused pair or batch of
    quick tasks that its placement chose."""
    plain = iter(pickle.loads(packed))
    out: list[Any] = []
    at = 0
    for unit in units:
        if unit.packed:
            attempts: tuple[Attempt, ...] = next(plain)
        else:
            n = 4 * unit.attempts
            fields = args[at : at + n]
            attempts = tuple(Attempt(*fields[i : i + 4]) for i in range(0, n, 4))
            at += n
        values = args[at : at + unit.values]
        at += unit.values
        if unit.attempts == 1:
            receipt, value = _execute(attempts[0], values)
            out += (receipt.wire(), value)
        else:
            out += _pair(attempts[0], attempts[1], unit.split, unit.slot, values)
    return tuple(out)


def _pair(
    first: Attempt, then: Attempt, split: int, slot: int, values: tuple[Any, ...]
) -> tuple[Any, ...]:
    """A producer and its only consumer back to back (one submission and one worker
    dispatch instead of two). ``values[:split]`` are the producer's inputs, the rest
    the consumer's, whose input ``slot`` is the producer's output. A producer that
    fails or continues hands the consumer ``UNAVAILABLE``, so it skips, exactly as a
    consumer submitted ahead does."""
    receipt, value = _execute(first, values[:split])
    inputs = list(values[split:])
    inputs[slot] = UNAVAILABLE
    if receipt.pickled is not None:  # a value: every value receipt carries its pickle
        with contextlib.suppress(Exception):  # a value that will not copy goes through Ray
            inputs[slot] = _copy(value, receipt.pickled)
    flush = _Flush(first.header, receipt) if receipt.record is not None else None
    try:
        then_receipt, then_value = _execute(then, tuple(inputs))
    finally:
        if flush is not None:
            flush.cancel()
    return receipt.wire(), value, then_receipt.wire(), then_value


_IMMUTABLE = (int, float, complex, str, bytes, bool, type(None))


def _copy(value: Any, pickled: tuple[bytes, list[Any]]) -> Any:
    """What Ray would hand a consumer: a copy, so its changes do not reach the
    producer's output (returned after the consumer ran), unpickled from the bytes
    the producer's record was made of."""
    if type(value) in _IMMUTABLE:
        return value
    return serialization.loads(*pickled)


class _Flush:
    """Writes a fused producer's output record itself once the consumer has run for
    :data:`FUSED_FLUSH_SECONDS` (then the receipt carries no record, as for a big
    output): a long consumer does not leave a finished output unsaved for long."""

    def __init__(self, header: bytes, receipt: Receipt) -> None:
        fields = pickle.loads(header)
        wid, tid, uri, epoch = fields[0], fields[1], fields[2], fields[-1]
        self.storage, self.receipt = open_storage(uri), receipt
        self.key = task_key(wid, tid, "out", epoch)
        self.lock = threading.Lock()
        self.cancelled = False
        if self.storage.shared:  # the engine alone can write to a storage that is not
            _flusher.add(self)

    def write(self) -> None:
        with self.lock:
            record = self.receipt.record
            if self.cancelled or record is None:
                return
            try:
                bridge.run(self.storage.put(self.key, record))
            except Exception:  # the engine commits it from the receipt, as usual
                return
            self.receipt.record = None

    def cancel(self) -> None:
        _flusher.discard(self)
        with self.lock:  # a write under way ends first: the receipt then says so
            self.cancelled = True


class _Flusher:
    """One thread per worker process that runs the :class:`_Flush` writes that
    come due (a thread per fused pair would cost more than the pair saves)."""

    def __init__(self) -> None:
        self._due: dict[_Flush, float] = {}
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None

    def add(self, flush: _Flush) -> None:
        with self._cond:
            self._due[flush] = time.monotonic() + FUSED_FLUSH_SECONDS
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="ray-workflows-flush", daemon=True
                )
                self._thread.start()
            self._cond.notify()

    def discard(self, flush: _Flush) -> None:
        with self._cond:
            self._due.pop(flush, None)

    def _run(self) -> None:
        while True:
            with self._cond:
                now = time.monotonic()
                ready = [f for f, at in self._due.items() if at <= now]
                for f in ready:
                    del self._due[f]
                if not ready:
                    wait = min(self._due.values(), default=now + 3600) - now
                    self._cond.wait(wait)
                    continue
            for f in ready:
                f.write()


_flusher = _Flusher()


def _execute(sent: Attempt, values: tuple[Any, ...]) -> tuple[Receipt, Any]:
    start = time.time()
    for value in values:
        if value is UNAVAILABLE:  # submitted ahead of an input that never came
            return Receipt("skipped", start, start), UNAVAILABLE
    call = call_of(sent.header, sent.attempt, sent.refs)
    func_data = sent.func
    opts = call.options
    writes: dict[str, bytes] = {}
    objects = _object_store(call.storage, call.workflow_id, writes)
    ctx = context.TaskContext(call.workflow_id, call.task_id, call.attempt)
    with context.running(ctx):
        try:
            return _attempt(call, func_data, values, objects, writes, start)
        except Exception as exc:
            # Anything this attempt raised (the user function, arguments that do not
            # load, a continuation that does not compile, an output that cannot be
            # pickled) is an application error of this task, with its cause.
            retryable = opts.retryable(exc)
            final = not retryable or (opts.max_retries != -1 and call.attempt >= opts.max_retries)
            if final and opts.catch_exceptions:
                try:
                    return _commit(call, (None, exc), objects, writes, start)
                except Exception as commit_error:
                    exc = commit_error
            return Receipt(
                "error",
                start,
                time.time(),
                writes,
                error=pickled_error(exc),
                error_text="".join(traceback.format_exception(exc)),
                retryable=retryable,
            ), UNAVAILABLE


def _attempt(
    call: TaskCall,
    func_data: bytes,
    values: tuple[Any, ...],
    objects: serialization.ObjectStore,
    writes: dict[str, bytes],
    start: float,
) -> tuple[Receipt, Any]:
    opts = call.options
    func = _function(call.func_key, func_data)
    args, kwargs = _arguments(call, values, objects)
    result = _call_user(func, args, kwargs)
    if isinstance(result, (DAGNode, Continuation)):
        dag = result.dag if isinstance(result, Continuation) else result
        plan = compile_dag(
            dag,
            checkpoint=opts.checkpoint is not False,
            catch_exceptions=bool(opts.catch_exceptions),
            creator=call.task_id,
        )
        if opts.checkpoint is not False:
            for spec in plan.tasks.values():
                spec.arg_keys = objects.save(spec.arg_refs)
        return Receipt("continuation", start, time.time(), writes, plan=plan), UNAVAILABLE
    if isinstance(result, ray.ObjectRef):
        result = ray.get(result)
    if opts.catch_exceptions:
        result = (result, None)
    return _commit(call, result, objects, writes, start)


def _commit(
    call: TaskCall,
    result: Any,
    objects: serialization.ObjectStore,
    writes: dict[str, bytes],
    start: float,
) -> tuple[Receipt, Any]:
    """Checkpoint a value result (objects first, then the output record)."""
    end = time.time()
    # (When nothing is stored, the value still travels to its consumers through Ray:
    # pickling it here fails as this task's error rather than later as a lost worker.)
    payload, refs = serialization.dumps(result)
    receipt = Receipt("value", start, end, writes, pickled=(payload, refs))
    if call.options.checkpoint is not False:
        record = serialization.encode(
            "value", payload, objects.save(refs), start_time=start, end_time=end
        )
        if call.storage.shared and len(record) > INLINE_RECORD_BYTES:
            key = task_key(call.workflow_id, call.task_id, "out", call.epoch)
            bridge.run(call.storage.put(key, record))
        else:
            receipt.record = record
    return receipt, result


def load_output(
    storage: Storage,
    workflow_id: str,
    records: dict[str, bytes] | None,
    key: str,
    packs: dict[str, dict[str, bytes]] | None = None,
) -> Any:
    """Read a task's checkpointed output (a helper task). For a storage only the engine
    can read, ``records`` holds the output record and the object records it refers to.
    ``packs`` caches decoded packs across the calls of one :func:`load_outputs`."""
    writes: dict[str, bytes] = {}

    def read(name: str) -> bytes | None:
        if records is not None:
            return records.get(name)
        return bridge.run(storage.get(name))

    data = read(key) if records is not None else read_record(read, key, packs)
    if data is None:
        from ray_workflows.exceptions import CheckpointError

        raise CheckpointError(f"Checkpoint {key!r} is missing from {storage.uri}.", key=key)
    header, payload = serialization.decode(data, key)
    objects = serialization.ObjectStore(objects_prefix(workflow_id), read, writes.__setitem__)
    return serialization.loads(payload, [objects.load_ref(k) for k in header["refs"]])


def load_outputs(
    storage: Storage, workflow_id: str, records: dict[str, bytes] | None, keys: list[str]
) -> tuple[Any, ...]:
    """Several :func:`load_output` in one helper task, one return value each (a pack
    holding many of them is read once)."""
    packs: dict[str, dict[str, bytes]] = {}
    return tuple(load_output(storage, workflow_id, records, key, packs) for key in keys)


def save_objects(
    storage: Storage, workflow_id: str, refs: list[Any]
) -> tuple[list[str], dict[str, bytes]]:
    """Checkpoint ObjectRef values (a helper task); return their keys, and the records
    the engine must write itself when the storage is not shared."""
    writes: dict[str, bytes] = {}
    return _object_store(storage, workflow_id, writes).save(refs), writes


__all__ = [
    "Continuation",
    "execute_group",
    "in_task",
    "load_output",
    "load_outputs",
    "save_objects",
]
