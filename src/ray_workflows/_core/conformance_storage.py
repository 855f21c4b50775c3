"""The storage conformance suite: every rule of :class:`~ray_workflows.storage.Storage`.

Plugin authors import it as ``ray_workflows.testing.StorageConformance`` (how to use
it is there); the writers it races are in :mod:`ray_workflows._core.storage_races`.
"""

from __future__ import annotations

import asyncio
import os
import pickle

import pytest

from ray_workflows._core.storage_races import (
    CHAIN_INCREMENTS,
    CHAIN_KEY,
    CHAIN_WRITERS,
    INCREMENTS_PER_PROCESS,
    PROCESSES,
    chain_increments,
    check_chains,
    increment,
    plain_writes,
    race_chain_processes,
    race_processes,
)
from ray_workflows.storage import Storage, forget_storage

#: Keys that :func:`~ray_workflows.storage.check_key` refuses.
INVALID_KEYS = ["", "/abs", "a/../b", "a//b", "a/", "./a", "a/./b", "a\\b"]

#: Tasks of one event loop that race for the same keys.
_RACERS = 20


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
                return await chain_increments(storage, writer, CHAIN_INCREMENTS)
            finally:
                finished += 1

        plain = asyncio.ensure_future(
            plain_writes(storage, "plain", lambda: finished == CHAIN_WRITERS)
        )
        try:
            chains = await asyncio.gather(*(incrementer(f"t{i}") for i in range(CHAIN_WRITERS)))
        finally:
            finished = CHAIN_WRITERS  # the plain writer stops, also if one failed
        rounds, lost = await plain
        assert not lost, "\n".join(lost)
        assert rounds > 0
        check_chains([v for chain in chains for v in chain], await storage.get(CHAIN_KEY))

    async def test_compare_and_set_races_plain_writes_across_processes(
        self, storage: Storage
    ) -> None:
        if not storage.shared:
            pytest.skip("a per-process storage is not shared between processes")
        chains, rounds, lost = await asyncio.to_thread(race_chain_processes, storage.uri)
        assert not lost, "\n".join(lost)
        assert rounds > 0
        check_chains(chains, await storage.get(CHAIN_KEY))

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
        results = await asyncio.to_thread(race_processes, storage.uri)
        winners = [pid for pid, won in results if won]
        assert len(winners) == 1, results
        assert await storage.get("race/lease") == str(winners[0]).encode()
        expected = PROCESSES * INCREMENTS_PER_PROCESS
        assert await storage.get("race/counter") == str(expected).encode()


__all__ = ["INVALID_KEYS", "StorageConformance"]
