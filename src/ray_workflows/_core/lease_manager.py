"""The LeaseManager: acquires, renews and releases the leases of one manager incarnation,
by the protocol described in :mod:`ray_workflows._core.lease` (with an example)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
import types
from collections.abc import Callable, Mapping
from typing import Any

from ray_workflows._core.keys import lease_key
from ray_workflows._core.lease import (
    Lease,
    LeaseInfo,
    UnreadableRecords,
    decode_record,
    encode_record,
    is_record_of,
    lease_ttl,
    new_owner_id,
    replace_own,
)
from ray_workflows._core.log import get_logger
from ray_workflows.storage import Storage

#: Storage operations the keeper runs at once (renewals of thousands of leases).
DEFAULT_CONCURRENCY = 64
# Takeover races lost in a row before acquire concludes someone live holds it.
_ACQUIRE_ATTEMPTS = 3

log = get_logger()


class LeaseManager:
    """Acquires, renews and releases the leases of one manager incarnation.

    ``owner`` must be unique to this instance (default: :func:`new_owner_id`).
    ``on_lost(workflow_id)`` is called in the event loop, once per lost lease; it
    must not block. ``clock`` returns wall-clock epoch seconds (injectable for tests).
    ``supersedes(owner)`` names owners known to be dead (earlier incarnations of
    this manager, which Ray restarted): their live leases are taken over at once
    instead of after their expiry. Only pass owners that cannot still be running.
    """

    def __init__(
        self,
        storage: Storage,
        owner: str | None = None,
        *,
        ttl: float | None = None,
        max_skew: float | None = None,
        clock: Callable[[], float] = time.time,
        on_lost: Callable[[str], object] | None = None,
        supersedes: Callable[[str], bool] | None = None,
        concurrency: int = DEFAULT_CONCURRENCY,
    ) -> None:
        self.storage = storage
        self.owner = owner or new_owner_id()
        self.ttl = lease_ttl(ttl)
        self.max_skew = self.ttl / 5 if max_skew is None else float(max_skew)
        if not 0 <= self.max_skew <= self.ttl / 2:
            raise ValueError(
                f"max_skew must be between 0 and ttl / 2 ({self.ttl / 2}), got {max_skew!r}"
            )
        self.on_lost = on_lost
        self._supersedes = supersedes
        self._clock = clock
        self._limit = asyncio.Semaphore(concurrency)
        self._held: dict[str, Lease] = {}
        self._acquiring: dict[str, asyncio.Future[None]] = {}
        self._acting_for: dict[str, str] = {}  # workflow -> owner it is held under
        self._gone: set[str] = set()  # owners whose leases are taken over at once
        self._unreadable = UnreadableRecords(self.ttl)
        self._keeper: asyncio.Task[None] | None = None

    @property
    def held(self) -> Mapping[str, Lease]:
        """workflow id -> the lease held for it, live view."""
        return types.MappingProxyType(self._held)

    # -- acquiring -------------------------------------------------------------
    async def acquire(self, workflow_id: str, *, fresh: bool = False) -> Lease | None:
        """The workflow's lease, or ``None`` if another owner holds it live.

        Takes over a released or expired record (epoch + 1). A lease already held
        here is renewed and returned. Storage errors propagate. ``fresh``: the
        workflow is probably new, so try creating the record before reading it.
        """
        # Calls for one id run one after another: the second finds the first's lease.
        while (busy := self._acquiring.get(workflow_id)) is not None:
            await asyncio.wait([busy])
        done = asyncio.get_running_loop().create_future()
        self._acquiring[workflow_id] = done
        try:
            held = self._held.get(workflow_id)
            if held is not None and (await self.renew(held) or held.valid()):
                return held
            return await self._acquire(workflow_id, fresh)
        finally:
            del self._acquiring[workflow_id]
            done.set_result(None)

    async def _acquire(self, wid: str, fresh: bool = False) -> Lease | None:
        key = lease_key(wid)
        for attempt in range(_ACQUIRE_ATTEMPTS):
            raw = None if fresh and attempt == 0 else await self.storage.get(key)
            now = self._clock()
            if raw is None:
                info = self._record(wid, 1, now, now)
                data = encode_record(info)
                if await self.storage.put_if_absent(key, data):
                    return self._hold(info, data, None, now)
                continue
            current = decode_record(wid, raw)
            if current is None:
                current = self._unreadable.holder(wid, raw, now)
                epoch = int(now * 1000)
            else:
                self._unreadable.forget(wid)
                epoch = current.epoch + 1
            if (
                current.live(now)
                and not self._may_take(current.owner)
                and current.owner != self._acting_for.get(wid)
            ):
                log.debug("lease.busy", workflow_id=wid, holder=current.owner, epoch=current.epoch)
                return None
            info = self._record(wid, epoch, now, now)
            data = encode_record(info)
            if await self.storage.compare_and_set(key, raw, data):
                self._unreadable.forget(wid)
                return self._hold(info, data, current, now)
        return None  # others kept winning the races: one of them holds it

    def adopt(self, workflow_id: str, raw: bytes) -> Lease | None:
        """Hold the lease whose record ``raw`` (from :func:`grant`) a caller created for
        this owner (or the one it acts for: :meth:`act_for`) moments ago, without I/O.
        ``None`` if the record names another owner (say, an earlier incarnation), or
        its deadline has passed, or the lease is already held or being acquired here:
        then :meth:`acquire` decides, from storage.

        Safe without a read: only this owner may change a live record of its own, so
        until the deadline the stored bytes are still ``raw``."""
        info = decode_record(workflow_id, raw)
        if (
            info is None
            or info.owner != (self._acting_for.get(workflow_id) or self.owner)
            or info.released
            or workflow_id in self._held
            or workflow_id in self._acquiring
            or self._clock() >= info.renewed_at + self.ttl - self.max_skew
        ):
            return None
        return self._hold(info, raw, None, info.renewed_at)

    def _may_take(self, owner: str) -> bool:
        return (
            owner == self.owner
            or owner in self._gone
            or (self._supersedes is not None and self._supersedes(owner))
        )

    def gone(self, owner: str) -> None:
        """``owner`` has stopped, or is about to (a workflow's host whose driver exits):
        its live leases are taken over at once. Safe even if it still writes: fencing
        keeps whatever it writes from then on out of sight."""
        self._gone.add(owner)

    def _record(
        self, wid: str, epoch: int, now: float, acquired_at: float, owner: str | None = None
    ) -> LeaseInfo:
        owner = owner or self._acting_for.get(wid) or self.owner
        return LeaseInfo(wid, owner, epoch, now + self.ttl, self.ttl, now, acquired_at)

    def act_for(self, workflow_id: str, owner: str) -> None:
        """Hold ``workflow_id``'s lease under ``owner`` (the name its caller gave the
        workflow's host: :mod:`ray_workflows._core.host`) instead of this manager's own: a
        live record of that owner is taken over at once, as an earlier attempt of
        the same host, dead (Ray runs a task again only then)."""
        self._acting_for[workflow_id] = owner

    def _hold(self, info: LeaseInfo, raw: bytes, previous: LeaseInfo | None, now: float) -> Lease:
        deadline = now + self.ttl - self.max_skew
        lease = Lease(
            info.workflow_id,
            info.owner,
            info.epoch,
            info.acquired_at,
            info.renewed_at,
            info.expires_at,
            deadline,
            _raw=raw,
            _clock=self._clock,
        )
        self._held[info.workflow_id] = lease
        fields: dict[str, Any] = {"workflow_id": info.workflow_id, "owner": self.owner}
        if previous is not None and not previous.released and previous.owner != self.owner:
            log.warning(
                "lease.taken_over",
                **fields,
                epoch=info.epoch,
                previous_owner=previous.owner,
                previous_epoch=previous.epoch,
                expired_for=round(now - previous.expires_at, 3),
                superseded=previous.live(now),
            )
        else:
            log.info("lease.acquired", **fields, epoch=info.epoch)
        return lease

    # -- renewing and releasing ------------------------------------------------
    async def renew(self, lease: Lease) -> bool:
        """Extend the lease; True if the stored record was extended.

        False if it is lost (taken over, or no renewal before the deadline: then
        ``on_lost`` has been called), released, or the storage failed while time
        remains (``lease.valid()`` stays true until the deadline; retry).
        """
        async with lease._lock:
            if lease.lost or lease.released:
                return False
            now = self._clock()
            info = self._record(lease.workflow_id, lease.epoch, now, lease.acquired_at, lease.owner)
            data = encode_record(info)
            try:
                renewed = await replace_own(self.storage, lease, data)
            except Exception as exc:
                if self._clock() >= lease.deadline:
                    self._lose(lease, "renewal failed until the deadline", error=str(exc))
                else:
                    log.warning(
                        "lease.renew_failed",
                        workflow_id=lease.workflow_id,
                        error=str(exc),
                        seconds_left=round(lease.deadline - self._clock(), 3),
                    )
                return False
            if not renewed:
                self._lose(lease, "taken over")
                return False
            lease._raw = data
            lease.renewed_at = now
            lease.expires_at = info.expires_at
            lease.deadline = info.expires_at - self.max_skew
            return True

    async def release(self, lease: Lease) -> bool:
        """Give the lease up so that another manager can take it at once. True if the
        stored record was released; on a storage error it expires by itself."""
        async with lease._lock:
            if lease.lost or lease.released:
                return False
            lease.released = True
            self._forget(lease)
            now = self._clock()
            info = self._record(lease.workflow_id, lease.epoch, now, lease.acquired_at, lease.owner)
            info = dataclasses.replace(info, expires_at=now, released=True)
            try:
                released = await replace_own(self.storage, lease, encode_record(info))
            except Exception as exc:
                log.warning(
                    "lease.release_failed",
                    workflow_id=lease.workflow_id,
                    error=str(exc),
                    note="it expires by itself",
                )
                return False
            log.info(
                "lease.released" if released else "lease.release_skipped",
                workflow_id=lease.workflow_id,
                epoch=lease.epoch,
            )
            return released

    async def verify(self, lease: Lease) -> bool:
        """True if the stored record is still this lease and it is valid (one read).
        Marks the lease lost (and calls ``on_lost``) if it was taken over."""
        if lease.lost or lease.released:
            return False
        raw = await self.storage.get(lease_key(lease.workflow_id))
        if raw is None or not is_record_of(lease, raw):
            self._lose(lease, "taken over")
            return False
        return lease.valid()

    def drop(self, lease: Lease) -> None:
        """Stop renewing ``lease`` without a write: it expires by itself. For a workflow
        that reached a final status, whose lease nobody needs to take over early."""
        self._forget(lease)

    def _forget(self, lease: Lease) -> None:
        if self._held.get(lease.workflow_id) is lease:
            del self._held[lease.workflow_id]
            self._acting_for.pop(lease.workflow_id, None)

    def _lose(self, lease: Lease, reason: str, **fields: Any) -> None:
        if lease.lost:
            return
        lease.lost = True
        self._forget(lease)
        log.warning(
            "lease.lost",
            workflow_id=lease.workflow_id,
            owner=self.owner,
            epoch=lease.epoch,
            reason=reason,
            **fields,
        )
        if self.on_lost is not None:
            try:
                self.on_lost(lease.workflow_id)
            except Exception:
                log.exception("lease.on_lost_failed", workflow_id=lease.workflow_id)

    # -- queries -----------------------------------------------------------------
    async def holder(self, workflow_id: str) -> LeaseInfo | None:
        """The live holder of the workflow's lease (maybe this manager), or ``None``
        (no record, released, expired, or held by an owner this manager supersedes)."""
        raw = await self.storage.get(lease_key(workflow_id))
        if raw is None:
            return None
        now = self._clock()
        info = decode_record(workflow_id, raw) or self._unreadable.holder(workflow_id, raw, now)
        if not info.live(now) or (info.owner != self.owner and self._may_take(info.owner)):
            return None
        return info

    # -- the keeper ----------------------------------------------------------------
    async def renew_all(self) -> int:
        """Renew every held lease once, concurrently (at most ``concurrency`` storage
        operations at a time); return how many were renewed."""
        leases = list(self._held.values())
        results = await asyncio.gather(*(self._renew_in_time(lease) for lease in leases))
        return sum(results)

    async def _renew_in_time(self, lease: Lease) -> bool:
        # A storage call that hangs must not outlive the deadline unnoticed.
        left = lease.deadline - self._clock()
        timeout = left if left > 0 else self.ttl / 3
        try:
            return await asyncio.wait_for(self._renew_limited(lease), timeout)
        except asyncio.TimeoutError:
            self._lose(lease, "renewal timed out at the deadline")
            return False

    async def _renew_limited(self, lease: Lease) -> bool:
        async with self._limit:
            return await self.renew(lease)

    async def keep(self) -> None:
        """Renew every held lease every ``ttl / 3``, forever (run as one task)."""
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            try:
                await self.renew_all()
            except Exception:  # never let one bad round stop the keeper
                log.exception("lease.keeper_error")
            await asyncio.sleep(max(0.0, started + self.ttl / 3 - loop.time()))

    def start(self) -> asyncio.Task[None]:
        """Start :meth:`keep` as a task of the running loop (once)."""
        if self._keeper is None or self._keeper.done():
            self._keeper = asyncio.get_running_loop().create_task(
                self.keep(), name="ray_workflows._core.lease.keeper"
            )
        return self._keeper

    async def close(self) -> None:
        """Stop the keeper and release every held lease."""
        if self._keeper is not None:
            self._keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._keeper
            self._keeper = None

        async def release(lease: Lease) -> None:
            async with self._limit:
                await self.release(lease)

        await asyncio.gather(*(release(lease) for lease in list(self._held.values())))

    async def __aenter__(self) -> LeaseManager:
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


__all__ = ["DEFAULT_CONCURRENCY", "LeaseManager"]
