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
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import fcntl
import hashlib
import itertools
import os
import re
import secrets
import threading
from collections.abc import Callable, Iterator, Mapping, Sized
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

from ray_workflows._core.log import get_logger
from ray_workflows.exceptions import StorageError
from ray_workflows.storage import Storage, check_key, check_prefix

log = get_logger()

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


# Names the backend keeps for itself: temp files and the lock directory. ``list``
# skips them and keys may not use them, so no user key can ever collide with one.
_RESERVED = ".rwf-"
_TMP = _RESERVED + "tmp-"
_LOCKS = _RESERVED + "locks"
# Lock files (stripes) that keys hash to: a key's writers all take the same one.
# Changing the number or the hash makes processes of two versions lock different
# files for one key: every process sharing a root must run the same version.
_LOCK_STRIPES = 256
# Temp names: random per process, then a counter (no urandom call per write; O_EXCL
# would refuse a clash anyway).
_TMP_PREFIX = secrets.token_hex(6)
_tmp_numbers = itertools.count()
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
# A concurrent delete_prefix may remove an empty directory between our mkdir and
# our open; the writer recreates it a few times before giving up.
_DIR_RETRIES = 5
# Errors that mean "a key is also used as the directory of other keys".
_LAYOUT_ERRORS = (NotADirectoryError, IsADirectoryError, FileExistsError)


