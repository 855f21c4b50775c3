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
else 30 s. This module holds the record; the :class:`LeaseManager` of one manager
incarnation (:mod:`ray_workflows._core.lease_manager`) changes it. Example::

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
import dataclasses
import json
import math
import os
import secrets
import socket
import time
from collections.abc import Callable
from typing import Any

from ray_workflows._core.keys import lease_key
from ray_workflows._core.log import get_logger
from ray_workflows.storage import Storage

ENV_LEASE_TTL = "RAY_WORKFLOWS_LEASE_TTL"
DEFAULT_TTL = 30.0
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


def encode_record(info: LeaseInfo) -> bytes:
    # Not dataclasses.asdict: it deep-copies every field, about 5% of a start's CPU.
    record = {name: getattr(info, name) for name in _RECORD_FIELDS}
    return json.dumps({"v": 1, **record}, sort_keys=True, separators=(",", ":")).encode()


def grant(workflow_id: str, owner: str, ttl: float, now: float | None = None) -> bytes:
    """A first lease record (epoch 1) naming ``owner``, for a caller that creates a
    workflow's records on behalf of the manager that will run it; that manager takes
    it with :meth:`LeaseManager.adopt`. Written with ``put_if_absent`` like any acquire."""
    now = time.time() if now is None else now
    return encode_record(LeaseInfo(workflow_id, owner, 1, now + ttl, ttl, now, now))


def decode_record(workflow_id: str, raw: bytes) -> LeaseInfo | None:
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


def is_record_of(lease: Lease, raw: bytes) -> bool:
    current = decode_record(lease.workflow_id, raw)
    return (
        current is not None
        and not current.released
        and (current.owner, current.epoch) == (lease.owner, lease.epoch)
    )


async def replace_own(storage: Storage, lease: Lease, data: bytes) -> bool:
    """Replace the record of ``lease``, which its holder wrote, by ``data``; False if
    the stored record is no longer that lease's (someone took it over)."""
    key = lease_key(lease.workflow_id)
    if await storage.compare_and_set(key, lease._raw, data):
        return True
    # A write of ours that raised (say, a timeout) may have landed after all:
    # the record is then still ours, with other bytes than we remember.
    raw = await storage.get(key)
    if raw is None or not is_record_of(lease, raw):
        return False
    lease._raw = raw
    return await storage.compare_and_set(key, raw, data)


class UnreadableRecords:
    """Lease records that do not decode (a backend that broke the all-or-nothing rule):
    each is treated as held by an unknown owner until ``ttl`` after it was first seen."""

    def __init__(self, ttl: float) -> None:
        self._ttl = ttl
        self._seen: dict[str, tuple[bytes, float]] = {}

    def holder(self, wid: str, raw: bytes, now: float) -> LeaseInfo:
        """The record ``raw`` of ``wid``, which does not decode, as a live holding."""
        seen, since = self._seen.get(wid, (None, now))
        if seen != raw:
            since = now
            self._seen[wid] = (raw, now)
            log.warning(
                "lease.unreadable",
                workflow_id=wid,
                size=len(raw),
                head=raw[:40],
                note="treated as held for one ttl",
            )
        return LeaseInfo(wid, _UNREADABLE_OWNER, 0, since + self._ttl, self._ttl, since, since)

    def forget(self, wid: str) -> None:
        self._seen.pop(wid, None)


__all__ = [
    "DEFAULT_TTL",
    "ENV_LEASE_TTL",
    "Lease",
    "LeaseInfo",
    "UnreadableRecords",
    "decode_record",
    "encode_record",
    "grant",
    "is_record_of",
    "lease_key",  # built in ray_workflows._core.keys; still importable from here
    "lease_ttl",
    "new_owner_id",
    "replace_own",
]
