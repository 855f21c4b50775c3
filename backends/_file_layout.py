"""The files a file storage keeps besides its keys, and the steps every write takes.

Names starting with :data:`RESERVED` belong to the backend: temp files, written and
fsynced before they are renamed or linked over a key, and the directory of lock
files (stripes) that writers of a key hold while they rename or unlink it. Keys'
directories are created on demand, durably. Everything here runs in a worker
thread of the file storage.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import itertools
import os
import secrets
from collections.abc import Iterator

from ray_workflows.backends._file_syncfs import SFR_WRITE, SYNC_FILE_RANGE, write_back

# Names the backend keeps for itself: temp files and the lock directory. ``list``
# skips them and keys may not use them, so no user key can ever collide with one.
RESERVED = ".rwf-"
_TMP = RESERVED + "tmp-"
_LOCKS = RESERVED + "locks"
# Lock files (stripes) that keys hash to: a key's writers all take the same one.
# Changing the number or the hash makes processes of two versions lock different
# files for one key: every process sharing a root must run the same version.
LOCK_STRIPES = 256
# Temp names: random per process, then a counter (no urandom call per write; O_EXCL
# would refuse a clash anyway).
_TMP_PREFIX = secrets.token_hex(6)
_tmp_numbers = itertools.count()
CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
# A concurrent delete_prefix may remove an empty directory between our mkdir and
# our open; the writer recreates it a few times before giving up.
DIR_RETRIES = 5


def lock_path(root: str, key: str) -> str:
    """The lock file that every writer of ``key`` holds while it changes it. From the
    key, not the path: hosts may mount a shared root at different paths."""
    digest = hashlib.sha1(key.encode(), usedforsecurity=False).digest()
    stripe = int.from_bytes(digest[:4], "big") % LOCK_STRIPES
    return os.path.join(root, _LOCKS, f"{stripe:02x}")


@contextlib.contextmanager
def flocked(path: str) -> Iterator[None]:
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


def fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        return  # removed by a concurrent delete_prefix: nothing left to make durable
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def ensure_dir(path: str, sync: bool = True) -> None:
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
            fsync_dir(os.path.dirname(directory))


def open_temp(directory: str, sync: bool = True) -> tuple[int, str]:
    # The directory is created on demand: the first write into it fails to open.
    for attempt in range(DIR_RETRIES):
        # The pid too: a forked child continues its parent's counter.
        name = f"{_TMP}{_TMP_PREFIX}-{os.getpid()}-{next(_tmp_numbers)}"
        tmp = os.path.join(directory, name)
        try:
            return os.open(tmp, CREATE_FLAGS, 0o666), tmp
        except FileExistsError:  # a forked process reusing its parent's numbers
            continue
        except FileNotFoundError:
            if attempt == DIR_RETRIES - 1:
                raise
        with contextlib.suppress(FileNotFoundError):
            ensure_dir(directory, sync)
    raise AssertionError("unreachable")


def write_temp(directory: str, data: bytes, sync: bool = True) -> str:
    fd, tmp = write_temp_open(directory, data, sync)
    os.close(fd)
    return tmp


def write_temp_open(directory: str, data: bytes, sync: bool = True) -> tuple[int, str]:
    """A temp file holding ``data``, still open (for
    :func:`ray_workflows.backends._file_batches.data_first`, which waits on the
    write-back started here when ``sync`` is false); fsynced if ``sync``."""
    fd, tmp = open_temp(directory, sync)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        if sync:
            os.fsync(fd)
        elif SYNC_FILE_RANGE is not None and data:
            write_back(fd, SFR_WRITE, tmp)  # started now; data_first waits for it
    except BaseException:
        os.close(fd)
        unlink_quietly(tmp)
        raise
    return fd, tmp


def unlink_quietly(path: str) -> None:
    # Best effort: a leftover temp file is invisible to readers and listings.
    with contextlib.suppress(OSError):
        os.unlink(path)


__all__ = [
    "CREATE_FLAGS",
    "DIR_RETRIES",
    "LOCK_STRIPES",
    "RESERVED",
    "ensure_dir",
    "flocked",
    "fsync_dir",
    "lock_path",
    "open_temp",
    "unlink_quietly",
    "write_temp",
    "write_temp_open",
]