def _load_syncfs() -> Callable[[int], int] | None:
    # Before Linux 5.8 syncfs did not report writeback errors: fsync per file there.
    try:
        major, minor = (int(x) for x in os.uname().release.split(".")[:2])
    except (AttributeError, ValueError):
        return None
    if (major, minor) < (5, 8):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError):  # not Linux (or no syncfs in this libc)
        return None
    fn.argtypes = [ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


_SYNCFS = _load_syncfs()


def _load_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    if _SYNCFS is None:
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


# With it, a batch needs one syncfs, not two (see _data_first).
_SYNC_FILE_RANGE = _load_sync_file_range()
_SFR_WAIT_BEFORE, _SFR_WRITE, _SFR_WAIT_AFTER = 1, 2, 4

# Filesystems whose syncfs writes and flushes their own disk (and, from Linux 5.8,
# reports writeback errors). A network or FUSE filesystem may answer syncfs
# without the server having persisted anything (FUSE passes it on only from Linux
# 5.14, and only to daemons that implement it). Overlay does sync its upper layer,
# but a writeback error there lands on the upper filesystem's error counter, which
# syncfs on the overlay never checks; fsync goes to the upper file and reports it.
_SYNCFS_FILESYSTEMS = frozenset({"ext2", "ext3", "ext4", "xfs", "btrfs", "f2fs", "zfs", "tmpfs"})
# Of those, the ones that commit metadata in order (journaled or copy-on-write), so
# a batch needs one syncfs only (see _data_first); tmpfs keeps nothing anyway.
# (Not btrfs: it records a file's extents and size only after its writeback ends, so
# another commit between a rename and the syncfs could land the name first.)
_ORDERED_FILESYSTEMS = frozenset({"ext3", "ext4", "xfs", "tmpfs"})
_MOUNTINFO = "/proc/self/mountinfo"
# Decided once per root, in a worker thread, at the root's first batch.
_syncfs_roots: dict[str, bool] = {}
_ordered_roots: dict[str, bool] = {}
_syncfs_lock = threading.Lock()


def _unescape(field: str) -> str:
    # The kernel writes space, tab, newline and backslash in paths as octal escapes.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _root_filesystem(mountinfo: str, root: str) -> str | None:
    """The type of the one filesystem holding everything under the absolute,
    symlink-free ``root``, as ``mountinfo`` (the text of /proc/self/mountinfo) has
    it; None if no mount holds it or another filesystem is mounted inside it."""
    inside = root.rstrip("/") + "/"
    best: tuple[str, str] | None = None
    for line in mountinfo.splitlines():
        # id parent dev root mount-point options [optional...] - fstype source super-options
        fields = line.split(" ")
        try:
            fstype = fields[fields.index("-", 6) + 1]
        except (ValueError, IndexError):
            continue  # not a line of that form
        point = _unescape(fields[4])
        if point.startswith(inside):
            return None  # keys under it would live on a filesystem syncfs of root misses
        # The longest mount point holding root; of equal ones the last, mounted on top.
        contains = root == point or root.startswith(point.rstrip("/") + "/")
        if contains and (best is None or len(point) >= len(best[0])):
            best = (point, fstype)
    return best[1] if best else None


def _syncfs_trusted(fstype: str | None) -> bool:
    return fstype in _SYNCFS_FILESYSTEMS


def _root_syncfs(root: str) -> bool:
    trusted = _syncfs_roots.get(root)
    if trusted is not None:
        return trusted
    with _syncfs_lock:  # two first batches of one root: one decides, and logs
        trusted = _syncfs_roots.get(root)
        if trusted is None:
            try:
                with open(_MOUNTINFO, "rb") as f:
                    mountinfo = os.fsdecode(f.read())
            except OSError:
                mountinfo = ""
            fstype = _root_filesystem(mountinfo, os.path.realpath(root))
            _ordered_roots[root] = fstype in _ORDERED_FILESYSTEMS
            trusted = _syncfs_roots[root] = _syncfs_trusted(fstype)
            log.debug(
                "storage.batch_sync_chosen",
                root=root,
                filesystem=fstype,
                method="syncfs" if trusted else "fsync",
            )
    return trusted


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
        # filesystem that commits metadata in order (see _data_first). False until
        # the root's first batch has looked its filesystem up.
        return _one_syncfs(self._root)

    async def get(self, key: str) -> bytes | None:
        return await self._run("get", repr(key), _read, self._path(key))

    async def put(self, key: str, data: bytes) -> None:
        await self._run("put", repr(key), _replace, self._path(key), self._lock(key), data)

    async def put_many(self, items: Mapping[str, bytes]) -> None:
        writes = [(self._path(key), self._lock(key), data) for key, data in items.items()]
        if writes:
            await self._run("put_many", _several(list(items)), _replace_many, self._root, writes)

    async def put_if_absent(self, key: str, data: bytes) -> bool:
        return await self._run("put_if_absent", repr(key), _create, self._path(key), data)

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
        created = self._call("put_if_absent_many", _several(keys), _create_many, self._root, pairs)
        return dict(zip(keys, created, strict=True))

    async def compare_and_set(self, key: str, expected: bytes | None, data: bytes) -> bool:
        path = self._path(key)
        return await self._run(
            "compare_and_set", repr(key), _compare_and_set, path, self._lock(key), expected, data
        )

    async def delete(self, key: str) -> bool:
        return await self._run("delete", repr(key), _delete, self._path(key), self._lock(key))

    async def delete_many(self, keys: list[str]) -> dict[str, bool]:
        targets = [(self._path(key), self._lock(key)) for key in keys]
        if not targets:
            return {}
        existed = await self._run("delete_many", _several(keys), _delete_many, self._root, targets)
        return dict(zip(keys, existed, strict=True))

    async def discard_many(self, keys: list[str]) -> None:
        # Unlinked, not synced: the filesystem's next commit makes it stick.
        targets = [(self._path(key), self._lock(key)) for key in keys]
        if targets:
            await self._run("discard_many", _several(keys), _unlink_all, targets)

    async def delete_prefix(self, prefix: str) -> int:
        check_prefix(prefix)
        return await self._run("delete_prefix", repr(prefix), _delete_prefix, self._root, prefix)

    async def list(self, prefix: str = "") -> list[str]:
        check_prefix(prefix)
        return await self._run("list", repr(prefix), _list, self._root, prefix)

    async def exists(self, key: str) -> bool:
        return await self._run("exists", repr(key), os.path.isfile, self._path(key))

    async def check(self) -> None:
        try:
            await asyncio.get_running_loop().run_in_executor(_pool(), _probe, self._root)
        except OSError as exc:
            raise StorageError(
                f"File storage directory {self._root!r} cannot be created or written: {exc}",
                uri=self._uri,
                root=self._root,
            ) from exc

    def _path(self, key: str) -> str:
        check_key(key)
        if _RESERVED in key and any(part.startswith(_RESERVED) for part in key.split("/")):
            raise ValueError(
                f"storage key {key!r} has a segment starting with {_RESERVED!r}, "
                "which the file storage reserves for its temp and lock files"
            )
        return os.path.join(self._root, key)

    def _lock(self, key: str) -> str:
        return _lock_path(self._root, key)

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
            raise StorageError(
                f"File storage {self._root!r}: {op} {what} failed: {exc}{hint}",
                uri=self._uri,
                root=self._root,
                operation=op,
            ) from exc


def _lock_path(root: str, key: str) -> str:
    """The lock file that every writer of ``key`` holds while it changes it. From the
    key, not the path: hosts may mount a shared root at different paths."""
    digest = hashlib.sha1(key.encode(), usedforsecurity=False).digest()
    stripe = int.from_bytes(digest[:4], "big") % _LOCK_STRIPES
    return os.path.join(root, _LOCKS, f"{stripe:02x}")


# Everything below runs in a worker thread.


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        return  # removed by a concurrent delete_prefix: nothing left to make durable
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_filesystem(root: str) -> None:
    assert _SYNCFS is not None
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if _SYNCFS(fd) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"syncfs: {os.strerror(errno)}", root)
    finally:
        os.close(fd)


