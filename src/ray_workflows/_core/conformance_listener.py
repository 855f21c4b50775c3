"""The conformance suite for event listener plugins: what every listener must do.

Plugin authors import it as ``ray_workflows.testing.ListenerConformance``.
"""

from __future__ import annotations

import asyncio
from typing import Any, ClassVar

from ray_workflows._core import serialization
from ray_workflows._core.events import EventContext, EventListener, use_context
from ray_workflows._core.mailbox import Mailbox


class ListenerConformance:
    """Tests every event listener passes. Subclass it in a test module (the tests are
    ``async def``: pytest-asyncio in auto mode), set ``listener`` and implement
    :meth:`arguments` and :meth:`trigger`::

        from ray_workflows.testing import ListenerConformance

        class TestQueueListener(ListenerConformance):
            listener = QueueListener

            def arguments(self, ctx):
                return ("orders",), {}

            async def trigger(self, ctx, args, kwargs):
                await put_message("orders", "hello")

    Each test polls in a real :class:`EventContext` on a fresh file storage under
    pytest's ``tmp_path``, with a :class:`~ray_workflows.backends.clocks.VirtualClock`.
    Until the trigger has run the test holds ``clock.activity()``, so a listener
    that waits for a deadline on the context's clock is reached by the clock's
    jump only after the trigger.
    """

    listener: ClassVar[type[EventListener]]
    #: Real seconds a poll must keep waiting before the trigger.
    quiet_seconds: ClassVar[float] = 0.2
    #: Real seconds a poll may take to return after the trigger.
    timeout_seconds: ClassVar[float] = 10.0

    def arguments(self, ctx: EventContext) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The ``(args, kwargs)`` of ``poll_for_event``."""
        return (), {}

    async def trigger(
        self, ctx: EventContext, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        """Make the event that the poll with these arguments waits for happen."""
        raise NotImplementedError

    def check_event(self, ctx: EventContext, event: Any) -> None:
        """Optional: assert on the event a poll returned."""

    def make_context(
        self, path: Any, workflow_id: str = "wf", task_id: str = "task"
    ) -> EventContext:
        from ray_workflows.backends.clocks import VirtualClock
        from ray_workflows.storage import open_storage

        storage = open_storage(str(path))
        return EventContext(workflow_id, task_id, storage, VirtualClock(), Mailbox(storage))

    async def _triggered_event(self, tmp_path: Any) -> tuple[EventContext, Any]:
        ctx = self.make_context(tmp_path / "storage")
        args, kwargs = self.arguments(ctx)
        with ctx.clock.activity():
            with use_context(ctx):
                poll = asyncio.create_task(self.listener().poll_for_event(*args, **kwargs))
            await asyncio.sleep(self.quiet_seconds)
            if poll.done():
                poll.result()  # raises what the poll raised
                raise AssertionError("poll_for_event returned before its event happened")
            await self.trigger(ctx, args, kwargs)
        event = await asyncio.wait_for(poll, self.timeout_seconds)
        self.check_event(ctx, event)
        return ctx, event

    async def test_is_an_event_listener(self) -> None:
        import pickle

        assert isinstance(self.listener, type) and issubclass(self.listener, EventListener)
        self.listener()  # constructed with no arguments
        assert serialization.loads(serialization.dumps(self.listener)[0], []) is not None
        # A class of an importable module pickles by reference: the manager imports it.
        if self.listener.__module__ != "__main__":
            assert pickle.loads(pickle.dumps(self.listener)) is self.listener

    async def test_poll_waits_for_its_event(self, tmp_path: Any) -> None:
        await self._triggered_event(tmp_path)

    async def test_event_is_checkpointable(self, tmp_path: Any) -> None:
        _, event = await self._triggered_event(tmp_path)
        data, refs = serialization.dumps(event)
        assert not refs, "an event must not hold ObjectRefs: it is checkpointed"
        serialization.loads(data, [])

    async def test_event_checkpointed_is_repeatable(self, tmp_path: Any) -> None:
        ctx, event = await self._triggered_event(tmp_path)
        with use_context(ctx):  # at least once: a resumed workflow may call it again
            await self.listener().event_checkpointed(event)
            await self.listener().event_checkpointed(event)

    async def test_poll_can_be_cancelled(self, tmp_path: Any) -> None:
        ctx = self.make_context(tmp_path / "storage")
        args, kwargs = self.arguments(ctx)
        with ctx.clock.activity():
            with use_context(ctx):
                poll = asyncio.create_task(self.listener().poll_for_event(*args, **kwargs))
            await asyncio.sleep(self.quiet_seconds / 2)
            poll.cancel()
            done, _ = await asyncio.wait([poll], timeout=self.timeout_seconds)
        assert done and poll.cancelled(), "poll_for_event must not swallow cancellation"


__all__ = ["ListenerConformance"]
