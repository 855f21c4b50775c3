"""Event tasks: DAG nodes that wait inside the engine, not in a Ray worker.

``wait_for_event(listener, *args, **kwargs)`` and ``sleep(seconds)`` return
ordinary Ray DAG nodes (so they compose with ``.bind()`` like any task), whose
function is a marker the plan compiler recognises: the scheduler runs them as
coroutines in the engine's event loop, so a waiting workflow holds no Ray
worker and no CPU slot.

Exactly once, in this order (:func:`run_event`):

1. ``poll_for_event`` runs until it returns the event (again after a crash: the
   event was not committed, so it is polled again);
2. the event is committed as the task's output (durable);
3. ``event_checkpointed(event)`` is called. A crash between 2 and 3 calls it again
   after recovery (at least once), never ``poll_for_event``.

A sleep's absolute deadline is fixed the first time it starts (on the engine's
clock) and stored before it waits, so a restart keeps the original deadline.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from typing import Any

import ray
from ray.dag import DAGNode

from ray_workflows._core.events import EventContext, EventListener, use_context
from ray_workflows.plugins import LISTENER_GROUP, load

#: The listener spec of a sleep: its deadline is chosen by the engine, not the caller.
SLEEP = "ray_workflows.sleep"


def _event_marker(listener: Any, *args: Any, **kwargs: Any) -> Any:
    raise RuntimeError("an event task runs in the workflow engine, never as a Ray task")


def _wait_marker(*tasks: Any, num_returns: int = 1, timeout: float | None = None) -> Any:
    raise RuntimeError("a wait task runs in the workflow engine, never as a Ray task")


# The plan compiler gives tasks of these functions the kind named here.
_event_marker.__ray_workflows_kind__ = "event"  # type: ignore[attr-defined]
_wait_marker.__ray_workflows_kind__ = "wait"  # type: ignore[attr-defined]
_event_task = ray.remote(_event_marker)
_wait_task = ray.remote(_wait_marker)


def wait(tasks: Any, num_returns: int = 1, timeout: float | None = None) -> DAGNode:
    """A DAG node whose value is ``(ready, remaining)`` once ``num_returns`` of ``tasks``
    finished (or ``timeout`` seconds passed): the values of the finished ones, and
    handles of the others, which a continuation passes to ``workflow.wait`` again::

        @ray.remote
        def report(result):
            ready, remaining = result
            if not remaining:
                return ready
            return workflow.continuation(report.bind(workflow.wait(remaining)))

    The split is checkpointed: a resumed workflow sees the same one. Ready values are
    listed in the order of ``tasks``.
    """
    nodes = list(tasks) if isinstance(tasks, (list, tuple)) else [tasks]
    if not nodes:
        raise ValueError("workflow.wait() needs at least one task")
    if isinstance(num_returns, bool) or not isinstance(num_returns, int) or num_returns < 1:
        raise ValueError(f"num_returns must be a positive int, got {num_returns!r}")
    if num_returns > len(nodes):
        raise ValueError(f"num_returns={num_returns} is more than the {len(nodes)} tasks given")
    if timeout is not None and (
        isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout < 0
    ):
        raise ValueError(f"timeout must be None or a non-negative number, got {timeout!r}")
    node: DAGNode = _wait_task.options(name="wait").bind(
        *nodes, num_returns=num_returns, timeout=timeout
    )
    return node


def resolve_listener(listener: Any) -> type[EventListener]:
    """The listener class for a class or the name of a registered listener plugin."""
    if isinstance(listener, str):
        try:
            listener = load(LISTENER_GROUP, listener)
        except LookupError as exc:
            raise ValueError(f"Unknown event listener {listener!r}: {exc}") from None
    if not (isinstance(listener, type) and issubclass(listener, EventListener)):
        raise TypeError(
            f"wait_for_event needs an EventListener subclass (or the name of a registered "
            f"listener), got {listener!r}. Subclass ray_workflows.EventListener and "
            "implement `async def poll_for_event(self, ...)`."
        )
    return listener


def wait_for_event(listener: Any, *args: Any, **kwargs: Any) -> DAGNode:
    """A DAG node whose value is the event ``listener().poll_for_event(*args, **kwargs)``
    returns; tasks that take it as an argument run after the event.

    ``listener`` is an :class:`~ray_workflows.EventListener` subclass or the name of a
    listener registered in the ``ray_workflows.listeners`` entry-point group::

        event = workflow.wait_for_event("http", event_key="approved")
        workflow.run(handle.bind(event))
    """
    spec = listener if isinstance(listener, str) else None
    cls = resolve_listener(listener)
    node: DAGNode = _event_task.options(name=f"wait_for_event.{cls.__name__}").bind(
        spec or cls, *args, **kwargs
    )
    return node


def sleep(seconds: float) -> DAGNode:
    """A DAG node that completes ``seconds`` after it first starts (with value ``None``).
    The deadline is stored when the sleep starts, so a restart does not extend it."""
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
        raise TypeError(f"sleep() needs a number of seconds, got {seconds!r}")
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"sleep() needs a finite, non-negative number of seconds, got {seconds!r}")
    node: DAGNode = _event_task.options(name="sleep").bind(SLEEP, float(seconds))
    return node


async def run_event(
    ctx: EventContext,
    listener: Any,
    args: list[Any],
    kwargs: dict[str, Any],
    commit: Callable[[Any], Awaitable[None]],
    deadline: Callable[[float], Awaitable[float]],
) -> tuple[Any, type[EventListener]]:
    """Poll, then commit (``commit(event)`` must make it durable); return the event and
    the listener class, whose acknowledgement (:func:`acknowledge`) the caller owes."""
    if listener == SLEEP:
        from ray_workflows.listeners.timer import TimerListener

        cls: type[EventListener] = TimerListener
        args = [await deadline(float(args[0]))]
    else:
        cls = resolve_listener(listener)
    instance = cls()
    with use_context(ctx):
        if getattr(cls, "waits_on_clock", False):
            event = await instance.poll_for_event(*args, **kwargs)
        else:
            with ctx.clock.activity():
                event = await instance.poll_for_event(*args, **kwargs)
    await commit(event)
    return event, cls


async def acknowledge(ctx: EventContext, listener: Any, event: Any) -> None:
    """``event_checkpointed`` (at least once: also after a crash that came between the
    commit and this call)."""
    cls = listener if isinstance(listener, type) else resolve_listener(listener)
    with use_context(ctx):
        await cls().event_checkpointed(event)


__all__ = [
    "SLEEP",
    "acknowledge",
    "resolve_listener",
    "run_event",
    "sleep",
    "wait",
    "wait_for_event",
]