def _write_back(fd: int, flags: int, path: str) -> None:
    assert _SYNC_FILE_RANGE is not None
    if _SYNC_FILE_RANGE(fd, 0, 0, flags) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"sync_file_range: {os.strerror(errno)}", path)


def _one_syncfs(root: str) -> bool:
    """Whether a batch under ``root`` takes one ``syncfs`` (see :func:`_data_first`):
    its filesystem, looked up at its first batch, commits metadata in order."""
    return _SYNC_FILE_RANGE is not None and _ordered_roots.get(root, False)


def _data_first(root: str, temps: list[tuple[int, str]]) -> None:
    """Before a batch's names are made: its temp files' data on the device (``temps``:
    ``(open fd, path)`` of those holding any), so that no filesystem commit (ours or
    anyone's) can make a name durable without its data.

    With ``sync_file_range``, each temp's data is written back (its blocks allocated,
    in the running journal transaction) and waited for, but not flushed from the
    device's cache: the one ``syncfs`` after the names commits names and allocations
    together, and its cache flush comes before the commit record. The filesystems
    that take this path (see ``_ORDERED_FILESYSTEMS``) commit metadata in order, so a
    name never lands before the allocation of its data. Elsewhere: a ``syncfs``."""
    if not _one_syncfs(root):
        _sync_filesystem(root)
        return
    for fd, tmp in temps:
        _write_back(fd, _SFR_WAIT_BEFORE | _SFR_WRITE | _SFR_WAIT_AFTER, tmp)


def _ensure_dir(path: str, sync: bool = True) -> None:
    # New directory entries must be durable too, or a crash could lose a whole
    # directory of files that were each fsynced. (``sync=False``: the caller's
    # syncfs makes them durable.)
    missing: list[str] = []
    head = path
    while not os.path.isdir(head):
        missing.append(head)
        parent = os.path.dirname(head)
        if parent == head:
            break
        head = parent
    for directory in reversed(missing):
        try:
            os.mkdir(directory)
        except FileExistsError:
            if not os.path.isdir(directory):
                raise
        # Also when another writer won the mkdir: we must not return before the
        # entry is durable, and we cannot know whether that writer got that far.
        if sync:
            _fsync_dir(os.path.dirname(directory))


def _open_temp(directory: str, sync: bool = True) -> tuple[int, str]:
    # The directory is created on demand: the first write into it fails to open.
    for attempt in range(_DIR_RETRIES):
        # The pid too: a forked child continues its parent's counter.
        name = f"{_TMP}{_TMP_PREFIX}-{os.getpid()}-{next(_tmp_numbers)}"
        tmp = os.path.join(directory, name)
        try:
            return os.open(tmp, _CREATE_FLAGS, 0o666), tmp
        except FileExistsError:  # a forked process reusing its parent's numbers
            continue
        except FileNotFoundError:
            if attempt == _DIR_RETRIES - 1:
                raise
        with contextlib.suppress(FileNotFoundError):
            _ensure_dir(directory, sync)
    raise AssertionError("unreachable")


def _write_temp(directory: str, data: bytes, sync: bool = True) -> str:
    fd, tmp = _write_temp_open(directory, data, sync)
    os.close(fd)
    return tmp


def _write_temp_open(directory: str, data: bytes, sync: bool = True) -> tuple[int, str]:
    """A temp file holding ``data``, still open (for :func:`_data_first`, which waits
    on the write-back started here when ``sync`` is false); fsynced if ``sync``."""
    fd, tmp = _open_temp(directory, sync)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        if sync:
            os.fsync(fd)
        elif _SYNC_FILE_RANGE is not None and data:
            _write_back(fd, _SFR_WRITE, tmp)  # started now; _data_first waits for it
    except BaseException:
        os.close(fd)
        _unlink_quietly(tmp)
        raise
    return fd, tmp


def _unlink_quietly(path: str) -> None:
    # Best effort: a leftover temp file is invisible to readers and listings.
    with contextlib.suppress(OSError):
        os.unlink(path)


def _read(path: str) -> bytes | None:
    try:
        with open(path, "rb", buffering=0) as f:
            return f.read()
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return None


