"""Leases: one runner per workflow, across managers and clusters sharing a storage.

A manager runs a workflow only while it holds the workflow's lease, a small JSON
record at ``workflows/<wid>/lease`` (:func:`ray_workflows._core.keys.lease_key`)::

    {"v": 1, "owner": "host:1234:9f2c...", "epoch": 3, "acquired_at": 1718000000.1,
     "renewed_at": 1718000020.1, "expires_at": 1718000050.1, "ttl": 30.0,
     "released": false}

Times are wall-clock epoch seconds (``time.time()``), the only clock two hosts
share. ``owner`` names one manager incarnation (:func:`new_owner_id`: host, pid,
random). ``epoch`` grows at every new holding (a takeover, an acquire after a
release, a new run by the same owner after a loss) and never goes back.

Every change goes through the storage's atomic operations, never a plain put:

* **acquire**: ``put_if_absent`` when there is no record (epoch 1); otherwise, if the
  record is released, expired, or left by an earlier incarnation of this owner,
  ``compare_and_set`` from the exact bytes read to a record with ``epoch + 1``.
  A live record of another owner means the workflow runs elsewhere: ``None``.
* **renew**: ``compare_and_set`` from the bytes this holder last wrote to the same
  owner and epoch with a later expiry. A mismatch means someone took it over: lost.
* **release**: ``compare_and_set`` to a record marked ``released`` (so it is free
  at once), keeping owner and epoch. It is not deleted: a deleted record would
  restart the epoch at 1 and repeat fencing tokens.

Safety. The records of one key form a chain: each write replaces the exact bytes
its writer read, so of racing writers exactly one moves the chain on (bytes never
repeat across holdings: owner and epoch differ). Two
managers both *believe* they hold a lease only across a takeover, and the old
holder stops believing first: it reads the clock (``t``) *before* writing
``expires_at = t + ttl`` and treats the lease as valid only until its
``deadline = t + ttl - max_skew``, while another manager takes over only once
*its* clock passes ``expires_at``. So if no two clocks differ by more than
``max_skew`` (default ``ttl / 5``: 6 s at the default 30 s ttl, far above NTP
skew), the holder's deadline passes before anyone may take over. The keeper
renews every ``ttl / 3`` (two attempts before the deadline) and, when a renewal
reports a takeover or cannot succeed before the deadline, marks the lease lost
and calls ``on_lost(workflow_id)``: the engine then stops that workflow. A renewal
that lands after the deadline is still safe: the unchanged record it replaced
proves that nobody took over meanwhile. A dead holder's workflows wait up to one
ttl before another manager takes them: the ttl trades failover time for renewal
writes (one small conditional write per held lease per ``ttl / 3``).

What the holder must still do itself: stop promptly on ``on_lost``, and check
:meth:`Lease.valid` (no I/O) or :meth:`LeaseManager.verify` (one read) before a
write that must not come from a stale runner, since a paused process (a stalled
loop, SIGSTOP) only notices on wake-up.

Fencing. :attr:`Lease.epoch` is a fencing token: the engine can store it in
``meta.json`` (``"lease_epoch": n``) and write ``meta.json`` with
``compare_and_set`` against the bytes it last wrote. A new holder's first status
write (with a higher epoch) then makes every write of the stale holder fail, and
readers can tell which holder wrote a record. An unreadable record (a backend that
broke the all-or-nothing rule) is treated as held by an unknown owner until ``ttl``
after this manager first saw it; taking it over uses the current time in
milliseconds as the epoch, larger than any counter could have reached.

The ttl is :func:`lease_ttl`: the explicit argument, else ``RAY_WORKFLOWS_LEASE_TTL``,
else 30 s. Example::

    leases = LeaseManager(storage, ttl=10, on_lost=stop_workflow)
    leases.start()
    lease = await leases.acquire("w1")
    if lease is None:
        info = await leases.holder("w1")    # RUNNING elsewhere: info.owner
    ...
    await leases.release(lease)
    await leases.close()
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import math
import os
import secrets
import socket
import time
import types
from collections.abc import Callable, Mapping
from typing import Any

from ray_workflows._core.keys import lease_key
from ray_workflows._core.log import get_logger
from ray_workflows.storage import Storage

ENV_LEASE_TTL = "RAY_WORKFLOWS_LEASE_TTL"
DEFAULT_TTL = 30.0
#: Storage operations the keeper runs at once (renewals of thousands of leases).
DEFAULT_CONCURRENCY = 64
# Takeover races lost in a row before acquire concludes someone live holds it.
_ACQUIRE_ATTEMPTS = 3
_UNREADABLE_OWNER = "<unreadable lease record>"

log = get_logger()


def lease_ttl(ttl: float | None = None) -> float:
    """The lease ttl in seconds: ``ttl`` if given, else ``RAY_WORKFLOWS_LEASE_TTL``,
    else 30. Raises ``ValueError`` for a value that is not a positive number."""
    source = "ttl"
    value: Any = ttl
    if ttl is None:
        source, value = ENV_LEASE_TTL, os.environ.get(ENV_LEASE_TTL, "").strip()
        if not value:
            return DEFAULT_TTL
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"{source} must be a positive number of seconds, got {value!r}")
    return seconds


def new_owner_id(prefix: str = "") -> str:
    """A unique name for one manager incarnation: ``<prefix>host:pid:random``.

    ``prefix`` is the manager's lineage (:func:`ray_workflows._core.incarnation.lineage`:
    ``<cluster token>|<manager name>|``), which names the cluster by its id, never by
    an address; owners that share it are incarnations of one manager in one cluster.
    Host and pid are for people reading the record: two containers may well share
    both (and an address), so the random part alone makes the id unique. ``|`` in the
    host name becomes ``_``, so the lineage is everything up to the last ``|``."""
    host = socket.gethostname().replace("|", "_")
    return f"{prefix}{host}:{os.getpid()}:{secrets.token_hex(6)}"


@dataclasses.dataclass(frozen=True)
class LeaseInfo:
    """One stored lease record, as :meth:`LeaseManager.holder` reports it."""

    workflow_id: str
    owner: str
    epoch: int
    expires_at: float
    ttl: float
    renewed_at: float
    acquired_at: float
    released: bool = False

    def live(self, now: float) -> bool:
        """True if the record stops others from taking the lease at time ``now``."""
        return not self.released and now < self.expires_at


@dataclasses.dataclass(eq=False)
class Lease:
    """A lease this manager holds; callers only read it.

    ``epoch`` is the fencing token, ``expires_at`` the stored expiry, ``deadline``
    when this holder must have stopped unless a renewal succeeds first.
    """

    workflow_id: str
    owner: str
    epoch: int
    acquired_at: float
    renewed_at: float
    expires_at: float
    deadline: float
    lost: bool = False
    released: bool = False
    _raw: bytes = dataclasses.field(default=b"", repr=False)
    _clock: Callable[[], float] = dataclasses.field(default=time.time, repr=False)
    # One storage operation on this lease at a time (the keeper's renewal, a release).
    _lock: asyncio.Lock = dataclasses.field(default_factory=asyncio.Lock, repr=False)

    def valid(self) -> bool:
        """True while this holder may act: not lost or released, deadline not passed."""
        return not self.lost and not self.released and self._clock() < self.deadline


_RECORD_FIELDS = tuple(f.name for f in dataclasses.fields(LeaseInfo) if f.name != "workflow_id")


def _encode(info: LeaseInfo) -> bytes:
    # Not dataclasses.asdict: it deep-copies every field, about 5% of a start's CPU.
    record = {name: getattr(info, name) for name in _RECORD_FIELDS}
    return json.dumps({"v": 1, **record}, sort_keys=True, separators=(",", ":")).encode()


def grant(workflow_id: str, owner: str, ttl: float, now: float | None = None) -> bytes:
    """A first lease record (epoch 1) naming ``owner``, for a caller that creates a
    workflow's records on behalf of the manager that will run it; that manager takes
    it with :meth:`LeaseManager.adopt`. Written with ``put_if_absent`` like any acquire."""
    now = time.time() if now is None else now
    return _encode(LeaseInfo(workflow_id, owner, 1, now + ttl, ttl, now, now))


def _decode(workflow_id: str, raw: bytes) -> LeaseInfo | None:
    try:
        record = json.loads(raw)
        return LeaseInfo(
            workflow_id,
            owner=str(record["owner"]),
            epoch=int(record["epoch"]),
            expires_at=float(record["expires_at"]),
            ttl=float(record["ttl"]),
            renewed_at=float(record["renewed_at"]),
            acquired_at=float(record["acquired_at"]),
            released=bool(record.get("released", False)),
        )
    except (ValueError, TypeError, KeyError):
        return None


def _is_record_of(lease: Lease, raw: bytes) -> bool:
    current = _decode(lease.workflow_id, raw)
    return (
        current is not None
        and not current.released
        and (current.owner, current.epoch) == (lease.owner, lease.epoch)
    )


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
        self._unreadable: dict[str, tuple[bytes, float]] = {}
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
                data = _encode(info)
                if await self.storage.put_if_absent(key, data):
                    return self._hold(info, data, None, now)
                continue
            current = _decode(wid, raw)
            if current is None:
                current = self._unreadable_record(wid, raw, now)
                epoch = int(now * 1000)
            else:
                self._unreadable.pop(wid, None)
                epoch = current.epoch + 1
            if (
                current.live(now)
                and not self._may_take(current.owner)
                and current.owner != self._acting_for.get(wid)
            ):
                log.debug("lease.busy", workflow_id=wid, holder=current.owner, epoch=current.epoch)
                return None
            info = self._record(wid, epoch, now, now)
            data = _encode(info)
            if await self.storage.compare_and_set(key, raw, data):
                self._unreadable.pop(wid, None)
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
        info = _decode(workflow_id, raw)
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

    def _unreadable_record(self, wid: str, raw: bytes, now: float) -> LeaseInfo:
        seen, since = self._unreadable.get(wid, (None, now))
        if seen != raw:
            since = now
            self._unreadable[wid] = (raw, now)
            log.warning("lease.unreadable", workflow_id=wid, note="treated as held for one ttl")
        return LeaseInfo(wid, _UNREADABLE_OWNER, 0, since + self.ttl, self.ttl, since, since)

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
            data = _encode(info)
            try:
                renewed = await self._replace_own(lease, data)
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
                released = await self._replace_own(lease, _encode(info))
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

    async def _replace_own(self, lease: Lease, data: bytes) -> bool:
        key = lease_key(lease.workflow_id)
        if await self.storage.compare_and_set(key, lease._raw, data):
            return True
        # A write of ours that raised (say, a timeout) may have landed after all:
        # the record is then still ours, with other bytes than we remember.
        raw = await self.storage.get(key)
        if raw is None or not _is_record_of(lease, raw):
            return False
        lease._raw = raw
        return await self.storage.compare_and_set(key, raw, data)

    async def verify(self, lease: Lease) -> bool:
        """True if the stored record is still this lease and it is valid (one read).
        Marks the lease lost (and calls ``on_lost``) if it was taken over."""
        if lease.lost or lease.released:
            return False
        raw = await self.storage.get(lease_key(lease.workflow_id))
        if raw is None or not _is_record_of(lease, raw):
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
        info = _decode(workflow_id, raw) or self._unreadable_record(workflow_id, raw, now)
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


__all__ = [
    "DEFAULT_TTL",
    "ENV_LEASE_TTL",
    "Lease",
    "LeaseInfo",
    "LeaseManager",
    "grant",
    "lease_key",  # built in ray_workflows._core.keys; still importable from here
    "lease_ttl",
    "new_owner_id",
]
