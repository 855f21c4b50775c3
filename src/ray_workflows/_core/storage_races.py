"""The writers that the storage conformance suite races against one storage, in one
event loop or each in a process of its own.

Racers take one lease with ``put_if_absent`` and increment one counter with
``compare_and_set``; incrementers extend a chain with ``compare_and_set`` while a
plain writer keeps replacing and removing the same key: no successful write may be
lost. The process races start each racer as a fresh interpreter that opens the
storage from its URI through the plugin registry, as a Ray worker would.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import time
import traceback
from collections.abc import Callable
from typing import Any

from ray_workflows.storage import Storage

# The race of processes: each takes the lease if it can, then increments the counter.
PROCESSES = 8
INCREMENTS_PER_PROCESS = 5
# The race of compare_and_set against plain writes of the same key (see
# test_compare_and_set_races_plain_writes): writers that increment a chain with
# compare_and_set, and one writer that puts and removes the key with every plain write.
CHAIN_KEY = "race/chain/value"
_CHAIN_SIDE = "race/chain/side"
_CHAIN_PREFIX = "race/chain/"
CHAIN_WRITERS = 3
CHAIN_INCREMENTS = 12
_PLAIN_ROUNDS = 150
_PLAIN_PAUSE = 0.002


async def increment(storage: Storage, key: str) -> int:
    """Add one to the decimal counter at ``key`` with compare-and-set; return the new value."""
    while True:
        current = await storage.get(key)
        new = int(current or b"0") + 1
        if await storage.compare_and_set(key, current, str(new).encode()):
            return new


def _link(value: bytes) -> tuple[str, int]:
    """The root and the count of a value of the chain key: ``b"<root> <count> <writer>"``."""
    root, count, _ = value.decode().split(" ")
    return root, int(count)


async def chain_increments(storage: Storage, writer: str, increments: int) -> list[str]:
    """Extend the chain at the race key by ``increments`` successful compare_and_sets and
    return the values this writer stored. A value names its root (the plain put, or the
    compare_and_set from absent, that started its chain) and how many increments
    followed it, so of two values with the same root and count one replaced a value
    that another compare_and_set had already replaced."""
    stored: list[str] = []
    attempt = 0
    while len(stored) < increments:
        attempt += 1
        current = await storage.get(CHAIN_KEY)
        root, count = _link(current) if current is not None else (f"c:{writer}:{attempt}", 0)
        new = f"{root} {count + 1} {writer}:{attempt}"
        if await storage.compare_and_set(CHAIN_KEY, current, new.encode()):
            stored.append(new)
        await asyncio.sleep(0)  # let the other writers of this loop in
    return stored


async def plain_writes(
    storage: Storage, writer: str, stop: Callable[[], bool]
) -> tuple[int, list[str]]:
    """Replace and remove the race key with every plain write there is, in turn, until
    ``stop()`` (at most ``_PLAIN_ROUNDS`` rounds, so that the incrementers finish
    anyway); return the rounds made and the lost writes seen.

    This writer is the only one that puts, and the only one that removes. So right
    after its put of a new root, the key holds that root's chain (compare_and_set only
    extends what is there); right after it removed the key, the key is absent or holds
    a chain a compare_and_set started from absent. Anything else is a compare_and_set
    that read the value before the plain write and replaced it after: a lost write."""
    lost: list[str] = []
    removals: list[tuple[str, Callable[[], Any]]] = [
        ("delete", lambda: storage.delete(CHAIN_KEY)),
        ("delete_many", lambda: storage.delete_many([CHAIN_KEY, _CHAIN_SIDE])),
        ("discard_many", lambda: storage.discard_many([CHAIN_KEY])),
        ("delete_prefix", lambda: storage.delete_prefix(_CHAIN_PREFIX)),
    ]
    rounds = 0
    while rounds < _PLAIN_ROUNDS and not stop():
        root = f"p:{writer}:{rounds}"
        value = f"{root} 0 {writer}".encode()
        if rounds % 2:
            op = "put_many"
            await storage.put_many({CHAIN_KEY: value, _CHAIN_SIDE: value})
        else:
            op = "put"
            await storage.put(CHAIN_KEY, value)
        seen = await storage.get(CHAIN_KEY)
        if seen is None or _link(seen)[0] != root:
            lost.append(f"right after the {op} of {value!r} the key held {seen!r}")
        op, remove = removals[rounds % len(removals)]
        await remove()
        seen = await storage.get(CHAIN_KEY)
        if seen is not None and _link(seen)[0].startswith("p:"):
            lost.append(f"right after the {op} of {value!r} the key held {seen!r}")
        rounds += 1
        await asyncio.sleep(_PLAIN_PAUSE)  # let compare_and_sets succeed too
    return rounds, lost


def check_chains(stored: list[str], final: bytes | None) -> None:
    """Every successful compare_and_set of each chain replaced the one before it: the
    counts of a root are 1, 2, ... n, each once, and the key ends on the last of one."""
    counts: dict[str, list[int]] = {}
    for value in stored:
        root, count = _link(value.encode())
        counts.setdefault(root, []).append(count)
    for root, found in counts.items():
        assert sorted(found) == list(range(1, len(found) + 1)), (root, sorted(found))
    if final is not None:
        root, count = _link(final)
        assert count == len(counts.get(root, [])), (final, counts.get(root))


def _context() -> Any:
    # Each racer must be a fresh interpreter that opens the storage from its URI, as
    # a Ray worker would, not a fork of this one. A forkserver that has imported
    # this module once starts them in milliseconds; 'spawn' pays the import (Ray
    # included) in every racer, seconds each.
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx: Any = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload([__name__])
        return ctx
    return multiprocessing.get_context("spawn")


def race_processes(uri: str) -> list[tuple[int, bool]]:
    ctx = _context()
    barrier = ctx.Barrier(PROCESSES)
    queue = ctx.Queue()
    procs = [ctx.Process(target=_racer, args=(uri, barrier, queue)) for _ in range(PROCESSES)]
    for proc in procs:
        proc.start()
    try:
        results = [queue.get(timeout=120) for _ in procs]
    finally:
        _reap(procs)
    _no_errors(results)
    return [(int(pid), bool(won)) for pid, won in results]


def _reap(procs: list[Any]) -> None:
    for proc in procs:
        proc.join(timeout=30)
        if proc.is_alive():
            proc.kill()


def _no_errors(results: list[Any]) -> None:
    """The racers' reports hold no failure (a racer that failed reports its traceback)."""
    errors = [result for result in results if isinstance(result, str)]
    assert not errors, "\n".join(errors)


