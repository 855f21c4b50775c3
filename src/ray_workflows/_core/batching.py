"""Batching: quick ready tasks share a Ray task while the CPUs are busy.

The executor offers a quick task (or fused pair) whose inputs all exist to its
:class:`Batcher`. While as many offered Ray tasks run as the cluster has CPUs, the
batcher holds it, and sends what it holds together in one Ray task once a CPU frees
(a dispatch costs more than a quick task), or after :data:`HOLD_SECONDS` at the latest.
A :class:`Submission` is the unit it (and the executor) sends.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import math
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import ray

from ray_workflows._core.receipts import ReceiptWatcher, cancel_ray_task
from ray_workflows._core.wire import Attempt

# Quick ready tasks wait at most this long for a free CPU, then go anyway (see offer()).
HOLD_SECONDS = 0.005
MAX_BATCH = 32  # tasks (or pairs) per batch...
BATCH_SECONDS = 0.02  # ...and what their last attempts took, together, at most
_BATCH_NAME = "ray_workflows.batch"
_CPUS_REFRESH = 10.0  # seconds between looks at the cluster's CPU count


@dataclasses.dataclass
class Submission:
    """One unit for a Ray task (see :mod:`ray_workflows._core.wire`): an attempt, or a fused
    pair, with its input values, and whom to tell its refs (2, or 4 for a pair;
    ``batched`` if it went with others; ``later`` if not from within ``offer``)."""

    name: str
    attempts: tuple[Attempt, ...]
    values: tuple[Any, ...]
    split: int  # a pair: how many of the values are the producer's
    slot: int  # a pair: the consumer's input that is the producer's output
    deliver: Callable[[tuple[Any, ...], bool, bool], None]
    alive: Callable[[], bool]
    fail: Callable[[BaseException], None]  # it could not be submitted later on
    seconds: float  # what its last attempt took


@dataclasses.dataclass
class _Batch:
    ref: Any  # a ref of its Ray task
    wanted: int  # attempts in it whose runs still wait for them


def _take_batch(held: list[Submission], size: int) -> tuple[list[Submission], list[Submission]]:
    """The first batch of ``held`` (at most ``size``, and BATCH_SECONDS together), and
    the rest."""
    total, n = 0.0, 0
    for sub in held[:size]:
        total += sub.seconds
        if n and total > BATCH_SECONDS:
            break
        n += 1
    return held[:n], held[n:]


class Batcher:
    """Holds quick ready submissions while the CPUs are busy and sends them in batches
    (see :meth:`offer`). ``group`` sends submissions as one Ray task (under a name, with
    Ray options) and returns the refs of each; ``receipts`` says when one finished."""

    def __init__(
        self,
        group: Callable[[list[Submission], str, dict[str, Any]], list[tuple[Any, ...]]],
        receipts: ReceiptWatcher,
    ) -> None:
        self._group = group
        self._receipts = receipts
        # Ray tasks of offered submissions not finished yet, the submissions held
        # meanwhile, and the cluster's CPU count.
        self._sent = 0
        self._held: list[Submission] = []
        self._hold_timer: asyncio.TimerHandle | None = None
        self._cpus: int | None = None
        self._cpus_at = -math.inf
        self._batches: dict[Any, _Batch] = {}  # receipt ref of a batched attempt -> batch
        self.cpus: int | None = None  # the CPUs to plan batches for; None: the cluster's

    def offer(self, sub: Submission) -> bool:
        """Submit a quick task (or pair) whose inputs all exist, with Ray's default
        options. While as many offered Ray tasks run as the cluster has CPUs, it is
        held instead, to go with the others held meanwhile in one Ray task once a CPU
        frees (a dispatch costs more than a quick task), or after
        :data:`HOLD_SECONDS` at the latest. True if it was submitted now."""
        if not self._held and self._sent < self._capacity():
            self._send([sub], later=False)
            return True
        self._held.append(sub)
        self._arm()
        return False

    def _arm(self) -> None:
        # Held submissions go after HOLD_SECONDS at the latest.
        if self._hold_timer is None:
            loop = asyncio.get_running_loop()
            self._hold_timer = loop.call_later(HOLD_SECONDS, self._release, True)

    def _capacity(self) -> int:
        """The CPUs to fill before holding (no limit until the cluster's are known).
        Looked up in a thread: the GCS may be slow to answer, the loop must not wait."""
        if self.cpus is not None:
            return self.cpus
        now = time.monotonic()
        if now - self._cpus_at > _CPUS_REFRESH:
            self._cpus_at = now
            threading.Thread(target=self._count_cpus, name="rwf-cpus", daemon=True).start()
        return self._cpus or sys.maxsize

    def _count_cpus(self) -> None:
        try:
            cpus = ray.cluster_resources().get("CPU")
        except Exception:  # keep the last count
            return
        self._cpus = max(1, int(cpus)) if cpus else None

    def _release(self, due: bool = False) -> None:
        """Send what is held: as batches into the CPUs free now, or all of it once the
        oldest has waited long enough (``due``)."""
        if due:  # the timer that called: spent
            self._hold_timer = None
        held = [sub for sub in self._held if sub.alive()]
        self._held = []
        try:
            capacity = self._capacity()
            free = capacity - self._sent
            if free > 0 or due:
                count = free if not due else max(free, min(capacity, len(held)))
                size = min(MAX_BATCH, math.ceil(len(held) / max(count, 1)))
                while held and (count > 0 or due):
                    batch, held = _take_batch(held, size)
                    count -= 1
                    self._send(batch, later=True)
        finally:
            self._held = held + self._held
        if not self._held and self._hold_timer is not None:
            self._hold_timer.cancel()
            self._hold_timer = None
        elif self._held:
            self._arm()

    def _send(self, subs: list[Submission], later: bool) -> None:
        """One Ray task for ``subs``; each is told its refs. From within ``offer`` a
        failure raises; later, each submission that it reaches is failed instead."""
        try:
            # One name per size: the dashboard shows batches as such.
            name = subs[0].name if len(subs) == 1 else _BATCH_NAME
            groups = self._group(subs, name, {})
        except Exception as exc:
            if not later:
                raise
            for sub in subs:
                sub.fail(exc)
            return
        first = groups[0][0]
        if self._receipts.available(first):  # else not counted: held ones wait less
            self._sent += 1
            self._receipts.watch(first, functools.partial(self._landed, [g[0] for g in groups]))
        if len(subs) > 1:
            batch = _Batch(first, len(subs))
            for refs in groups:
                self._batches[refs[0]] = batch
        for sub, refs in zip(subs, groups, strict=True):
            try:
                sub.deliver(refs, len(subs) > 1, later)
            except Exception as exc:
                if not later:
                    raise
                sub.fail(exc)

    def _landed(self, receipts: list[Any], _result: Any) -> Callable[[], None] | None:
        # One of the offered Ray tasks finished (or died): a CPU is free.
        self._sent -= 1
        for ref in receipts:
            self._batches.pop(ref, None)
        return self._release if self._held else None

    def abandon(self, receipt: Any) -> None:
        """The run of a batched attempt (its receipt ref) ended before it: the batch
        is cancelled once no attempt in it is wanted any more."""
        batch = self._batches.pop(receipt, None)
        if batch is not None:
            batch.wanted -= 1
            if batch.wanted == 0:
                cancel_ray_task(batch.ref)


__all__ = ["BATCH_SECONDS", "HOLD_SECONDS", "MAX_BATCH", "Batcher", "Submission"]
