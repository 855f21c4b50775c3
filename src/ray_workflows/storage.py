"""The storage contract: a small async key/value store of bytes.

A storage plugin implements :class:`Storage` and registers its class under a
URI scheme in the ``ray_workflows.storage`` entry-point group::

    [project.entry-points."ray_workflows.storage"]
    mystore = "my_package.module:MyStorage"

Everything above this contract (key layout, pickling, the status index,
metadata JSON) lives in the core, once. A backend only moves bytes.

Keys are relative, ``/``-separated paths such as ``workflows/w1/meta.json``;
they never start with ``/`` and never contain ``..`` or empty segments.
:func:`check_key` enforces that, and backends call it.

The conformance suite in :mod:`ray_workflows.testing` checks every rule below;
a plugin author subclasses it to test a new backend.
"""

from __future__ import annotations

import abc
import threading
from collections.abc import Mapping
from typing import Any, ClassVar

from ray_workflows.exceptions import TransientStorageError, UnknownStorageError
from ray_workflows.plugins import STORAGE_GROUP, load, storage_scheme


class Storage(abc.ABC):
    """An async key/value store of bytes, selected by URI.

    Rules every backend keeps:

    * ``put`` is all or nothing: a reader sees the old bytes or the new bytes,
      never a prefix (temp file + fsync + rename on a filesystem, one PUT on S3).
      Once ``put`` returns, the bytes survive a crash of the process and the machine.
    * ``put_if_absent`` and ``compare_and_set`` are atomic against every other
      writer of the same storage, in any process: of racing callers exactly one wins.
    * ``get`` of a missing key returns ``None``; ``delete`` of one returns ``False``.
    * ``list(prefix)`` returns every key that starts with ``prefix`` (not only
      direct children), sorted.
    * Instances pickle to their URI, so a storage can be handed to Ray workers.
    * A failure raises :class:`~ray_workflows.exceptions.StorageError`, or its subclass
      :class:`~ray_workflows.exceptions.TransientStorageError` when the same call may
      succeed later without anyone fixing anything (a timeout, a lost connection,
      throttling, a server's 5xx). Callers retry only those, or tell their own
      clients to (the HTTP event app answers 503 with ``Retry-After``); a plain
      ``StorageError`` (no permission, no such bucket) is reported as it is.
    """

    #: The URI scheme this class serves, e.g. ``"file"``.
    scheme: ClassVar[str]
    #: True if every process of the cluster sees the same data (files on a shared
    #: directory, S3). False for per-process stores such as ``memory://``; then the
    #: engine, not the worker, writes task checkpoints.
    shared: ClassVar[bool] = True
    #: True if :meth:`put_if_absent_many_blocking` works (a backend whose calls are
    #: blocking work in a thread anyway, such as files).
    blocking_batches: ClassVar[bool] = False
    #: True if a batch lands in order: after a crash, a key of a :meth:`put_many` or
    #: :meth:`put_if_absent_many` that survived means every key before it in the batch
    #: survived too (a filesystem that commits its metadata in order). The engine then
    #: creates a workflow's first ``meta.json`` with its status marker in one batch,
    #: the marker first; elsewhere it waits for the marker.
    ordered_batches: ClassVar[bool] = False

    def __init__(self, uri: str) -> None:
        self._uri = uri

    @property
    def uri(self) -> str:
        """The URI this storage was opened from, without secrets."""
        return self._uri

    def __reduce__(self) -> Any:
        return (open_storage, (self._uri,))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._uri!r})"

    @abc.abstractmethod
    async def get(self, key: str) -> bytes | None:
        """Return the bytes stored under ``key``, or ``None`` if there are none."""

    @abc.abstractmethod
    async def put(self, key: str, data: bytes) -> None:
        """Store ``data`` under ``key`` atomically and durably, replacing any old value."""

    async def put_many(self, items: Mapping[str, bytes]) -> None:
        """Store several keys; each one atomically. Backends may batch the durability
        work (one fsync for the batch); the default stores them one after another."""
        for key, data in items.items():
            await self.put(key, data)

    @abc.abstractmethod
    async def put_if_absent(self, key: str, data: bytes) -> bool:
        """Store ``data`` only if ``key`` has no value. True if this call stored it."""

    async def put_if_absent_many(self, items: Mapping[str, bytes]) -> dict[str, bool]:
        """``put_if_absent`` for several keys, each on its own (some may be stored and
        others not); key -> whether this call stored it. Backends may batch the
        durability work; the default stores them one after another."""
        return {key: await self.put_if_absent(key, data) for key, data in items.items()}

    def put_if_absent_many_blocking(self, items: Mapping[str, bytes]) -> dict[str, bool]:
        """:meth:`put_if_absent_many` in the calling thread, blocking it, for a caller
        without an event loop at hand (the blocking ``run_async`` stores its workflow
        with it: handing the batch to a loop and a thread costs about as much as the
        durable write). Only where :attr:`blocking_batches` is true."""
        raise NotImplementedError(f"{type(self).__name__} has no blocking batches")

    @abc.abstractmethod
    async def compare_and_set(self, key: str, expected: bytes | None, data: bytes) -> bool:
        """Replace the value of ``key`` with ``data`` only if it currently equals
        ``expected`` (``None``: only if absent). True if this call replaced it."""

    @abc.abstractmethod
    async def delete(self, key: str) -> bool:
        """Remove ``key``. True if it existed."""

    async def delete_many(self, keys: list[str]) -> dict[str, bool]:
        """``delete`` several keys; key -> whether it existed. Backends may batch the
        durability work; the default deletes them one after another."""
        return {key: await self.delete(key) for key in keys}

    async def discard_many(self, keys: list[str]) -> None:
        """Delete keys whose deletion need not survive a crash (whoever reads them
        copes with a key that comes back): a backend may skip the durability work.
        The default is :meth:`delete_many`."""
        await self.delete_many(keys)

    @abc.abstractmethod
    async def delete_prefix(self, prefix: str) -> int:
        """Remove every key starting with ``prefix``; return how many were removed."""

    @abc.abstractmethod
    async def list(self, prefix: str = "") -> list[str]:
        """Every key that starts with ``prefix``, sorted."""

    async def exists(self, key: str) -> bool:
        """True if ``key`` has a value."""
        return await self.get(key) is not None

    async def check(self) -> None:
        """Raise :class:`~ray_workflows.exceptions.StorageError` with a clear message if
        the storage cannot be used (unreachable, no permission). Called by ``init``."""
        await self.list("__probe__/")

    async def close(self) -> None:
        """Release connections and threads. The storage is not used afterwards."""


