"""Receipts: how the runner hears that Ray tasks ended, in batches."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import threading
from collections.abc import Callable
from typing import Any

import ray

from ray_workflows._core.log import get_logger


class ReceiptWatcher:
    """Hands task receipts from Ray to the event loop in batches.

    Awaiting each receipt's ObjectRef costs a coroutine, two futures and a wake-up
    of the loop per task. Here Ray's completion callback queues the receipt, and the
    loop is woken once for everything queued meanwhile. Whatever a delivery returns
    (a run's submit flush) is called once per batch, after every delivery."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: collections.deque[tuple[Callable[[Any], Any], Any]] = collections.deque()
        self._lock = threading.Lock()
        self._woken = False
        self.log = get_logger()

    @staticmethod
    def available(ref: Any) -> bool:
        return hasattr(ref, "_on_completed")

    def watch(self, ref: Any, deliver: Callable[[Any], Callable[[], None] | None]) -> None:
        """Call ``deliver(result)`` on this loop once ``ref`` is ready; ``result`` is its
        value, or the RayError it holds."""
        self._loop = asyncio.get_running_loop()
        ref._on_completed(functools.partial(self._arrived, deliver))

    def _arrived(self, deliver: Callable[[Any], Any], result: Any) -> None:  # Ray's thread
        with self._lock:
            self._queue.append((deliver, result))
            if self._woken:
                return
            self._woken = True
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # the loop closed: nobody is waiting
            self._loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        with self._lock:
            batch, self._queue = self._queue, collections.deque()
            self._woken = False
        after: dict[Callable[[], None], None] = {}  # bound methods: one per run
        for deliver, result in batch:
            try:
                then = deliver(result)
            except Exception:
                self.log.exception("scheduler.receipt_error")
                continue
            if then is not None:
                after[then] = None
        for then in after:
            try:
                then()
            except Exception:
                self.log.exception("scheduler.receipt_error")


def cancel_ray_task(ref: Any) -> None:
    try:
        ray.cancel(ref, force=True)
    except Exception:  # already finished, or its worker is gone
        pass


__all__ = ["ReceiptWatcher", "cancel_ray_task"]
