"""The file storage's blocking work on one key, or on the keys under a prefix.

Each function is one storage call's work, run whole in a worker thread of the file
storage: a write goes to a temp file in the key's directory, is fsynced, renamed
(or, to create a key, linked) over the key, and then the directory is fsynced.
Renames and unlinks hold the key's lock stripe (see
:mod:`ray_workflows.backends._file_layout`); links need none, as ``link`` fails if
the key exists.
"""

from __future__ import annotations

import os

from ray_workflows.backends._file_layout import (
    RESERVED,
    ensure_dir,
    flocked,
    fsync_dir,
    lock_path,
    open_temp,
    unlink_quietly,
    write_temp,
)


def read(path: str) -> bytes | None:
    try:
        with open(path, "rb", buffering=0) as f:
            return f.read()
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return None


def replace(path: str, lock: str, data: bytes) -> None:
    directory = os.path.dirname(path)
    tmp = write_temp(directory, data)
    try:
        with flocked(lock):
            os.replace(tmp, path)
    except BaseException:
        unlink_quietly(tmp)
        raise
    fsync_dir(directory)


def create(path: str, data: bytes) -> bool:
    # A cheap early answer for the common losing case; link() below decides.
    if os.path.lexists(path):
        return False
    directory = os.path.dirname(path)
    tmp = write_temp(directory, data)
    try:
        os.link(tmp, path)
    except FileExistsError:
        return False
    finally:
        unlink_quietly(tmp)
    fsync_dir(directory)
    return True


def compare_and_set(path: str, lock: str, expected: bytes | None, data: bytes) -> bool:
    if expected is None:
        # Decided by link(), which fails if the key exists: no lock needed, as every
        # locked writer only renames over or unlinks what is there.
        return create(path, data)
    # A cheap early answer for the common losing case (a read is a moment at which
    # the key did not hold ``expected``); the locked read below decides.
    if read(path) != expected:
        return False
    # The new value is written and fsynced before the lock, so that the lock is held
    # for a read and a rename only, not for two fsyncs.
    directory = os.path.dirname(path)
    tmp = write_temp(directory, data)
    try:
        with flocked(lock):
            won = read(path) == expected
            if won:
                os.replace(tmp, path)
    except BaseException:
        unlink_quietly(tmp)
        raise
    if not won:
        unlink_quietly(tmp)
        return False
    # After the lock: a writer that replaces this value meanwhile fsyncs it too.
    fsync_dir(directory)
    return True


def unlink(path: str, lock: str) -> bool:
    """Remove the key at ``path`` under its lock (not durably); True if it was there."""
    if not os.path.lexists(path):
        # Absent at this moment, which is an answer: no lock (nor lock directory, nor
        # root) is made for a key that is not there.
        return False
    with flocked(lock):
        try:
            os.unlink(path)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return False
    return True


def delete(path: str, lock: str) -> bool:
    if not unlink(path, lock):
        return False
    fsync_dir(os.path.dirname(path))
    return True


def unlink_all(targets: list[tuple[str, str]]) -> None:
    for path, lock in targets:
        unlink(path, lock)


def list_keys(root: str, prefix: str) -> list[str]:
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
        if not entry.name.startswith(RESERVED):
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
            if not child.name.startswith(RESERVED):
                _collect(child, f"{key}/{child.name}", keys)
    elif entry.is_file():
        keys.append(key)


def delete_prefix(root: str, prefix: str) -> int:
    removed = 0
    directories: set[str] = set()
    # Under the keys' locks like any delete: unlocked, an unlink could land between the
    # read and the rename of a compare_and_set, which would bring the key back. Keys
    # are grouped by lock file, each taken once for all of its keys (a prefix of
    # thousands of keys takes at most _file_layout.LOCK_STRIPES locks); the order does
    # not matter.
    by_lock: dict[str, list[str]] = {}
    for key in list_keys(root, prefix):
        by_lock.setdefault(lock_path(root, key), []).append(key)
    for lock, keys in by_lock.items():
        with flocked(lock):
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
        fsync_dir(directory)
    return removed


def probe(root: str) -> None:
    ensure_dir(root)
    fd, tmp = open_temp(root)
    os.close(fd)
    os.unlink(tmp)


__all__ = [
    "compare_and_set",
    "create",
    "delete",
    "delete_prefix",
    "list_keys",
    "probe",
    "read",
    "replace",
    "unlink",
    "unlink_all",
]