# Reentrant: a wrapper plugin (e.g. faulty://) opens its inner storage while being opened.
_open_lock = threading.RLock()
_opened: dict[str, Storage] = {}


def open_storage(uri: str) -> Storage:
    """Return the storage for ``uri``, one shared instance per URI in a process."""
    if not isinstance(uri, str) or not uri.strip():
        raise UnknownStorageError(
            f"storage must be a URI such as '/path', 'file:///path', 'memory://' or "
            f"'s3://bucket/prefix', got {uri!r}"
        )
    with _open_lock:
        storage = _opened.get(uri)
        if storage is None:
            storage = _open_new(uri)
            _opened[uri] = storage
        return storage


def _open_new(uri: str) -> Storage:
    scheme = storage_scheme(uri)
    try:
        cls = load(STORAGE_GROUP, scheme)
    except LookupError as exc:
        raise UnknownStorageError(
            f"Unknown storage scheme {scheme!r} in {uri!r}. {exc}", uri=uri, scheme=scheme
        ) from None
    if not (isinstance(cls, type) and issubclass(cls, Storage)):
        raise UnknownStorageError(
            f"Plugin {scheme!r} is {cls!r}, not a ray_workflows.storage.Storage subclass.",
            uri=uri,
            scheme=scheme,
        )
    storage: Storage = cls(uri)
    return storage


def forget_storage(uri: str) -> None:
    """Drop the cached instance for ``uri`` (tests, and after ``close``)."""
    with _open_lock:
        _opened.pop(uri, None)


def check_key(key: str) -> str:
    """Validate a storage key; return it unchanged."""
    if not isinstance(key, str) or not key:
        raise ValueError(f"storage key must be a non-empty string, got {key!r}")
    if key.startswith("/") or "\\" in key or "\x00" in key:
        raise ValueError(f"storage key must be a relative '/'-separated path, got {key!r}")
    if any(part in ("", ".", "..") for part in key.split("/")):
        raise ValueError(f"storage key has an empty, '.' or '..' segment: {key!r}")
    return key


def check_prefix(prefix: str) -> str:
    """Validate a listing prefix: empty, or a key that may end with ``/``."""
    if prefix:
        check_key(prefix[:-1] if prefix.endswith("/") else prefix)
    return prefix


__all__ = [
    "Storage",
    "TransientStorageError",
    "check_key",
    "check_prefix",
    "forget_storage",
    "open_storage",
]