def _replace(path: str, lock: str, data: bytes) -> None:
    directory = os.path.dirname(path)
    tmp = _write_temp(directory, data)
    try:
        with _flocked(lock):
            os.replace(tmp, path)
    except BaseException:
        _unlink_quietly(tmp)
        raise
    _fsync_dir(directory)


def _batched(root: str, items: Sized) -> bool:
    """Whether a batch of ``items`` keys under ``root`` is made durable with syncfs."""
    return _SYNCFS is not None and len(items) > 1 and _root_syncfs(root)


def _replace_many(root: str, writes: list[tuple[str, str, bytes]]) -> None:
    """``writes``: (path, lock, data) per key."""
    batched = _batched(root, writes)
    temps: list[str] = []
    fds: list[int] = []  # the temps' (batched: kept open for _data_first)
    renamed = 0
    try:
        for path, _, data in writes:
            fd, tmp = _write_temp_open(os.path.dirname(path), data, sync=not batched)
            temps.append(tmp)
            fds.append(fd)
            if not batched:
                os.close(fds.pop())
        if batched:
            _data_first(
                root,
                [(fd, tmp) for fd, tmp, (*_, data) in zip(fds, temps, writes, strict=True) if data],
            )
        # One lock at a time, each held for its rename only: a batch never holds one
        # lock while it waits for another, so batches cannot deadlock each other.
        for tmp, (path, lock, _) in zip(temps, writes, strict=False):
            with _flocked(lock):
                os.replace(tmp, path)
            renamed += 1
    finally:
        for fd in fds:
            os.close(fd)
        for tmp in temps[renamed:]:
            _unlink_quietly(tmp)
    if batched:
        _sync_filesystem(root)  # the renames (and new directories)
        return
    for directory in dict.fromkeys(os.path.dirname(path) for path, _, _ in writes):
        _fsync_dir(directory)


def _create(path: str, data: bytes) -> bool:
    # A cheap early answer for the common losing case; link() below decides.
    if os.path.lexists(path):
        return False
    directory = os.path.dirname(path)
    tmp = _write_temp(directory, data)
    try:
        os.link(tmp, path)
    except FileExistsError:
        return False
    finally:
        _unlink_quietly(tmp)
    _fsync_dir(directory)
    return True


_EMPTY = "<empty>"  # in _create_many: a key whose empty file is created in place


def _create_empty(path: str) -> bool:
    """Create an empty file at ``path`` unless something is there (atomic: there is no
    content to be torn); made durable by the batch's ``syncfs``."""
    for attempt in range(_DIR_RETRIES):
        try:
            os.close(os.open(path, _CREATE_FLAGS, 0o666))
            return True
        except FileExistsError:
            return False
        except FileNotFoundError:
            if attempt == _DIR_RETRIES - 1:
                raise
            _ensure_dir(os.path.dirname(path), sync=False)
    return False


def _create_many(root: str, pairs: list[tuple[str, bytes]]) -> list[bool]:
    if not _batched(root, pairs):
        return [_create(path, data) for path, data in pairs]
    # No early lexists per key: a new workflow's keys are absent, and link() and
    # O_EXCL decide anyway (a key that exists costs a temp file, not a wrong answer).
    temps: list[str] = []  # per key: its temp file, or _EMPTY (created in place)
    fds: list[tuple[int, str]] = []  # the temps holding data, open for _data_first
    created = [False] * len(pairs)
    try:
        for path, data in pairs:
            if not data:
                temps.append(_EMPTY)  # created in place below: an empty file needs no temp
            else:
                fd, tmp = _write_temp_open(os.path.dirname(path), data, sync=False)
                fds.append((fd, tmp))
                temps.append(tmp)
        _data_first(root, fds)
        # In the batch's order (see ordered_batches): each name after the ones before it.
        for i, (tmp, (path, _)) in enumerate(zip(temps, pairs, strict=True)):
            if tmp is _EMPTY:
                created[i] = _create_empty(path)
            else:
                with contextlib.suppress(FileExistsError):
                    os.link(tmp, path)
                    created[i] = True
    finally:
        for fd, _ in fds:
            os.close(fd)
        for tmp in temps:
            if tmp is not _EMPTY:
                _unlink_quietly(tmp)
    if any(created):
        _sync_filesystem(root)  # the new names (and directories)
    return created


