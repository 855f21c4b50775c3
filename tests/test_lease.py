"""Leases: one runner per workflow, on real storages, with real processes racing and dying."""

from __future__ import annotations

import asyncio
import json
import logging
import multiprocessing
import os
import signal
import time
import traceback
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import faulty_uri

from ray_workflows._core.keys import lease_key
from ray_workflows._core.lease import ENV_LEASE_TTL, LeaseInfo, lease_ttl, new_owner_id
from ray_workflows._core.lease_manager import LeaseManager
from ray_workflows.exceptions import StorageError
from ray_workflows.storage import Storage, open_storage

KEY = lease_key("w")


class FakeClock:
    """Wall-clock seconds that move only when a test says so."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture(params=["file", "memory"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    if request.param == "file":
        return open_storage(str(tmp_path / "storage"))
    return open_storage(f"memory://lease-{uuid.uuid4().hex}")


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


async def stored(storage: Storage, key: str = KEY) -> dict[str, Any]:
    raw = await storage.get(key)
    assert raw is not None
    return dict(json.loads(raw))


async def wait_until(predicate: Callable[[], bool], timeout: float) -> float:
    """Poll every 20 ms; return the seconds it took."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise TimeoutError("condition not reached")
        await asyncio.sleep(0.02)
    return time.monotonic() - start


# -- one process ------------------------------------------------------------------


async def test_acquire_renew_release(backend: Storage, clock: FakeClock) -> None:
    leases = LeaseManager(backend, ttl=10, clock=clock)
    lease = await leases.acquire("w")
    assert lease is not None and lease.valid()
    assert (lease.workflow_id, lease.owner, lease.epoch) == ("w", leases.owner, 1)
    assert lease.expires_at == clock.now + 10 and lease.deadline == clock.now + 8
    record = await stored(backend)
    assert record["owner"] == leases.owner and record["epoch"] == 1 and not record["released"]
    assert leases.held == {"w": lease}

    clock.advance(4)
    assert await leases.renew(lease)
    record = await stored(backend)
    assert record["renewed_at"] == clock.now and record["expires_at"] == clock.now + 10
    assert record["acquired_at"] == clock.now - 4 and lease.deadline == clock.now + 8
    assert await leases.acquire("w") is lease  # re-acquiring one's own lease renews it

    assert await leases.release(lease)
    assert lease.released and not lease.valid() and "w" not in leases.held
    assert (await stored(backend))["released"] and await leases.holder("w") is None
    assert not await leases.renew(lease) and not await leases.release(lease)
    assert not lease.lost  # released is not lost: on_lost is only for leases taken away


async def test_second_owner_is_refused_while_held(backend: Storage, clock: FakeClock) -> None:
    a = LeaseManager(backend, ttl=10, clock=clock)
    b = LeaseManager(backend, ttl=10, clock=clock)
    lease = await a.acquire("w")
    assert lease is not None
    clock.advance(9.9)
    assert await b.acquire("w") is None
    info = await b.holder("w")
    assert isinstance(info, LeaseInfo) and (info.owner, info.epoch) == (a.owner, 1)
    assert await a.holder("w") == info  # the holder may be this manager itself
    assert await a.renew(lease)
    clock.advance(9.9)  # renewed: still refused well past the first expiry
    assert await b.acquire("w") is None
    # ...though the holder no longer trusts it: past its deadline (expiry - max_skew).
    assert not lease.valid() and not lease.lost


async def test_takeover_after_expiry(
    backend: Storage, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="ray_workflows")
    lost: list[str] = []
    a = LeaseManager(backend, ttl=1.5, clock=clock, on_lost=lost.append)
    b = LeaseManager(backend, ttl=1.5, clock=clock)
    old = await a.acquire("w")
    assert old is not None
    clock.advance(1.5)  # expired: its holder did not renew (it died, or its loop stalled)
    assert not old.valid()
    new = await b.acquire("w")
    assert new is not None and new.epoch == 2 and new.owner == b.owner
    assert "lease.taken_over" in caplog.text and a.owner in caplog.text
    assert not await a.renew(old)
    assert old.lost and lost == ["w"] and "w" not in a.held
    assert not await a.verify(old) and lost == ["w"]  # on_lost fires once
    assert await b.verify(new)
    assert await a.acquire("w") is None
    assert (await stored(backend))["owner"] == b.owner


async def test_verify_notices_a_takeover(backend: Storage, clock: FakeClock) -> None:
    lost: list[str] = []
    a = LeaseManager(backend, ttl=1, clock=clock, on_lost=lost.append)
    lease = await a.acquire("w")
    assert lease is not None and await a.verify(lease)
    clock.advance(1)
    assert await LeaseManager(backend, ttl=1, clock=clock).acquire("w") is not None
    assert not await a.verify(lease) and lease.lost and lost == ["w"]


