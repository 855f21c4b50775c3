"""Events: the listener contract and the context a listener polls in.

A listener is a class whose ``poll_for_event`` coroutine returns once its event
has happened. The engine runs it as an asyncio task in the manager's loop (no
Ray worker and no CPU is held while it waits), checkpoints the value it returns
as the task's output, and only then calls ``event_checkpointed``::

    class OrderPaid(EventListener):
        async def poll_for_event(self, order_id):
            ctx = current_context()
            _, payload = await ctx.mailbox.claim(ctx.workflow_id, f"paid-{order_id}", ctx.task_id)
            return payload

Events sent with ``send_event`` land in the workflow's
:class:`~ray_workflows._core.mailbox.Mailbox`, kept durably in its storage until a
task has claimed and checkpointed them. The suite every listener passes is
``ray_workflows.testing.ListenerConformance``.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

from ray_workflows._core.mailbox import Mailbox
from ray_workflows.clock import Clock
from ray_workflows.exceptions import WorkflowError
from ray_workflows.storage import Storage


class NoEventContextError(WorkflowError, RuntimeError):
    """``current_context()`` was called outside a listener's ``poll_for_event``."""


class EventListener:
    """Base class of event listeners (the ``ray.workflow.EventListener`` of Ray 2.47).

    Listeners are stateless: the engine creates a new instance, with no
    arguments, for each call, and never pickles an instance (the class must be
    importable or picklable by value, like a Ray task's function).
    """

    #: True for a listener whose event is a time on ``current_context().clock`` (the
    #: timer). The engine marks every other poll as an activity of the clock, and a
    #: virtual clock only skips time while nothing but such listeners wait.
    waits_on_clock: ClassVar[bool] = False

    def __init__(self) -> None:
        """Optional constructor. It takes no arguments."""

    async def poll_for_event(self, *args: Any, **kwargs: Any) -> Any:
        """Return the event once it has happened; the engine checkpoints the result.

        Runs as an asyncio task in the manager's event loop: await, never block
        (use ``asyncio.to_thread`` for blocking calls). It may be cancelled (the
        workflow was canceled or the manager stops) and is then polled again,
        with the same arguments and task id, when the workflow resumes.
        :func:`current_context` gives the workflow id, task id, storage, clock
        and mailbox.
        """
        raise NotImplementedError(f"{type(self).__qualname__} must implement poll_for_event()")

    async def event_checkpointed(self, event: Any) -> None:
        """Optional: called after ``event`` has been checkpointed, to commit it upstream
        (acknowledge a message, delete a file).

        At least once: a crash after the checkpoint and before this call returns
        makes the resumed workflow call it again with the same event, and never
        poll again. Make it idempotent.
        """


@dataclass(frozen=True)
class EventContext:
    """What a listener's ``poll_for_event`` runs with; see :func:`current_context`."""

    workflow_id: str
    task_id: str
    storage: Storage
    clock: Clock
    mailbox: Mailbox


_context: contextvars.ContextVar[EventContext | None] = contextvars.ContextVar(
    "ray_workflows_event_context", default=None
)


def current_context() -> EventContext:
    """The context of the listener poll running in this asyncio task."""
    ctx = _context.get()
    if ctx is None:
        raise NoEventContextError(
            "current_context() is only available inside EventListener.poll_for_event() "
            "and event_checkpointed() while a workflow runs them. To call a listener "
            "yourself, wrap the call in `with use_context(EventContext(...)):`."
        )
    return ctx


def context_or_none() -> EventContext | None:
    """The current listener context, or ``None`` outside a listener poll."""
    return _context.get()


@contextlib.contextmanager
def use_context(ctx: EventContext) -> Iterator[EventContext]:
    """Make ``ctx`` current in this block. A task created inside it (``create_task``
    copies the context) keeps it for its whole life::

        with use_context(ctx):
            poll = asyncio.create_task(listener.poll_for_event(*args, **kwargs))
    """
    token = _context.set(ctx)
    try:
        yield ctx
    finally:
        _context.reset(token)


__all__ = [
    "EventContext",
    "EventListener",
    "NoEventContextError",
    "context_or_none",
    "current_context",
    "use_context",
]
