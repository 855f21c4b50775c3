"""The storage conformance suite: every rule of :class:`~ray_workflows.storage.Storage`.

A plugin author subclasses :class:`StorageConformance` in a test module and
provides a ``storage`` fixture that yields a fresh, empty storage::

    import pytest
    from ray_workflows.testing import StorageConformance

    class TestMyStorage(StorageConformance):
        @pytest.fixture
        async def storage(self, tmp_path):
            yield MyStorage(f"my://{tmp_path}")

The tests are ``async def`` and need pytest-asyncio in auto mode
(``asyncio_mode = "auto"``). For a ``shared`` backend the suite also races
processes that open the storage through the plugin registry by its URI, so the
plugin's entry point must be installed.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import pickle
import time
import traceback
from collections.abc import Callable
from typing import Any

import pytest

from ray_workflows._core.events import ListenerConformance
from ray_workflows.storage import Storage, forget_storage

#: Keys that :func:`~ray_workflows.storage.check_key` refuses.
INVALID_KEYS = ["", "/abs", "a/../b", "a//b", "a/", "./a", "a/./b", "a\\b"]

_RACERS = 20
_PROCESSES = 8
_INCREMENTS_PER_PROCESS = 5
# The race of compare_and_set against plain writes of the same key (see
# test_compare_and_set_races_plain_writes): writers that increment a chain with
# compare_and_set, and one writer that puts and removes the key with every plain write.
_CHAIN_KEY = "race/chain/value"
_CHAIN_SIDE = "race/chain/side"
_CHAIN_PREFIX = "race/chain/"
_CHAIN_WRITERS = 3
_CHAIN_INCREMENTS = 12
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
        current = await storage.get(_CHAIN_KEY)
        root, count = _link(current) if current is not None else (f"c:{writer}:{attempt}", 0)
        new = f"{root} {count + 1} {writer}:{attempt}"
        if await storage.compare_and_set(_CHAIN_KEY, current, new.encode()):
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
        ("delete", lambda: storage.delete(_CHAIN_KEY)),
        ("delete_many", lambda: storage.delete_many([_CHAIN_KEY, _CHAIN_SIDE])),
        ("discard_many", lambda: storage.discard_many([_CHAIN_KEY])),
        ("delete_prefix", lambda: storage.delete_prefix(_CHAIN_PREFIX)),
    ]
    rounds = 0
    while rounds < _PLAIN_ROUNDS and not stop():
        root = f"p:{writer}:{rounds}"
        value = f"{root} 0 {writer}".encode()
        if rounds % 2:
            op = "put_many"
            await storage.put_many({_CHAIN_KEY: value, _CHAIN_SIDE: value})
        else:
            op = "put"
            await storage.put(_CHAIN_KEY, value)
        seen = await storage.get(_CHAIN_KEY)
        if seen is None or _link(seen)[0] != root:
            lost.append(f"right after the {op} of {value!r} the key held {seen!r}")
        op, remove = removals[rounds % len(removals)]
        await remove()
        seen = await storage.get(_CHAIN_KEY)
        if seen is not None and _link(seen)[0].startswith("p:"):
            lost.append(f"right after the {op} of {value!r} the key held {seen!r}")
        rounds += 1
        await asyncio.sleep(_PLAIN_PAUSE)  # let compare_and_sets succeed too
    return rounds, lost


def _check_chains(stored: list[str], final: bytes | None) -> None:
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


class StorageConformance:
    """Tests every storage backend passes. Subclasses provide a ``storage`` fixture."""

    async def test_get_missing_returns_none(self, storage: Storage) -> None:
        assert await storage.get("missing") is None
        assert await storage.get("no/such/key") is None
        assert not await storage.exists("missing")

    @pytest.mark.parametrize("size", [0, 1, 1000, 5 * 1024 * 1024])
    async def test_put_get_round_trip(self, storage: Storage, size: int) -> None:
        data = os.urandom(size)
        await storage.put("blobs/one", data)
        assert await storage.get("blobs/one") == data
        assert await storage.exists("blobs/one")

    async def test_put_overwrites(self, storage: Storage) -> None:
        await storage.put("k", b"old value, longer than the new one")
        await storage.put("k", b"new")
        assert await storage.get("k") == b"new"
        assert await storage.list() == ["k"]

    async def test_put_many(self, storage: Storage) -> None:
        await storage.put("w/a", b"old")
        items = {f"w/{name}": name.encode() * 3 for name in ["a", "b", "c/d", "c/e"]}
        items["top"] = b""
        await storage.put_many(items)
        for key, data in items.items():
            assert await storage.get(key) == data
        assert await storage.list() == sorted(items)
        await storage.put_many({})
        assert await storage.list() == sorted(items)

    async def test_put_if_absent(self, storage: Storage) -> None:
        assert await storage.put_if_absent("lease/w1", b"first")
        assert not await storage.put_if_absent("lease/w1", b"second")
        assert await storage.get("lease/w1") == b"first"
        await storage.put("lease/w2", b"")
        assert not await storage.put_if_absent("lease/w2", b"x")
        assert await storage.get("lease/w2") == b""

    async def test_put_if_absent_many(self, storage: Storage) -> None:
        await storage.put("many/taken", b"old")
        items = {"many/a": b"1", "many/taken": b"2", "many/new/dir/c": b"", "top": b"4"}
        created = await storage.put_if_absent_many(items)
        assert created == {"many/a": True, "many/taken": False, "many/new/dir/c": True, "top": True}
        assert await storage.get("many/taken") == b"old"
        for key in ("many/a", "many/new/dir/c", "top"):
            assert await storage.get(key) == items[key]
        assert await storage.list() == sorted(items)
        assert await storage.put_if_absent_many({}) == {}
        assert await storage.put_if_absent_many({"many/a": b"x"}) == {"many/a": False}

    async def test_concurrent_put_if_absent_many_one_winner_per_key(self, storage: Storage) -> None:
        keys = ["race/a", "race/b", "race/sub/c"]
        results = await asyncio.gather(
            *(
                storage.put_if_absent_many({k: f"racer {i}".encode() for k in keys[i % 2 :]})
                for i in range(_RACERS)
            )
        )
        for key in keys:
            winners = [i for i, created in enumerate(results) if created.get(key)]
            assert len(winners) == 1, (key, winners)
            assert await storage.get(key) == f"racer {winners[0]}".encode()

    async def test_compare_and_set_expecting_absent(self, storage: Storage) -> None:
        assert await storage.compare_and_set("cas", None, b"one")
        assert await storage.get("cas") == b"one"
        assert not await storage.compare_and_set("cas", None, b"two")
        assert await storage.get("cas") == b"one"

    async def test_compare_and_set_wrong_expected(self, storage: Storage) -> None:
        assert not await storage.compare_and_set("cas", b"anything", b"x")
        assert await storage.get("cas") is None
        await storage.put("cas", b"one")
        assert not await storage.compare_and_set("cas", b"on", b"x")
        assert not await storage.compare_and_set("cas", b"", b"x")
        assert await storage.get("cas") == b"one"

    async def test_compare_and_set_right_expected(self, storage: Storage) -> None:
        await storage.put("cas", b"one")
        assert await storage.compare_and_set("cas", b"one", b"two")
        assert await storage.get("cas") == b"two"
        assert await storage.compare_and_set("cas", b"two", b"")
        assert await storage.compare_and_set("cas", b"", b"three")
        assert await storage.get("cas") == b"three"

    async def test_concurrent_put_if_absent_has_one_winner(self, storage: Storage) -> None:
        results = await asyncio.gather(
            *(storage.put_if_absent("lease", f"racer {i}".encode()) for i in range(_RACERS))
        )
        assert results.count(True) == 1
        assert await storage.get("lease") == f"racer {results.index(True)}".encode()

    async def test_concurrent_compare_and_set_counter(self, storage: Storage) -> None:
        # The counter starts absent, so the first round also races compare_and_set(None).
        await asyncio.gather(*(increment(storage, "counter") for _ in range(_RACERS)))
        assert await storage.get("counter") == str(_RACERS).encode()

    async def test_compare_and_set_races_plain_writes(self, storage: Storage) -> None:
        # In one event loop: tasks (and, for a backend that works in threads, threads).
        finished = 0

        async def incrementer(writer: str) -> list[str]:
            nonlocal finished
            try:
                return await chain_increments(storage, writer, _CHAIN_INCREMENTS)
            finally:
                finished += 1

        plain = asyncio.ensure_future(
            plain_writes(storage, "plain", lambda: finished == _CHAIN_WRITERS)
        )
        try:
            chains = await asyncio.gather(*(incrementer(f"t{i}") for i in range(_CHAIN_WRITERS)))
        finally:
            finished = _CHAIN_WRITERS  # the plain writer stops, also if one failed
        rounds, lost = await plain
        assert not lost, "\n".join(lost)
        assert rounds > 0
        _check_chains([v for chain in chains for v in chain], await storage.get(_CHAIN_KEY))

    async def test_compare_and_set_races_plain_writes_across_processes(
        self, storage: Storage
    ) -> None:
        if not storage.shared:
            pytest.skip("a per-process storage is not shared between processes")
        chains, rounds, lost = await asyncio.to_thread(_race_chain_processes, storage.uri)
        assert not lost, "\n".join(lost)
        assert rounds > 0
        _check_chains(chains, await storage.get(_CHAIN_KEY))

    async def test_delete(self, storage: Storage) -> None:
        await storage.put("a/b", b"x")
        assert await storage.delete("a/b")
        assert await storage.get("a/b") is None
        assert not await storage.exists("a/b")
        assert not await storage.delete("a/b")
        assert not await storage.delete("never/there")
        assert await storage.list() == []

    async def test_delete_many(self, storage: Storage) -> None:
        await storage.put_many({"dm/a": b"1", "dm/sub/b": b"2", "dm/keep": b"3"})
        removed = await storage.delete_many(["dm/a", "dm/sub/b", "dm/never"])
        assert removed == {"dm/a": True, "dm/sub/b": True, "dm/never": False}
        assert await storage.list("dm/") == ["dm/keep"]
        assert await storage.delete_many([]) == {}
        assert await storage.delete_many(["dm/a"]) == {"dm/a": False}

    async def test_discard_many(self, storage: Storage) -> None:
        await storage.put_many({"dc/a": b"1", "dc/sub/b": b"2", "dc/keep": b"3"})
        await storage.discard_many(["dc/a", "dc/sub/b", "dc/never"])
        assert await storage.list("dc/") == ["dc/keep"]
        assert await storage.get("dc/a") is None
        await storage.discard_many([])

    async def test_delete_prefix_subtree(self, storage: Storage) -> None:
        for key in ["a/x", "a/y/z", "a/y/w", "ab/1", "b"]:
            await storage.put(key, b"v")
        assert await storage.delete_prefix("a/") == 3
        assert await storage.list() == ["ab/1", "b"]
        assert await storage.delete_prefix("a/") == 0
        await storage.put("a/y/z", b"again")
        assert await storage.get("a/y/z") == b"again"

    async def test_delete_prefix_is_a_string_prefix(self, storage: Storage) -> None:
        # On a filesystem "a/b" cannot be both a key and a directory, hence "a/bd/x".
        for key in ["a/b", "a/bc", "a/bd/x", "a/c", "a/c2/b", "b"]:
            await storage.put(key, b"v")
        assert await storage.delete_prefix("a/b") == 3
        assert await storage.list() == ["a/c", "a/c2/b", "b"]
        assert await storage.delete_prefix("nothing/") == 0
        assert await storage.delete_prefix("") == 3
        assert await storage.list() == []

    async def test_list_is_sorted_and_recursive(self, storage: Storage) -> None:
        keys = ["z", "b/c/d", "a", "b/a", "b/c/a", "a0/x", "B"]
        for key in keys:
            await storage.put(key, b"v")
        assert await storage.list() == sorted(keys)
        assert await storage.list("") == sorted(keys)
        assert await storage.list("b/") == ["b/a", "b/c/a", "b/c/d"]
        assert await storage.list("b/c/") == ["b/c/a", "b/c/d"]

    async def test_list_filters_by_prefix(self, storage: Storage) -> None:
        keys = ["w1/a", "w1/b/c", "w10/a", "w2/a", "x"]
        for key in keys:
            await storage.put(key, b"v")
        assert await storage.list("w1/") == ["w1/a", "w1/b/c"]
        assert await storage.list("w1") == ["w1/a", "w1/b/c", "w10/a"]
        assert await storage.list("w") == ["w1/a", "w1/b/c", "w10/a", "w2/a"]
        assert await storage.list("w1/b") == ["w1/b/c"]
        assert await storage.list("w1/a") == ["w1/a"]
        assert await storage.list("w3/") == []
        assert await storage.list("w1/a/") == []
        assert await storage.list("no/such/dir/") == []

    async def test_list_never_shows_internal_files(self, storage: Storage) -> None:
        await storage.put("d/put", b"1")
        await storage.put_many({"d/many1": b"1", "d/many2": b"2"})
        assert await storage.put_if_absent("d/pia", b"1")
        assert not await storage.put_if_absent("d/pia", b"2")
        await storage.put_if_absent_many({"d/piam1": b"1", "d/piam2": b"2"})
        assert await storage.compare_and_set("d/cas", None, b"1")
        assert await storage.compare_and_set("d/cas", b"1", b"2")
        assert not await storage.compare_and_set("d/cas", b"1", b"3")
        assert not await storage.compare_and_set("d/absent", b"1", b"3")
        expected = ["d/cas", "d/many1", "d/many2", "d/pia", "d/piam1", "d/piam2", "d/put"]
        assert await storage.list() == expected
        assert await storage.list("d/") == expected
        assert await storage.list("d") == expected

    @pytest.mark.parametrize("key", INVALID_KEYS)
    async def test_invalid_keys_are_refused(self, storage: Storage, key: str) -> None:
        with pytest.raises(ValueError):
            await storage.get(key)
        with pytest.raises(ValueError):
            await storage.put(key, b"x")
        with pytest.raises(ValueError):
            await storage.put_many({key: b"x"})
        with pytest.raises(ValueError):
            await storage.put_if_absent(key, b"x")
        with pytest.raises(ValueError):
            await storage.compare_and_set(key, None, b"x")
        with pytest.raises(ValueError):
            await storage.delete(key)
        with pytest.raises(ValueError):
            await storage.exists(key)
        assert await storage.list() == []

    @pytest.mark.parametrize("prefix", ["/abs", "a//", "a/../", "//"])
    async def test_invalid_prefixes_are_refused(self, storage: Storage, prefix: str) -> None:
        with pytest.raises(ValueError):
            await storage.list(prefix)
        with pytest.raises(ValueError):
            await storage.delete_prefix(prefix)

    async def test_check_passes(self, storage: Storage) -> None:
        await storage.check()

    async def test_pickles_to_its_uri(self, storage: Storage) -> None:
        await storage.put("p/k", b"pickled")
        try:
            clone = pickle.loads(pickle.dumps(storage))
            assert type(clone) is type(storage)
            assert clone.uri == storage.uri
            if storage.shared:
                assert await clone.get("p/k") == b"pickled"
                await clone.put("p/k2", b"from the clone")
                assert await storage.get("p/k2") == b"from the clone"
        finally:
            forget_storage(storage.uri)

    async def test_processes_race_with_one_winner(self, storage: Storage) -> None:
        if not storage.shared:
            pytest.skip("a per-process storage is not shared between processes")
        results = await asyncio.to_thread(_race_processes, storage.uri)
        winners = [pid for pid, won in results if won]
        assert len(winners) == 1, results
        assert await storage.get("race/lease") == str(winners[0]).encode()
        expected = _PROCESSES * _INCREMENTS_PER_PROCESS
        assert await storage.get("race/counter") == str(expected).encode()


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


def _race_processes(uri: str) -> list[tuple[int, bool]]:
    ctx = _context()
    barrier = ctx.Barrier(_PROCESSES)
    queue = ctx.Queue()
    procs = [ctx.Process(target=_racer, args=(uri, barrier, queue)) for _ in range(_PROCESSES)]
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
            for _ in range(_INCREMENTS_PER_PROCESS):
                await increment(storage, "race/counter")
            return won

        barrier.wait(timeout=120)
        queue.put((os.getpid(), asyncio.run(race())))
    except BaseException:
        queue.put(f"racer {os.getpid()} failed:\n{traceback.format_exc()}")


def _race_chain_processes(uri: str) -> tuple[list[str], int, list[str]]:
    """Incrementers and the plain writer, each a process of its own; the values the
    incrementers stored, the plain writer's rounds and the lost writes it saw."""
    ctx = _context()
    barrier = ctx.Barrier(_CHAIN_WRITERS + 1)
    stop = ctx.Event()
    queue = ctx.Queue()
    procs = [
        ctx.Process(target=_chain_racer, args=(uri, f"p{i}", barrier, stop, queue))
        for i in range(_CHAIN_WRITERS)
    ]
    procs.append(ctx.Process(target=_chain_racer, args=(uri, None, barrier, stop, queue)))
    for proc in procs:
        proc.start()
    results: list[Any] = []
    try:
        deadline = time.monotonic() + 120
        while len(results) < len(procs):
            results.append(queue.get(timeout=max(0.0, deadline - time.monotonic())))
            if sum(1 for r in results if isinstance(r, list)) == _CHAIN_WRITERS:
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
            queue.put(asyncio.run(chain_increments(storage, writer, _CHAIN_INCREMENTS)))
    except BaseException:
        queue.put(f"racer {os.getpid()} failed:\n{traceback.format_exc()}")


__all__ = [
    "INVALID_KEYS",
    "ListenerConformance",
    "StorageConformance",
    "chain_increments",
    "increment",
    "plain_writes",
]