async def test_release_lets_another_acquire_at_once(backend: Storage, clock: FakeClock) -> None:
    a = LeaseManager(backend, ttl=30, clock=clock)
    b = LeaseManager(backend, ttl=30, clock=clock)
    lease = await a.acquire("w")
    assert lease is not None and await b.acquire("w") is None
    assert await a.release(lease)
    taken = await b.acquire("w")  # no waiting for the ttl
    assert taken is not None and taken.epoch == 2
    assert await a.acquire("w") is None


async def test_a_deleted_record_means_the_lease_is_lost(backend: Storage, clock: FakeClock) -> None:
    lost: list[str] = []
    a = LeaseManager(backend, ttl=5, clock=clock, on_lost=lost.append)
    lease = await a.acquire("w")
    assert lease is not None
    await backend.delete(KEY)  # the workflow was deleted under it
    assert not await a.renew(lease) and lease.lost and lost == ["w"]


async def test_concurrent_acquires_in_one_manager_share_the_lease(
    backend: Storage, clock: FakeClock
) -> None:
    a = LeaseManager(backend, ttl=5, clock=clock)
    got = await asyncio.gather(*(a.acquire("w") for _ in range(5)))
    assert got[0] is not None and all(lease is got[0] for lease in got)
    assert got[0].epoch == 1 and (await stored(backend))["epoch"] == 1


@pytest.mark.parametrize("skew_sign", [1, -1])
async def test_holder_stops_before_a_skewed_clock_may_take_over(
    backend: Storage, clock: FakeClock, skew_sign: int
) -> None:
    """The safety argument, stepped through: B's clock is off by (almost) max_skew;
    at no instant is A's lease valid while B can take it."""
    a = LeaseManager(backend, ttl=1, max_skew=0.2, clock=clock)
    skew = skew_sign * 0.19
    b = LeaseManager(backend, ttl=1, clock=lambda: clock() + skew)
    lease = await a.acquire("w")
    assert lease is not None
    for _ in range(150):
        clock.advance(0.01)
        was_valid = lease.valid()
        taken = await b.acquire("w")
        if taken is not None:
            assert not was_valid and not lease.valid()
            assert not await a.renew(lease) and lease.lost
            break
    else:
        raise AssertionError("B never took the expired lease over")


async def test_leases_of_superseded_owners_are_taken_over_at_once(
    backend: Storage, clock: FakeClock
) -> None:
    """A manager that Ray restarted knows its earlier incarnations are dead."""
    old = LeaseManager(backend, new_owner_id("cluster-a/manager-1/"), ttl=30, clock=clock)
    other = LeaseManager(backend, new_owner_id("cluster-b/manager-1/"), ttl=30, clock=clock)
    assert await old.acquire("w") is not None and await other.acquire("x") is not None
    new = LeaseManager(
        backend,
        new_owner_id("cluster-a/manager-1/"),
        ttl=30,
        clock=clock,
        supersedes=lambda owner: owner.startswith("cluster-a/manager-1/"),
    )
    assert await new.holder("w") is None and await new.holder("x") is not None
    taken = await new.acquire("w")
    assert taken is not None and taken.epoch == 2
    assert await new.acquire("x") is None  # another cluster's manager: wait for expiry


async def test_a_landed_write_of_ours_is_adopted(backend: Storage, clock: FakeClock) -> None:
    """A renewal whose reply was lost (a timeout) but that reached storage leaves our
    record with other bytes than we remember: still ours, not lost."""
    a = LeaseManager(backend, ttl=5, clock=clock)
    lease = await a.acquire("w")
    assert lease is not None
    record = await stored(backend)
    record.update(renewed_at=record["renewed_at"] + 1, expires_at=record["expires_at"] + 1)
    await backend.put(KEY, json.dumps(record).encode())
    clock.advance(2)
    assert await a.renew(lease) and not lease.lost
    assert (await stored(backend))["expires_at"] == clock.now + 5


async def test_an_unreadable_record_is_held_for_one_ttl(backend: Storage, clock: FakeClock) -> None:
    await backend.put(KEY, b'{"owner": "torn')
    a = LeaseManager(backend, ttl=2, clock=clock)
    assert await a.acquire("w") is None
    assert await a.holder("w") is not None
    clock.advance(2)
    lease = await a.acquire("w")
    # The old epoch is unknown: the new one (time in ms) is above any counter value.
    assert lease is not None and lease.epoch == int(clock.now * 1000)