@contextlib.contextmanager
def _flocked(path: str) -> Iterator[None]:
    # Lock files are never removed: unlinking one while another process waits
    # on it would let a third process lock a fresh file and run concurrently.
    # A new descriptor per hold: flock excludes other open files, and so other
    # threads of this process too, only through a descriptor of their own.
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    except FileNotFoundError:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _compare_and_set(path: str, lock: str, expected: bytes | None, data: bytes) -> bool:
    if expected is None:
        # Decided by link(), which fails if the key exists: no lock needed, as every
        # locked writer only renames over or unlinks what is there.
        return _create(path, data)
    # A cheap early answer for the common losing case (a read is a moment at which
    # the key did not hold ``expected``); the locked read below decides.
    if _read(path) != expected:
        return False
    # The new value is written and fsynced before the lock, so that the lock is held
    # for a read and a rename only, not for two fsyncs.
    directory = os.path.dirname(path)
    tmp = _write_temp(directory, data)
    try:
        with _flocked(lock):
            won = _read(path) == expected
            if won:
                os.replace(tmp, path)
    except BaseException:
        _unlink_quietly(tmp)
        raise
    if not won:
        _unlink_quietly(tmp)
        return False
    # After the lock: a writer that replaces this value meanwhile fsyncs it too.
    _fsync_dir(directory)
    return True


def _unlink(path: str, lock: str) -> bool:
    """Remove the key at ``path`` under its lock (not durably); True if it was there."""
    if not os.path.lexists(path):
        # Absent at this moment, which is an answer: no lock (nor lock directory, nor
        # root) is made for a key that is not there.
        return False
    with _flocked(lock):
        try:
            os.unlink(path)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return False
    return True


def _delete(path: str, lock: str) -> bool:
    if not _unlink(path, lock):
        return False
    _fsync_dir(os.path.dirname(path))
    return True


def _unlink_all(targets: list[tuple[str, str]]) -> None:
    for path, lock in targets:
        _unlink(path, lock)


def _delete_many(root: str, targets: list[tuple[str, str]]) -> list[bool]:
    if not _batched(root, targets):
        return [_delete(path, lock) for path, lock in targets]
    existed = [_unlink(path, lock) for path, lock in targets]
    if any(existed):
        _sync_filesystem(root)
    return existed


def _list(root: str, prefix: str) -> list[str]:
    # Read only the deepest directory the prefix names: "w1/" opens w1 and never
    # w10; "workflows/w" opens workflows and keeps the entries starting with "w".
    head, _, tail = prefix.rpartition("/")
    base = os.path.join(root, head) if head else root
    try:
        with os.scandir(base) as it:
            entries = [e for e in it if e.name.startswith(tail)]
    except (FileNotFoundError, NotADirectoryError):
        return []
    keys: list[str] = []
    for entry in entries:
        if not entry.name.startswith(_RESERVED):
            _collect(entry, f"{head}/{entry.name}" if head else entry.name, keys)
    keys.sort()
    return keys


def _collect(entry: os.DirEntry[str], key: str, keys: list[str]) -> None:
    if entry.is_dir(follow_symlinks=False):
        try:
            with os.scandir(entry.path) as it:
                children = list(it)
        except (FileNotFoundError, NotADirectoryError):
            return  # removed while we walked
        for child in children:
            if not child.name.startswith(_RESERVED):
                _collect(child, f"{key}/{child.name}", keys)
    elif entry.is_file():
        keys.append(key)


def _delete_prefix(root: str, prefix: str) -> int:
    removed = 0
    directories: set[str] = set()
    # Under the keys' locks like any delete: unlocked, an unlink could land between the
    # read and the rename of a compare_and_set, which would bring the key back. Keys
    # are grouped by lock file, each taken once for all of its keys (a prefix of
    # thousands of keys takes at most _LOCK_STRIPES locks); the order does not matter.
    by_lock: dict[str, list[str]] = {}
    for key in _list(root, prefix):
        by_lock.setdefault(_lock_path(root, key), []).append(key)
    for lock, keys in by_lock.items():
        with _flocked(lock):
            for key in keys:
                path = os.path.join(root, key)
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    continue  # a concurrent delete got there first
                removed += 1
                directories.add(os.path.dirname(path))
    # Remove directories left empty, deepest first; one that is not empty (a
    # concurrent writer, a stray temp file) stops the climb and is kept.
    kept: set[str] = set()
    for directory in sorted(directories, key=len, reverse=True):
        while directory != root:
            try:
                os.rmdir(directory)
            except OSError:
                break
            directory = os.path.dirname(directory)
        kept.add(directory)
    for directory in kept:
        _fsync_dir(directory)
    return removed


def _probe(root: str) -> None:
    _ensure_dir(root)
    fd, tmp = _open_temp(root)
    os.close(fd)
    os.unlink(tmp)


__all__ = ["FileStorage"]
