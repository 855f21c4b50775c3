"""Storage in a local or shared directory: ``/path``, ``~/path`` or ``file:///path``.

Key ``a/b/c`` is the file ``<root>/a/b/c``. Every write goes to a temp file in
the key's directory, is fsynced, renamed over the key, and then the directory is
fsynced so that the rename survives a crash too. All the blocking work of one
call runs in one worker thread: chaining async file calls costs a thread hop per
call, several times the price of a small durable write.

``put_if_absent`` links a finished temp file to the key (``link`` fails if the
key exists, atomically, in every process). Every other change of a key (``put``,
``put_many``, ``compare_and_set`` from a value, ``delete``, ``delete_many``,
``discard_many``, ``delete_prefix``) renames or unlinks while it holds an exclusive
``flock`` on the key's lock file, so that no write lands between the read and the
rename of a ``compare_and_set``, in any process. Only the rename or unlink is
locked: temp files are written and fsynced before, directories fsynced after.
The lock files are a fixed set of stripes that keys hash to (never one file per
key, which would grow without bound; keys sharing a stripe only wait for each
other's rename), under a directory of the root, and are never removed.

A batch (``put_many``, ``put_if_absent_many``, ``delete_many``) of several keys
is made durable with ``syncfs`` on Linux instead of fsyncs per key and directory:
all temp files are written and their data written back to the device
(``sync_file_range``), all are renamed or linked, and one ``syncfs`` makes data
and names durable together (on filesystems that commit metadata in order, so no
name can become durable before its data; elsewhere a first ``syncfs`` does that
before the names). A batch of deletes needs one ``syncfs``. Each key still
changes atomically. ``syncfs`` also flushes other programs' unwritten data on
the same filesystem, which costs little on a directory of its own and more on a
disk busy with large writes. Only local filesystems known to honour ``syncfs``
take that path (ext2/3/4, xfs, btrfs, f2fs, zfs, tmpfs, decided once per root from
``/proc/self/mountinfo``); on NFS, SMB, FUSE, overlay or an unknown filesystem,
or for one key, each file and directory is fsynced on its own.

Errors: an ``OSError`` a retry may get past raises :class:`TransientStorageError`
(a full disk or quota, a timeout, a stale handle or dropped connection of a network
filesystem, a busy or locked file); every other one (no permission, a read-only
filesystem, a missing directory, an I/O error of the device, a key that is also a
directory) a plain :class:`StorageError`.

This module is the plugin class; the blocking work it hands to its threads lives in
private modules: ``_file_ops`` (one key, a listing, a prefix), ``_file_batches``
(several keys), ``_file_layout`` (temp files, directories, lock stripes) and
``_file_syncfs`` (which roots trust ``syncfs``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import os
from collections.abc import Callable, Mapping
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

from ray_workflows.backends import _file_batches, _file_ops
from ray_workflows.backends._file_layout import RESERVED, lock_path
from ray_workflows.backends._file_syncfs import one_syncfs

from ray_workflows.exceptions import StorageError, TransientStorageError
from ray_workflows.storage import Storage, check_key, check_prefix

_T = TypeVar("_T")

# The blocking work runs in threads of its own, not the event loop's default
# executor: other code parking threads there (blocking waits) must not hold up
# durable writes. Concurrent fsyncs also share the journal's commits.
_THREADS = 16
_executor: concurrent.futures.ThreadPoolExecutor | None = None


def _pool() -> concurrent.futures.ThreadPoolExecutor:
    global _executor
    if _executor is None:
        _executor = concurrent.futures.ThreadPoolExecutor(_THREADS, "rwf-file")
    return _executor


# Errors that mean "a key is also used as the directory of other keys".
_LAYOUT_ERRORS = (NotADirectoryError, IsADirectoryError, FileExistsError)
# Errors that may pass by themselves: space freed, a network filesystem back.
_TRANSIENT_ERRNOS = frozenset(
    getattr(errno, name)
    for name in (
        "ENOSPC",
        "EDQUOT",
        "EAGAIN",
        "EBUSY",
        "EINTR",
        "ENOLCK",
        "ESTALE",
        "ETIMEDOUT",
        "ECONNRESET",
        "ECONNREFUSED",
        "ECONNABORTED",
        "EHOSTUNREACH",
        "ENETUNREACH",
    )
    if hasattr(errno, name)
)


def _several(keys: list[str]) -> str:
    """A batch of keys, as error messages name it."""
    return f"of {len(keys)} keys, the first {keys[0]!r}"


def _root_path(uri: str) -> str:
    path = uri
    if uri.startswith("file:"):
        parts = urlsplit(uri)
        if parts.netloc not in ("", "localhost"):
            raise StorageError(
                f"File storage URI {uri!r} names the host {parts.netloc!r}; use "
                "'file:///absolute/path' (three slashes) or a bare path.",
                uri=uri,
            )
        path = unquote(parts.path)
        if not path:
            raise StorageError(f"File storage URI {uri!r} has no path.", uri=uri)
    # The registry caches instances by the URI as given, so a relative path is
    # resolved once, against the working directory at open time.
    return os.path.abspath(os.path.expanduser(path))


class FileStorage(Storage):
    scheme = "file"
    shared = True
    blocking_batches = True

    def __init__(self, uri: str) -> None:
        super().__init__(uri)
        self._root = _root_path(uri)

    @property
    def root(self) -> str:
        """The absolute directory that holds the keys."""
        return self._root

    @property
    def ordered_batches(self) -> bool:  # type: ignore[override]
        # A batch's renames are made in its order and made durable by one syncfs, on a
        # filesystem that commits metadata in order (see _file_batches.data_first).
        # False until the root's first batch has looked its filesystem up.
        ordered: bool = one_syncfs(self._root)
        return ordered

    async def get(self, key: str) -> bytes | None:
        return await self._run("get", repr(key), _file_ops.read, self._path(key))

    async def put(self, key: str, data: bytes) -> None:
        await self._run("put", repr(key), _file_ops.replace, self._path(key), self._lock(key), data)

    async def put_many(self, items: Mapping[str, bytes]) -> None:
        writes = [(self._path(key), self._lock(key), data) for key, data in items.items()]
        if writes:
            await self._run(
                "put_many", _several(list(items)), _file_batches.replace_many, self._root, writes
            )

    async def put_if_absent(self, key: str, data: bytes) -> bool:
        return await self._run("put_if_absent", repr(key), _file_ops.create, self._path(key), data)

    async def put_if_absent_many(self, items: Mapping[str, bytes]) -> dict[str, bool]:
        if not items:
            return {}
        # All of it in the storage thread: one hop for the batch.
        return await asyncio.get_running_loop().run_in_executor(
            _pool(), self.put_if_absent_many_blocking, items
        )

    def put_if_absent_many_blocking(self, items: Mapping[str, bytes]) -> dict[str, bool]:
        keys = list(items)
        pairs = [(self._path(key), data) for key, data in items.items()]
        if not pairs:
            return {}
        created = self._call(
            "put_if_absent_many", _several(keys), _file_batches.create_many, self._root, pairs
        )
        return dict(zip(keys, created, strict=True))

    async def compare_and_set(self, key: str, expected: bytes | None, data: bytes) -> bool:
        path = self._path(key)
        return await self._run(
            "compare_and_set",
            repr(key),
            _file_ops.compare_and_set,
            path,
            self._lock(key),
            expected,
            data,
        )

    async def delete(self, key: str) -> bool:
        return await self._run(
            "delete", repr(key), _file_ops.delete, self._path(key), self._lock(key)
        )

    async def delete_many(self, keys: list[str]) -> dict[str, bool]:
        targets = [(self._path(key), self._lock(key)) for key in keys]
        if not targets:
            return {}
        existed = await self._run(
            "delete_many", _several(keys), _file_batches.delete_many, self._root, targets
        )
        return dict(zip(keys, existed, strict=True))

    async def discard_many(self, keys: list[str]) -> None:
        # Unlinked, not synced: the filesystem's next commit makes it stick.
        targets = [(self._path(key), self._lock(key)) for key in keys]
        if targets:
            await self._run("discard_many", _several(keys), _file_ops.unlink_all, targets)

    async def delete_prefix(self, prefix: str) -> int:
        check_prefix(prefix)
        return await self._run(
            "delete_prefix", repr(prefix), _file_ops.delete_prefix, self._root, prefix
        )

    async def list(self, prefix: str = "") -> list[str]:
        check_prefix(prefix)
        return await self._run("list", repr(prefix), _file_ops.list_keys, self._root, prefix)

    async def exists(self, key: str) -> bool:
        return await self._run("exists", repr(key), os.path.isfile, self._path(key))

    async def check(self) -> None:
        try:
            await asyncio.get_running_loop().run_in_executor(_pool(), _file_ops.probe, self._root)
        except OSError as exc:
            raise StorageError(
                f"File storage directory {self._root!r} cannot be created or written: {exc}",
                uri=self._uri,
                root=self._root,
            ) from exc

    def _path(self, key: str) -> str:
        check_key(key)
        if RESERVED in key and any(part.startswith(RESERVED) for part in key.split("/")):
            raise ValueError(
                f"storage key {key!r} has a segment starting with {RESERVED!r}, "
                "which the file storage reserves for its temp and lock files"
            )
        return os.path.join(self._root, key)

    def _lock(self, key: str) -> str:
        path: str = lock_path(self._root, key)
        return path

    async def _run(self, op: str, what: str, fn: Callable[..., _T], *args: Any) -> _T:
        # If the awaiting task is canceled the thread still finishes: a put that
        # was started may land. Every write is atomic, so it lands whole or not at all.
        return await asyncio.get_running_loop().run_in_executor(
            _pool(), self._call, op, what, fn, *args
        )

    def _call(self, op: str, what: str, fn: Callable[..., _T], *args: Any) -> _T:
        try:
            return fn(*args)
        except OSError as exc:
            hint = ""
            if isinstance(exc, _LAYOUT_ERRORS):
                hint = (
                    " (in a file storage a key cannot also be a directory of other keys, "
                    "such as 'a' and 'a/b')"
                )
            cls = TransientStorageError if exc.errno in _TRANSIENT_ERRNOS else StorageError
            raise cls(
                f"File storage {self._root!r}: {op} {what} failed: {exc}{hint}",
                uri=self._uri,
                root=self._root,
                operation=op,
            ) from exc


__all__ = ["FileStorage"]