async def test_close_releases_every_lease(backend: Storage, clock: FakeClock) -> None:
    a = LeaseManager(backend, ttl=30, clock=clock)
    b = LeaseManager(backend, ttl=30, clock=clock)
    async with a:
        leases = [await a.acquire(f"w{i}") for i in range(3)]
        assert all(lease is not None for lease in leases) and len(a.held) == 3
    assert not a.held
    for i in range(3):
        taken = await b.acquire(f"w{i}")
        assert taken is not None and taken.epoch == 2


def test_ttl_from_the_environment(monkeypatch: pytest.MonkeyPatch, backend: Storage) -> None:
    monkeypatch.delenv(ENV_LEASE_TTL, raising=False)
    assert lease_ttl() == 30.0 and LeaseManager(backend).ttl == 30.0
    monkeypatch.setenv(ENV_LEASE_TTL, "2.5")
    assert lease_ttl() == 2.5 and LeaseManager(backend).ttl == 2.5
    assert lease_ttl(7) == 7.0 and LeaseManager(backend, ttl=1).ttl == 1.0  # explicit wins
    for bad in ("soon", "0", "-1", "inf"):
        monkeypatch.setenv(ENV_LEASE_TTL, bad)
        with pytest.raises(ValueError, match=ENV_LEASE_TTL):
            lease_ttl()
    with pytest.raises(ValueError, match="max_skew"):
        LeaseManager(backend, ttl=1, max_skew=0.6)
    assert new_owner_id() != new_owner_id()


# -- the keeper, in real time ---------------------------------------------------------


async def test_keeper_calls_on_lost_when_taken_over(backend: Storage) -> None:
    lost: list[str] = []
    a = LeaseManager(backend, ttl=1.2, on_lost=lost.append)
    lease = await a.acquire("w")
    assert lease is not None
    a.start()
    await asyncio.sleep(1.3)  # the keeper renews: past the first expiry, still held
    assert lease.valid() and lost == []
    # A clock 5 s ahead sees the lease expired and takes it over.
    b = LeaseManager(backend, ttl=30, clock=lambda: time.time() + 5)
    assert await b.acquire("w") is not None
    await wait_until(lambda: lost == ["w"], timeout=3)  # within a renewal interval
    assert lease.lost and not lease.valid() and not a.held
    await a.close()
    await b.close()


async def test_keeper_renews_500_leases_quickly(backend: Storage) -> None:
    leases = LeaseManager(backend, ttl=9)  # renewals every 3 s
    ids = [f"w{i}" for i in range(500)]
    held = await asyncio.gather(*(leases.acquire(wid) for wid in ids))
    assert all(lease is not None for lease in held)
    since = time.time()
    leases.start()  # the first round starts at once
    took = await wait_until(lambda: all(lease.renewed_at >= since for lease in held), 10)
    assert took < 3.0, f"renewing 500 leases took {took:.2f} s, more than one interval"
    records = await asyncio.gather(*(stored(backend, lease_key(wid)) for wid in ids))
    assert all(r["renewed_at"] >= since and r["owner"] == leases.owner for r in records)
    await leases.close()
    assert not leases.held


# -- a storage that fails ------------------------------------------------------------


async def test_failing_writes_make_renewal_fail_safely(tmp_path: Path, clock: FakeClock) -> None:
    control = tmp_path / "faults.json"
    storage = open_storage(faulty_uri(tmp_path / "inner", control))
    lost: list[str] = []
    a = LeaseManager(storage, ttl=10, clock=clock, on_lost=lost.append)  # deadline: +8 s
    b = LeaseManager(storage, ttl=10, clock=clock)
    lease = await a.acquire("w")
    assert lease is not None

    control.write_text(json.dumps({"fail": "/lease$"}))
    with pytest.raises(StorageError):
        await a.acquire("other")  # acquiring reports the error to the caller
    clock.advance(3)
    assert not await a.renew(lease)  # not renewed, but time remains: no loss yet
    assert await a.renew_all() == 0
    assert lease.valid() and not lease.lost and lost == []
    clock.advance(5.5)  # past the deadline without a renewal
    assert not await a.renew(lease)
    assert lease.lost and not lease.valid() and lost == ["w"]
    assert await b.acquire("w") is None  # others wait for the stored expiry

    control.unlink()  # the storage works again
    # This manager stopped that run; it may start a new one at once (epoch + 1).
    again = await a.acquire("w")
    assert again is not None and again is not lease and again.epoch == 2

    control.write_text(json.dumps({"fail": "/lease$"}))
    assert not await a.release(again)  # no crash; the lease expires by itself
    control.unlink()
    assert await b.acquire("w") is None
    clock.advance(10)
    taken = await b.acquire("w")
    assert taken is not None and taken.epoch == 3


