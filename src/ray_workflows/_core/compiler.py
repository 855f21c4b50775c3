"""DAG -> plan: compile a Ray DAG into the tasks the engine schedules.

Each task's function and arguments are pickled here, once, in the process that
built the DAG, into a :class:`~ray_workflows._core.plan.Plan`. An upstream node
or ObjectRef passed directly as an argument becomes an ``Up`` or ``Deref``
placeholder (the task receives its value). Nested in a list or dict, an upstream
node becomes an ``("up", i)`` placeholder and an ObjectRef is kept out of band
(the task receives an ``ObjectRef``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import pickle
import weakref
from collections.abc import Callable
from typing import Any

import ray
from ray import cloudpickle
from ray.dag import DAGNode, FunctionNode
from ray.dag.input_node import InputAttributeNode, InputNode

from ray_workflows._core import serialization
from ray_workflows._core.ids import IdAllocator, default_task_name
from ray_workflows._core.options import TaskOptions
from ray_workflows._core.plan import EXTERNAL, Deref, Plan, TaskHandle, TaskSpec, Up


def _input_value(node: DAGNode, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    if isinstance(node, InputAttributeNode):
        key = node._key
        try:
            return args[key] if isinstance(key, int) else kwargs[key]
        except (IndexError, KeyError):
            raise TypeError(
                f"The DAG reads input {key!r}, but workflow.run() got positional inputs "
                f"{len(args)} and keyword inputs {sorted(kwargs)}."
            ) from None
    if len(args) == 1 and not kwargs:
        return args[0]
    raise TypeError(
        "InputNode is passed directly to a task, so workflow.run() needs exactly one "
        f"positional input (got {len(args)} positional, {len(kwargs)} keyword); "
        "use inp[0], inp[1] or inp.name to pass several."
    )


def _substitute_inputs(value: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    if isinstance(value, (InputNode, InputAttributeNode)):
        return _input_value(value, args, kwargs)
    if isinstance(value, list):
        return [_substitute_inputs(v, args, kwargs) for v in value]
    if isinstance(value, tuple) and type(value) is tuple:
        return tuple(_substitute_inputs(v, args, kwargs) for v in value)
    if isinstance(value, dict) and type(value) is dict:
        return {k: _substitute_inputs(v, args, kwargs) for k, v in value.items()}
    return value


class _FuncInfo:
    """What compiling needs to know about one task function, worked out once per
    process: a driver that starts a thousand workflows of ``f`` names ``f``, reads
    its signature, parses each distinct ``.options(...)`` of it and pickles it once
    (as Ray pickles a remote function once, at its first call). Weak keys: a function
    that goes away takes its entry with it."""

    __slots__ = (
        "arity",
        "defaulted",
        "kind",
        "name",
        "options",
        "pickled",
        "qualname",
        "signature",
    )

    def __init__(self, func: Callable[..., Any]) -> None:
        self.name = default_task_name(func)
        self.qualname: str = getattr(func, "__qualname__", self.name)
        self.kind: str = getattr(func, "__ray_workflows_kind__", "function")
        try:
            self.signature: inspect.Signature | None = inspect.signature(func)
        except ValueError:  # builtins without a signature
            self.signature = None
        self.arity = _arity(self.signature)
        self.options: dict[Any, tuple[TaskOptions, str | None]] = {}
        self.defaulted: dict[Any, TaskOptions] = {}
        self.pickled: tuple[str, bytes] | None = None  # (content key, bytes), at first use

    def pickle(self, func: Callable[..., Any], name: str) -> tuple[str, bytes]:
        """``(content key, pickled bytes)`` of the function (``name``: for errors)."""
        if self.pickled is None:
            try:
                data = cloudpickle.dumps(func)
            except Exception as exc:
                raise TypeError(
                    f"Task {name!r}: its function cannot be pickled ({type(exc).__name__}: "
                    f"{exc}). A workflow task's function is checkpointed, so it must not "
                    "capture locks, sockets or other process-local objects."
                ) from exc
            self.pickled = (hashlib.sha1(data).hexdigest()[:20], data)
        return self.pickled


def _arity(signature: inspect.Signature | None) -> tuple[int, int] | None:
    """``(required, total)`` positional parameters if the signature has nothing else
    (no ``*args``, ``**kwargs`` or keyword-only parameters): then a call with only
    positional arguments binds iff their count is in that range."""
    if signature is None:
        return None
    required = 0
    for param in signature.parameters.values():
        if param.kind not in (param.POSITIONAL_ONLY, param.POSITIONAL_OR_KEYWORD):
            return None
        if param.default is param.empty:
            required += 1
    return required, len(signature.parameters)


_FUNCS: weakref.WeakKeyDictionary[Callable[..., Any], _FuncInfo] = weakref.WeakKeyDictionary()


def _info(func: Callable[..., Any]) -> _FuncInfo:
    try:
        found = _FUNCS.get(func)
    except TypeError:  # not weakly referenceable: worked out every time
        return _FuncInfo(func)
    if found is None:
        found = _FUNCS[func] = _FuncInfo(func)
    return found


def _options_key(ray_options: dict[str, Any]) -> Any:
    """A hashable key for a node's Ray options (the workflow options ride in the
    ``_labels`` dict), or None if a value is unhashable."""
    try:
        items = []
        for key, value in ray_options.items():
            if type(value) is dict:
                value = (dict, tuple(sorted(value.items())))
            items.append((key, value))
        frozen = tuple(sorted(items))
        hash(frozen)
    except TypeError:  # an unhashable value, or dict keys that do not sort
        return None
    return frozen


#: Distinct options kept per function: a driver that makes new option values for
#: every run (a new scheduling strategy object, say) must not grow the cache forever.
_OPTIONS_PER_FUNCTION = 64


# The argument values that the C pickler writes exactly as cloudpickle would (with no
# ObjectRef or DAG node that needs lifting out): a task bound to such values, or to
# upstream outputs, skips the Python-level pickler.
_PLAIN_ARGS = serialization.ATOMS | {Up}


class _Compiler:
    def __init__(
        self,
        allocator: IdAllocator,
        inputs: tuple[tuple[Any, ...], dict[str, Any]],
        checkpoint: bool,
        catch_exceptions: bool,
        creator: str,
    ) -> None:
        self.allocator = allocator
        self.inputs = inputs
        self.checkpoint = checkpoint
        self.catch_exceptions = catch_exceptions
        self.creator = creator
        self.functions: dict[str, bytes] = {}
        self._func_keys: dict[int, str] = {}

    def options_of(
        self, info: _FuncInfo, ray_options: dict[str, Any], is_output: bool
    ) -> tuple[TaskOptions, str | None]:
        """The task's options with the workflow's defaults filled in, and its explicit
        task id (parsed once per function and distinct options; shared, frozen)."""
        key = _options_key(ray_options)
        found = info.options.get(key) if key is not None else None
        if found is None and key is None:  # not a key: parsed every time
            found = TaskOptions.from_ray_options(ray_options)
        elif found is None:  # cached: with its own copies of dicts the caller may change
            own = {k: dict(v) if type(v) is dict else v for k, v in ray_options.items()}
            found = TaskOptions.from_ray_options(own)
            if len(info.options) >= _OPTIONS_PER_FUNCTION:
                info.options.clear()
                info.defaulted.clear()
            info.options[key] = found
        opts, explicit = found
        if opts.checkpoint is not None and opts.catch_exceptions is not None:
            return opts, explicit
        catch = self.catch_exceptions if is_output else False
        variant = (key, self.checkpoint, catch)
        defaulted = info.defaulted.get(variant) if key is not None else None
        if defaulted is None:
            defaulted = dataclasses.replace(
                opts,
                checkpoint=self.checkpoint if opts.checkpoint is None else opts.checkpoint,
                catch_exceptions=catch if opts.catch_exceptions is None else opts.catch_exceptions,
            )
            if key is not None:
                info.defaulted[variant] = defaulted
        return defaulted, explicit

    def func_key(self, func: Callable[..., Any], info: _FuncInfo, name: str) -> str:
        key = self._func_keys.get(id(func))
        if key is None:
            key, data = info.pickle(func, name)
            self.functions[key] = data
            self._func_keys[id(func)] = key
        return key

    def compile(self, root: DAGNode) -> Plan:
        if not isinstance(root, DAGNode):
            raise TypeError(f"workflow.run() needs a Ray DAG (fn.bind(...)), got {root!r}")
        prepared: dict[str, tuple[DAGNode, bytes, list[Any], list[DAGNode], list[bool], list[bool]]]
        prepared = {}
        order: list[str] = []
        stack: list[tuple[DAGNode, bool]] = [(root, False)]
        while stack:
            node, expanded = stack.pop()
            uid = node.get_stable_uuid()
            if expanded:
                order.append(uid)
                continue
            if uid in prepared:
                continue
            prepared[uid] = self._prepare(node)
            stack.append((node, True))
            stack.extend(
                (child, False) for child in reversed(prepared[uid][3]) if isinstance(child, DAGNode)
            )
        task_ids: dict[str, str] = {}
        tasks: dict[str, TaskSpec] = {}
        root_uid = root.get_stable_uuid()
        for uid in order:
            node, args, refs, children, direct, nested = prepared[uid]
            is_output = uid == root_uid
            func = node._body
            info = _info(func)
            opts, explicit = self.options_of(info, node.get_options(), is_output)
            base = explicit or info.name
            task_id = self.allocator.allocate(base)
            task_ids[uid] = task_id
            tasks[task_id] = TaskSpec(
                task_id=task_id,
                base=base,
                name=info.qualname,
                func_key=self.func_key(func, info, task_id),
                args=args,
                arg_refs=refs,
                upstream=[
                    EXTERNAL + c.task_id
                    if isinstance(c, TaskHandle)
                    else task_ids[c.get_stable_uuid()]
                    for c in children
                ],
                direct=direct,
                nested=nested,
                options=opts,
                creator=self.creator,
                kind=info.kind,
            )
        return Plan(tasks, task_ids[root_uid], self.functions, dict(self.allocator.counters))

    def _prepare(
        self, node: DAGNode
    ) -> tuple[DAGNode, bytes, list[Any], list[Any], list[bool], list[bool]]:
        if not isinstance(node, FunctionNode):
            raise TypeError(
                f"Unsupported DAG node {type(node).__name__}: a workflow is built from Ray "
                "remote functions (fn.bind(...)); actors and class nodes are not supported."
            )
        func = node._body
        info = _info(func)
        name = info.name
        in_args, in_kwargs = self.inputs
        args = [_substitute_inputs(a, in_args, in_kwargs) for a in node.get_args()]
        kwargs = {
            k: _substitute_inputs(v, in_args, in_kwargs) for k, v in node.get_kwargs().items()
        }
        signature = info.signature
        arity = info.arity
        if signature is not None and (
            kwargs or arity is None or not arity[0] <= len(args) <= arity[1]
        ):
            try:
                signature.bind(*args, **kwargs)
            except TypeError as exc:
                raise TypeError(
                    f"Task {name!r}: the bound arguments do not match {func.__name__}"
                    f"{signature}: {exc}"
                ) from None
        children: list[Any] = []  # DAGNodes, and TaskHandles of the running workflow
        index: dict[str, int] = {}
        direct: list[bool] = []
        nested: list[bool] = []

        def upstream(child: Any, is_direct: bool) -> int:
            uid = (
                EXTERNAL + child.task_id
                if isinstance(child, TaskHandle)
                else child.get_stable_uuid()
            )
            i = index.get(uid)
            if i is None:
                i = index[uid] = len(children)
                children.append(child)
                direct.append(False)
                nested.append(False)
            if is_direct:
                direct[i] = True
            else:
                nested[i] = True
            return i

        def top(value: Any) -> Any:
            if isinstance(value, (DAGNode, TaskHandle)):
                return Up(upstream(value, True))
            if isinstance(value, ray.ObjectRef):
                return Deref(value)
            return value

        def hook(obj: Any) -> Any:
            if isinstance(obj, (DAGNode, TaskHandle)):
                return ("up", upstream(obj, False))
            return None

        payload = (tuple(top(a) for a in args), {k: top(v) for k, v in kwargs.items()})
        refs: list[Any] = []
        try:
            if all(type(v) in _PLAIN_ARGS for v in payload[0]) and all(
                type(v) in _PLAIN_ARGS for v in payload[1].values()
            ):
                data = pickle.dumps(payload, protocol=5)
            else:
                data, refs = serialization.dumps(payload, hook)
        except serialization.ActorHandleError as exc:
            raise TypeError(f"Task {name!r}: an argument is not allowed. {exc}") from None
        except Exception as exc:
            raise TypeError(
                f"Task {name!r}: an argument cannot be pickled ({type(exc).__name__}: {exc}). "
                "Workflow task arguments are checkpointed, so they must be picklable."
            ) from exc
        return node, data, refs, children, direct, nested


def compile_dag(
    dag: Any,
    args: tuple[Any, ...] = (),
    kwargs: dict[str, Any] | None = None,
    *,
    allocator: IdAllocator | None = None,
    checkpoint: bool = True,
    catch_exceptions: bool = False,
    creator: str = "",
) -> Plan:
    """Compile ``dag`` (fed by ``args``/``kwargs`` for its InputNode) into a :class:`Plan`."""
    compiler = _Compiler(
        allocator or IdAllocator(),
        (tuple(args), dict(kwargs or {})),
        checkpoint,
        catch_exceptions,
        creator,
    )
    return compiler.compile(dag)


__all__ = ["compile_dag"]