def _racer(uri: str, barrier: Any, queue: Any) -> None:
    try:
        from ray_workflows.storage import open_storage

        storage = open_storage(uri)

        async def race() -> bool:
            won = await storage.put_if_absent("race/lease", str(os.getpid()).encode())
            for _ in range(INCREMENTS_PER_PROCESS):
                await increment(storage, "race/counter")
            return won

        barrier.wait(timeout=120)
        queue.put((os.getpid(), asyncio.run(race())))
    except BaseException:
        queue.put(f"racer {os.getpid()} failed:\n{traceback.format_exc()}")


def race_chain_processes(uri: str) -> tuple[list[str], int, list[str]]:
    """Incrementers and the plain writer, each a process of its own; the values the
    incrementers stored, the plain writer's rounds and the lost writes it saw."""
    ctx = _context()
    barrier = ctx.Barrier(CHAIN_WRITERS + 1)
    stop = ctx.Event()
    queue = ctx.Queue()
    procs = [
        ctx.Process(target=_chain_racer, args=(uri, f"p{i}", barrier, stop, queue))
        for i in range(CHAIN_WRITERS)
    ]
    procs.append(ctx.Process(target=_chain_racer, args=(uri, None, barrier, stop, queue)))
    for proc in procs:
        proc.start()
    results: list[Any] = []
    try:
        deadline = time.monotonic() + 120
        while len(results) < len(procs):
            results.append(queue.get(timeout=max(0.0, deadline - time.monotonic())))
            if sum(1 for r in results if isinstance(r, list)) == CHAIN_WRITERS:
                stop.set()  # every incrementer is done: the plain writer may stop
            if isinstance(results[-1], str):
                stop.set()
    finally:
        stop.set()
        _reap(procs)
    _no_errors(results)
    chains = [value for result in results if isinstance(result, list) for value in result]
    ((rounds, lost),) = [result for result in results if isinstance(result, tuple)]
    return chains, rounds, lost


def _chain_racer(uri: str, writer: str | None, barrier: Any, stop: Any, queue: Any) -> None:
    # An incrementer (``writer`` names it) or, for ``None``, the plain writer.
    try:
        from ray_workflows.storage import open_storage

        storage = open_storage(uri)
        barrier.wait(timeout=120)
        if writer is None:
            queue.put(asyncio.run(plain_writes(storage, f"pid{os.getpid()}", stop.is_set)))
        else:
            queue.put(asyncio.run(chain_increments(storage, writer, CHAIN_INCREMENTS)))
    except BaseException:
        queue.put(f"racer {os.getpid()} failed:\n{traceback.format_exc()}")


__all__ = [
    "CHAIN_INCREMENTS",
    "CHAIN_KEY",
    "CHAIN_WRITERS",
    "INCREMENTS_PER_PROCESS",
    "PROCESSES",
    "chain_increments",
    "check_chains",
    "increment",
    "plain_writes",
    "race_chain_processes",
    "race_processes",
]