async def test_a_hanging_storage_loses_the_lease_at_the_deadline(tmp_path: Path) -> None:
    control = tmp_path / "faults.json"
    storage = open_storage(faulty_uri(tmp_path / "inner", control))
    lost_at: list[float] = []
    a = LeaseManager(storage, ttl=1.0, on_lost=lambda wid: lost_at.append(time.time()))
    lease = await a.acquire("w")
    assert lease is not None
    control.write_text(json.dumps({"delay": 30}))  # every write hangs
    a.start()
    await wait_until(lambda: bool(lost_at), timeout=5)
    assert lease.lost and lease.deadline - 0.1 <= lost_at[0] <= lease.deadline + 1.0
    await a.close()


# -- real processes --------------------------------------------------------------------


def _mp_context() -> Any:
    # Fresh interpreters, as separate managers are, not forks of the test process.
    # A forkserver imports ray_workflows (and Ray) once; 'spawn' pays it per process.
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["ray_workflows._core.lease_manager", __name__])
        return ctx
    return multiprocessing.get_context("spawn")


def _racer(uri: str, wids: list[str], barrier: Any, queue: Any) -> None:
    try:

        async def round_() -> tuple[LeaseManager, dict[str, int]]:
            leases = LeaseManager(open_storage(uri), ttl=60)
            await asyncio.to_thread(barrier.wait, 60)
            got = await asyncio.gather(*(leases.acquire(wid) for wid in wids))
            return leases, {lease.workflow_id: lease.epoch for lease in got if lease}

        async def race() -> list[tuple[str, dict[str, int]]]:
            first, won = await round_()  # put_if_absent races
            await asyncio.to_thread(barrier.wait, 60)
            await first.close()  # releases what it won
            second, won_again = await round_()  # compare_and_set takeover races
            return [(first.owner, won), (second.owner, won_again)]

        queue.put(asyncio.run(race()))
    except BaseException:
        queue.put(traceback.format_exc())


async def test_eight_processes_race_for_twenty_workflows(tmp_path: Path) -> None:
    uri = str(tmp_path / "storage")
    wids = [f"wf-{i}" for i in range(20)]
    ctx = _mp_context()
    barrier, queue = ctx.Barrier(8), ctx.Queue()
    procs = [ctx.Process(target=_racer, args=(uri, wids, barrier, queue)) for _ in range(8)]
    for proc in procs:
        proc.start()
    try:
        results = [await asyncio.to_thread(queue.get, True, 60) for _ in procs]
    finally:
        for proc in procs:
            await asyncio.to_thread(proc.join, 10)
            if proc.is_alive():
                proc.kill()
    errors = [r for r in results if isinstance(r, str)]
    assert not errors, "\n".join(errors)
    storage = open_storage(uri)
    for round_, epoch in ((0, 1), (1, 2)):
        winners: dict[str, list[str]] = {wid: [] for wid in wids}
        for rounds in results:
            owner, won = rounds[round_]
            for wid, won_epoch in won.items():
                assert won_epoch == epoch
                winners[wid].append(owner)
        assert all(len(owners) == 1 for owners in winners.values()), winners
    for wid in wids:
        record = await stored(storage, lease_key(wid))
        assert [record["owner"]] == winners[wid] and record["epoch"] == 2


def _holder(uri: str, wid: str, ttl: float, ready: str) -> None:
    async def hold() -> None:
        leases = LeaseManager(open_storage(uri), ttl=ttl)
        lease = await leases.acquire(wid)
        assert lease is not None
        leases.start()
        Path(ready).write_text(leases.owner)
        await asyncio.sleep(3600)

    asyncio.run(hold())


async def test_a_killed_holder_is_taken_over_after_ttl_and_not_before(tmp_path: Path) -> None:
    uri, ttl, ready = str(tmp_path / "storage"), 1.5, tmp_path / "ready"
    proc = _mp_context().Process(target=_holder, args=(uri, "w", ttl, str(ready)))
    proc.start()
    try:
        await wait_until(ready.exists, timeout=60)
        storage = open_storage(uri)
        leases = LeaseManager(storage, ttl=ttl)
        end = time.time() + 1.2 * ttl  # its keeper renews it: refused past one ttl
        while time.time() < end:
            assert await leases.acquire("w") is None
            await asyncio.sleep(0.05)
        info = await leases.holder("w")
        assert info is not None and info.owner == ready.read_text()
        assert proc.pid is not None
        os.kill(proc.pid, signal.SIGKILL)
        await asyncio.to_thread(proc.join, 10)
        last = await stored(storage)
        assert last["renewed_at"] > last["acquired_at"]
        while (lease := await leases.acquire("w")) is None:
            assert time.time() < last["expires_at"] + 1.0, "not taken over after the ttl"
            await asyncio.sleep(0.02)
        assert time.time() >= last["expires_at"]
        assert lease.epoch == last["epoch"] + 1 == 2
        await leases.close()
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join()
