"""Virtual actors (Ray 1.x): actors whose state lives in storage, not in a process.

::

    @workflow.virtual_actor
    class Counter:
        def __init__(self, start: int):
            self.count = start

        def incr(self, by: int = 1) -> int:
            self.count += by
            return self.count

        @workflow.virtual_actor.readonly
        def value(self) -> int:
            return self.count

    counter = Counter.get_or_create("counter-1", 0)
    assert counter.incr.run(2) == 2
    assert ray.get(counter.value.run_async()) == 2
    assert workflow.get_actor("counter-1").value.run() == 2

The state is the instance's ``__dict__``, which must be JSON, or what
``__getstate__`` returns (then ``__setstate__`` restores it; define both or neither),
which may be anything picklable: ObjectRefs in it are checkpointed as a task
output's are. Writer methods run one
at a time and each one's effect on the state is durable before its result returns;
readonly methods run concurrently on the last committed state. See
:mod:`ray_workflows._core.actors` for how calls are logged and recovered.
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Callable
from typing import Any

import ray
from ray import cloudpickle

from ray_workflows._core import bridge, client, config
from ray_workflows._core.actor_methods import READONLY as _READONLY
from ray_workflows._core.actor_methods import has_own
from ray_workflows._core.ids import check_id

# Ray options for the task of a call (``name``: only for one method).
_RAY_OPTIONS = ("num_cpus", "num_gpus", "resources", "memory", "accelerator_type")
# max_retries: how often a call that raised runs again (Ray 1.x's rule for steps);
# catch_exceptions: the call returns (result, None) or (None, exception).
_ENGINE_OPTIONS = ("max_retries", "catch_exceptions")
_CLASS_OPTIONS = _RAY_OPTIONS + _ENGINE_OPTIONS
_CALL_OPTIONS = _CLASS_OPTIONS + ("name",)


def _checked(options: dict[str, Any], valid: tuple[str, ...], what: str) -> dict[str, Any]:
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"Unknown option(s) {unknown} for {what}; valid: {list(valid)}.")
    retries = options.get("max_retries", 0)
    if type(retries) is not int or retries < -1:
        raise ValueError(
            f"max_retries for {what} must be an int >= 0 (or -1 for unlimited), got {retries!r}."
        )
    if type(options.get("catch_exceptions", False)) is not bool:
        raise ValueError(
            f"catch_exceptions for {what} must be True or False, "
            f"got {options['catch_exceptions']!r}."
        )
    return options


class VirtualActorClass:
    """A class decorated with ``@workflow.virtual_actor``."""

    def __init__(self, cls: type, options: dict[str, Any] | None = None) -> None:
        if not isinstance(cls, type):
            raise TypeError(f"@workflow.virtual_actor decorates a class, got {cls!r}")
        if has_own(cls, "__getstate__") != has_own(cls, "__setstate__"):
            raise ValueError(
                f"Virtual actor class {cls.__qualname__} defines only one of __getstate__ "
                "and __setstate__; define both (the state they exchange may be anything "
                "picklable) or neither (the instance's __dict__, which must be JSON, is "
                "the state)."
            )
        self._cls = cls
        self._bytes = bytes(cloudpickle.dumps(cls))
        self._options = options or {}

    def options(self, **options: Any) -> VirtualActorClass:
        """The class with options for the actors it creates: Ray resource options
        (``num_cpus``, ``num_gpus``, ``resources``, ``memory``, ``accelerator_type``) for
        the tasks of ``__init__`` and of every call, and the defaults of every call's
        ``max_retries`` and ``catch_exceptions``. Like ``__init__``'s arguments, they are
        stored with a new actor and ignored for an existing one.

        >>> Counter.options(num_cpus=0.5, max_retries=2).get_or_create("c1", 0)
        """
        what = f"{self._cls.__qualname__}.options(...)"
        merged = {**self._options, **_checked(options, _CLASS_OPTIONS, what)}
        copy = VirtualActorClass.__new__(VirtualActorClass)
        copy._cls, copy._bytes, copy._options = self._cls, self._bytes, merged
        return copy

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(
            f"A virtual actor is not created by calling its class: use "
            f"{self._cls.__qualname__}.get_or_create(actor_id, ...)."
        )

    def get_or_create(self, actor_id: str, *args: Any, **kwargs: Any) -> VirtualActor:
        """The actor stored as ``actor_id``; if there is none, one made with
        ``__init__(*args, **kwargs)`` (the arguments are ignored for an existing one)."""
        check_id(actor_id)
        init = cloudpickle.dumps((args, kwargs))
        ready = _manager().actor_create.remote(actor_id, self._bytes, init, self._options)
        return VirtualActor(actor_id, self._cls, ready)


class VirtualActor:
    """A handle of a virtual actor: ``actor.method.run(...)``, ``.run_async(...)``."""

    def __init__(self, actor_id: str, cls: type, ready: ray.ObjectRef[Any]) -> None:
        self.actor_id = actor_id
        self._cls = cls
        self._ready = ready
        self._created = False
        # Writer calls made through this handle run in the order they were made.
        self._caller = uuid.uuid4().hex
        self._writes = itertools.count()

    def ready(self) -> ray.ObjectRef[Any]:
        """An ObjectRef that resolves once the actor exists and is initialised."""
        return self._ready

    def _wait_created(self) -> None:
        # The first call waits for get_or_create: the manager may start calls of one
        # caller in any order, so a call could otherwise find no actor yet.
        if not self._created:
            bridge.run(client.get(self._ready))
            self._created = True

    def __getattr__(self, name: str) -> ActorMethod:
        if name.startswith("_"):
            raise AttributeError(name)
        method = getattr(self._cls, name, None)
        if not callable(method):
            raise AttributeError(
                f"Virtual actor class {self._cls.__qualname__} has no method {name!r}"
            )
        return ActorMethod(self, name, bool(getattr(method, _READONLY, False)), {})


class ActorMethod:
    """``actor.method``: run it with ``.run(...)`` or ``.run_async(...)``."""

    def __init__(
        self, actor: VirtualActor, name: str, readonly: bool, options: dict[str, Any]
    ) -> None:
        self._actor, self._name, self._readonly, self._options = actor, name, readonly, options

    def options(self, **options: Any) -> ActorMethod:
        """The same method with options for its calls: Ray resource options for its task
        (``num_cpus``, ``num_gpus``, ``resources``, ``memory``, ``accelerator_type``,
        ``name``), ``max_retries`` (how often a call that raised runs again, on the
        state it started from; default 0) and ``catch_exceptions`` (the call returns
        ``(result, None)`` or ``(None, exception)``).

        >>> counter.incr.options(max_retries=3).run()
        """
        what = f"virtual actor method {self._name!r}"
        checked = _checked(options, _CALL_OPTIONS, what)
        return ActorMethod(self._actor, self._name, self._readonly, {**self._options, **checked})

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(
            f"Call a virtual actor method with .run(...) or .run_async(...): "
            f"{self._actor.actor_id}.{self._name}.run(...)"
        )

    def run_async(self, *args: Any, **kwargs: Any) -> ray.ObjectRef[Any]:
        """Call the method; an ObjectRef of its result."""
        actor = self._actor
        actor._wait_created()
        call = cloudpickle.dumps((args, kwargs))
        order = None if self._readonly else (actor._caller, next(actor._writes))
        ref: ray.ObjectRef[Any] = _manager().actor_call.remote(
            actor.actor_id, uuid.uuid4().hex, self._name, call, self._readonly, self._options, order
        )
        return ref

    def run(self, *args: Any, **kwargs: Any) -> Any:
        """Call the method and return its result (or raise its exception)."""
        return bridge.run(client.get(self.run_async(*args, **kwargs)))


def _manager() -> Any:
    return bridge.run(config.manager())


def get_actor(actor_id: str) -> VirtualActor:
    """A handle of the stored virtual actor ``actor_id``, from any process."""
    check_id(actor_id)
    ready = _manager().actor_class.remote(actor_id)  # resolves once the actor is loaded
    actor = VirtualActor(actor_id, cloudpickle.loads(bridge.run(client.get(ready))), ready)
    actor._created = True
    return actor


class _VirtualActorDecorator:
    """``@workflow.virtual_actor`` on a class; ``@workflow.virtual_actor.readonly`` on
    a method that does not change the state (it runs without being logged)."""

    def __call__(self, cls: type) -> VirtualActorClass:
        return VirtualActorClass(cls)

    @staticmethod
    def readonly(method: Callable[..., Any]) -> Callable[..., Any]:
        if not callable(method):
            raise TypeError(f"@workflow.virtual_actor.readonly decorates a method, got {method!r}")
        setattr(method, _READONLY, True)
        return method


virtual_actor = _VirtualActorDecorator()

__all__ = ["ActorMethod", "VirtualActor", "VirtualActorClass", "get_actor", "virtual_actor"]
