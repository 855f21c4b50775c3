"""Virtual actors, the worker's side: one method call as a Ray task, and ``self.m.step``.

A call (or ``__init__``) runs in a Ray worker (:func:`run_method`): it restores the
state into an instance made without ``__init__``, calls the method and captures the
state again (:mod:`ray_workflows._core.actor_state`). Its outcome comes back pickled,
``("ok", value)`` or ``("error", exception)``, with the plan of the sub-workflow the
method returned, if it returned a step or DAG. The manager's side, which logs, orders
and commits the calls, is :mod:`ray_workflows._core.actors`.

Inside a method, ``self.other.step(...)`` is a workflow step: a task that asks the
manager to call ``other`` on this actor (how often it calls is in
:mod:`ray_workflows._core.actors`).
"""

from __future__ import annotations

import inspect
import uuid
from collections.abc import Callable
from typing import Any

import ray
from ray import cloudpickle
from ray.dag import DAGNode

from ray_workflows._core import context
from ray_workflows._core.actor_state import Captured, capture, has_own, restore
from ray_workflows._core.compiler import compile_dag
from ray_workflows._core.incarnation import NAMESPACE, manager_name
from ray_workflows._core.plan import Plan

READONLY = "__ray_workflows_readonly__"  # set on a method by @virtual_actor.readonly


def run_method(
    cls_bytes: bytes,
    record: bytes | None,
    method: str | None,
    call: bytes,
    actor_id: str = "",
    storage_uri: str = "",
    storage_ref: Any = None,
    objects: dict[str, bytes] | None = None,
) -> tuple[Captured | None, bytes, Plan | None]:
    """In a Ray worker: the new state (None: unchanged), the pickled ``("ok", value)``
    or ``("error", exception)`` of one method call (or of ``__init__``), and the plan
    of the sub-workflow the method returned, if it returned a step or DAG. ``record``
    is the stored state record (see :func:`restore`); ``objects`` the object records
    it refers to when the worker cannot read the storage itself."""
    cls = _stepping(cloudpickle.loads(cls_bytes), actor_id, storage_uri)
    args, kwargs = cloudpickle.loads(call)
    try:
        if method is None:
            obj = cls(*args, **kwargs)
            value = None
        else:
            assert record is not None, "a method runs on a committed state"
            state = restore(record, actor_id, storage_ref or storage_uri, dict(objects or {}))
            obj = cls.__new__(cls)
            if has_own(cls, "__setstate__"):
                obj.__setstate__(state)
            else:
                obj.__dict__.update(state)
            value = getattr(obj, method)(*args, **kwargs)
            if isinstance(value, DAGNode):
                return capture(obj, actor_id), pickle_outcome("ok", None), compile_dag(value)
        return capture(obj, actor_id), pickle_outcome("ok", value), None
    except Exception as exc:
        return None, pickle_outcome("error", exc), None


def _stepping(cls: Any, actor_id: str, storage_uri: str) -> Any:
    """``cls`` with each public method also a step factory: ``self.m.step(...)``."""
    if not actor_id:
        return cls
    methods = {}
    for name in dir(cls):
        attr = inspect.getattr_static(cls, name)
        if not name.startswith("_") and inspect.isfunction(attr):
            methods[name] = _Method(attr, name, actor_id, storage_uri)
    sub = type(cls.__name__, (cls,), methods)
    sub.__qualname__, sub.__module__ = cls.__qualname__, cls.__module__
    return sub


class _Method:
    def __init__(self, func: Callable[..., Any], name: str, actor_id: str, uri: str) -> None:
        self.func, self.name, self.actor_id, self.uri = func, name, actor_id, uri
        self.readonly = bool(getattr(func, READONLY, False))

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        return self.func if obj is None else _BoundMethod(self, obj)


class _BoundMethod:
    """``self.m`` inside a virtual actor method: call it, or ``.step(...)`` it."""

    def __init__(self, method: _Method, obj: Any) -> None:
        self._method, self._obj = method, obj

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._method.func(self._obj, *args, **kwargs)

    def step(self, *args: Any, **kwargs: Any) -> DAGNode:
        """A workflow step that calls this method on the stored actor."""
        m = self._method
        name = f"{type(self._obj).__qualname__}.{m.name}"
        node: DAGNode = _method_task.options(name=name).bind(
            m.uri, m.actor_id, m.name, m.readonly, *args, **kwargs
        )
        return node


def _call_method(
    storage_uri: str, actor_id: str, method: str, readonly: bool, *args: Any, **kwargs: Any
) -> Any:
    """A workflow task (see ``_BoundMethod.step``): one call of a virtual actor method."""

    ctx = context.current()
    if ctx is None:  # not run by a workflow: a call of its own
        call_id, step = uuid.uuid4().hex, None
    else:
        call_id, step = ctx.task_id, ctx.workflow_id
    manager = ray.get_actor(manager_name(storage_uri), namespace=NAMESPACE)
    call = cloudpickle.dumps((args, kwargs))
    return ray.get(
        manager.actor_call.remote(actor_id, call_id, method, call, readonly, {}, None, step)
    )


# It only waits for the manager, which runs the method as a task of its own.
_method_task = ray.remote(num_cpus=0)(_call_method)


def pickle_outcome(kind: str, value: Any) -> bytes:
    """A call's outcome as it is stored and sent: the pickled ``(kind, value)``."""
    try:
        return bytes(cloudpickle.dumps((kind, value)))
    except Exception as exc:  # an unpicklable result or exception: say what it was
        return bytes(cloudpickle.dumps(("error", TypeError(f"cannot store {value!r}: {exc}"))))


__all__ = ["READONLY", "has_own", "pickle_outcome", "run_method"]
