"""What task attempts do inside a Ray worker.

The runner submits :func:`execute_group` as an ordinary Ray task (with the
tasks' own Ray options, Ray's retries off), for one attempt, a fused pair or a
batch of quick attempts (:mod:`ray_workflows._core.wire`). For each attempt the worker
resolves the arguments,
runs the user function and checkpoints a value result: a big output is written
here, by the worker, so it never travels through the engine; a small one goes
back in the receipt and the engine commits it with others in one write. It
returns two things: a small :class:`Receipt` for the engine and the output value,
which downstream tasks receive through Ray's object store.

This module runs the group: its units one after another, a fused pair back to
back, with the producer's output written in the background if the consumer runs
long. One attempt is :func:`ray_workflows._core.attempts.execute_attempt`; the
objects and stored outputs a worker reads and writes are in
:mod:`ray_workflows._core.checkpoints`.
"""

from __future__ import annotations

import contextlib
import pickle
import threading
import time
from typing import Any

from ray_workflows._core import bridge, serialization
from ray_workflows._core.attempts import execute_attempt
from ray_workflows._core.signing import open_ref
from ray_workflows._core.store import task_key
from ray_workflows._core.wire import UNAVAILABLE, Attempt, Receipt, Unit

#: In a fused pair (see :func:`_pair`), the producer's small output travels with
#: the consumer's receipt; if the consumer is still running this long after the
#: producer finished, the worker writes that output itself instead.
FUSED_FLUSH_SECONDS = 0.02


def execute_group(units: tuple[Unit, ...], packed: bytes, *args: Any) -> tuple[Any, ...]:
    """The one entry point: run a group of units (see :mod:`ray_workflows._core.wire`) one
    after another in this Ray task; return each attempt's receipt and output value,
    in order. The runner submits one of these per single task, fused pair or batch of
    quick tasks that its placement chose."""
    plain = iter(pickle.loads(packed))
    out: list[Any] = []
    at = 0
    for unit in units:
        if unit.packed:
            attempts: tuple[Attempt, ...] = next(plain)
        else:
            n = 4 * unit.attempts
            fields = args[at : at + n]
            attempts = tuple(Attempt(*fields[i : i + 4]) for i in range(0, n, 4))
            at += n
        values = args[at : at + unit.values]
        at += unit.values
        if unit.attempts == 1:
            receipt, value = execute_attempt(attempts[0], values)
            out += (receipt.wire(), value)
        else:
            out += _pair(attempts[0], attempts[1], unit.split, unit.slot, values)
    return tuple(out)


def _pair(
    first: Attempt, then: Attempt, split: int, slot: int, values: tuple[Any, ...]
) -> tuple[Any, ...]:
    """A producer and its only consumer back to back (one submission and one worker
    dispatch instead of two). ``values[:split]`` are the producer's inputs, the rest
    the consumer's, whose input ``slot`` is the producer's output. A producer that
    fails or continues hands the consumer ``UNAVAILABLE``, so it skips, exactly as a
    consumer submitted ahead does."""
    receipt, value = execute_attempt(first, values[:split])
    inputs = list(values[split:])
    inputs[slot] = UNAVAILABLE
    if receipt.pickled is not None:  # a value: every value receipt carries its pickle
        with contextlib.suppress(Exception):  # a value that will not copy goes through Ray
            inputs[slot] = _copy(value, receipt.pickled)
    flush = _Flush(first.header, receipt) if receipt.record is not None else None
    try:
        then_receipt, then_value = execute_attempt(then, tuple(inputs))
    finally:
        if flush is not None:
            flush.cancel()
    return receipt.wire(), value, then_receipt.wire(), then_value


_IMMUTABLE = (int, float, complex, str, bytes, bool, type(None))


def _copy(value: Any, pickled: tuple[bytes, list[Any]]) -> Any:
    """What Ray would hand a consumer: a copy, so its changes do not reach the
    producer's output (returned after the consumer ran), unpickled from the bytes
    the producer's record was made of."""
    if type(value) in _IMMUTABLE:
        return value
    return serialization.loads(*pickled)


class _Flush:
    """Writes a fused producer's output record itself once the consumer has run for
    :data:`FUSED_FLUSH_SECONDS` (then the receipt carries no record, as for a big
    output): a long consumer does not leave a finished output unsaved for long."""

    def __init__(self, header: bytes, receipt: Receipt) -> None:
        fields = pickle.loads(header)
        wid, tid, uri, epoch = fields[0], fields[1], fields[2], fields[-1]
        self.storage, self.receipt = open_ref(uri), receipt
        self.key = task_key(wid, tid, "out", epoch)
        self.lock = threading.Lock()
        self.cancelled = False
        if self.storage.shared:  # the engine alone can write to a storage that is not
            _flusher.add(self)

    def write(self) -> None:
        with self.lock:
            record = self.receipt.record
            if self.cancelled or record is None:
                return
            try:
                bridge.run(self.storage.put(self.key, record))
            except Exception:  # the engine commits it from the receipt, as usual
                return
            self.receipt.record = None

    def cancel(self) -> None:
        _flusher.discard(self)
        with self.lock:  # a write under way ends first: the receipt then says so
            self.cancelled = True


class _Flusher:
    """One thread per worker process that runs the :class:`_Flush` writes that
    come due (a thread per fused pair would cost more than the pair saves)."""

    def __init__(self) -> None:
        self._due: dict[_Flush, float] = {}
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None

    def add(self, flush: _Flush) -> None:
        with self._cond:
            self._due[flush] = time.monotonic() + FUSED_FLUSH_SECONDS
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="ray-workflows-flush", daemon=True
                )
                self._thread.start()
            self._cond.notify()

    def discard(self, flush: _Flush) -> None:
        with self._cond:
            self._due.pop(flush, None)

    def _run(self) -> None:
        while True:
            with self._cond:
                now = time.monotonic()
                ready = [f for f, at in self._due.items() if at <= now]
                for f in ready:
                    del self._due[f]
                if not ready:
                    wait = min(self._due.values(), default=now + 3600) - now
                    self._cond.wait(wait)
                    continue
            for f in ready:
                f.write()


_flusher = _Flusher()


__all__ = ["execute_group"]
