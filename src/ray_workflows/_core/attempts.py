"""One task attempt inside a Ray worker.

:func:`execute_attempt` runs one attempt that :mod:`ray_workflows._core.worker` hands it:
the task's function (unpickled once per process), its arguments (loaded and resolved),
the user function itself (tail calls marked ``allow_inplace`` run right here), and what
came of it as a :class:`Receipt`: a value checkpointed (a big output written here, a
small one back in the receipt), a continuation compiled to a plan, or an error.
"""

from __future__ import annotations

import collections
import contextvars
import time
import traceback
from typing import Any

import ray
from ray import cloudpickle
from ray.dag import DAGNode, FunctionNode

from ray_workflows._core import bridge, context, serialization
from ray_workflows._core.checkpoints import object_store
from ray_workflows._core.compiler import compile_dag
from ray_workflows._core.options import TaskOptions
from ray_workflows._core.plan import Deref, Up
from ray_workflows._core.store import task_key
from ray_workflows._core.wire import (
    UNAVAILABLE,
    Attempt,
    Receipt,
    TaskCall,
    call_of,
    pickled_error,
)

#: Value records up to this size go back to the engine in the receipt and are
#: committed in packs; bigger ones are written by the worker itself.
INLINE_RECORD_BYTES = 64 * 1024

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


def execute_attempt(sent: Attempt, values: tuple[Any, ...]) -> tuple[Receipt, Any]:
    """Run one attempt on its input values: its receipt and its output value
    (``UNAVAILABLE`` unless it returned a value; it skips if an input never came)."""
    start = time.time()
    for value in values:
        if value is UNAVAILABLE:  # submitted ahead of an input that never came
            return Receipt("skipped", start, start), UNAVAILABLE
    call = call_of(sent.header, sent.attempt, sent.refs)
    func_data = sent.func
    opts = call.options
    writes: dict[str, bytes] = {}
    objects = object_store(call.storage, call.workflow_id, writes)
    ctx = context.TaskContext(call.workflow_id, call.task_id, call.attempt)
    with context.running(ctx):
        try:
            return _attempt(call, func_data, values, objects, writes, start)
        except Exception as exc:
            # Anything this attempt raised (the user function, arguments that do not
            # load, a continuation that does not compile, an output that cannot be
            # pickled) is an application error of this task, with its cause.
            # A checkpoint refused for holding an actor handle would be refused again.
            retryable = opts.retryable(exc) and not isinstance(exc, serialization.ActorHandleError)
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
    payload, refs = serialization.dumps(result, actors=call.options.checkpoint is False)
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


__all__ = ["INLINE_RECORD_BYTES", "Continuation", "execute_attempt", "in_task"]
