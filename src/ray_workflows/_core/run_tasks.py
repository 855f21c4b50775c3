"""The coroutines of one run, and who owns them.

Every coroutine a run starts (a receipt being dealt with, an event or wait task, an
event's acknowledgement, a wait's timeout) starts in one anyio task group that the
run opens when it starts and closes when it ends (:meth:`RunTasks.run`): none outlives
the run, and none is created without an owner that awaits or cancels it. Each gets a
cancel scope of its own, for the cases where one alone must stop.

Coroutines started before the run does (a recovered wait's timeout, while the run is
being rebuilt) wait for the group; once the run is over, nothing starts.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

import anyio
import anyio.abc

_T = TypeVar("_T")


class RunTasks:
    """The task group of one run, and the acknowledgements it waits for."""

    def __init__(self) -> None:
        self._group: anyio.abc.TaskGroup | None = None
        self._early: list[tuple[anyio.CancelScope, Awaitable[None]]] = []
        self._ended = False  # the run is over: nothing starts any more
        self.acks = 0  # event acknowledgements under way
        self._acked: anyio.Event | None = None  # set when the last of them ended

    async def run(self, body: Callable[[], Awaitable[_T]], stop: Callable[[], None]) -> _T:
        """Open the group, run ``body`` in it, then ``stop()`` and cancel what is left
        in the group. ``body``'s error is raised as it is, not in an exception group."""
        error: Exception | None = None
        result: _T | None = None
        try:
            async with anyio.create_task_group() as group:
                self._group = group
                for scope, coro in self._early:
                    group.start_soon(_within, scope, coro)
                self._early.clear()
                try:
                    result = await body()
                except Exception as exc:
                    error = exc
                finally:
                    stop()
                    group.cancel_scope.cancel()
        finally:
            self._ended, self._group = True, None
        if error is not None:
            raise error
        return result  # type: ignore[return-value]

    def spawn(self, coro: Awaitable[None]) -> anyio.CancelScope:
        """Start ``coro`` in the group (once the run has one); the scope returned
        cancels it alone. After the run, ``coro`` is closed unstarted."""
        scope = anyio.CancelScope()
        if self._ended:
            close = getattr(coro, "close", None)
            if close is not None:
                close()  # never awaited, and says nothing of it
        elif self._group is None:
            self._early.append((scope, coro))
        else:
            self._group.start_soon(_within, scope, coro)
        return scope

    def acknowledging(self, coro: Awaitable[None]) -> None:
        """Start an event's acknowledgement, which the run waits for before it ends
        (:meth:`acknowledged`)."""
        self.acks += 1

        async def counted() -> None:
            try:
                await coro
            finally:
                self.acks -= 1
                if not self.acks and self._acked is not None:
                    self._acked.set()

        self.spawn(counted())

    async def acknowledged(self) -> None:
        """Wait until no acknowledgement is under way."""
        while self.acks:
            self._acked = anyio.Event()
            await self._acked.wait()


async def _within(scope: anyio.CancelScope, coro: Awaitable[None]) -> None:
    with scope:
        await coro


__all__ = ["RunTasks"]
