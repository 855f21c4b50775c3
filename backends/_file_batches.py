"""The file storage's batches: several keys written, created or deleted in one call.

Where the root allows it (see :mod:`ray_workflows.backends._file_syncfs`), a batch is
made durable with ``syncfs`` instead of fsyncs per key and directory: all temp files
are written and their data written back to the device, all are renamed or linked,
and one ``syncfs`` makes data and names durable together (a first ``syncfs`` makes
the data durable before the names on a filesystem that does not commit metadata in
order). Elsewhere, or for one key, each key is written as on its own (see
:mod:`ray_workflows.backends._file_ops`). Everything here runs in a worker thread
of the file storage.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from collections.abc import Sized

from ray_workflows.backends._file_layout import (
    CREATE_FLAGS,
    DIR_RETRIES,
    ensure_dir,
    flocked,
    fsync_dir,
    unlink_quietly,
    write_temp_open,
)
from ray_workflows.backends._file_ops import create, delete, unlink
from ray_workflows.backends._file_syncfs import (
    SFR_WAIT_AFTER,
    SFR_WAIT_BEFORE,
    SFR_WRITE,
    SYNCFS,
    one_syncfs,
    root_syncfs,
    write_back,
)


def sync_filesystem(root: str) -> None:
    assert SYNCFS is not None
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if SYNCFS(fd) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"syncfs: {os.strerror(errno)}", root)
    finally:
        os.close(fd)


def data_first(root: str, temps: list[tuple[int, str]]) -> None:
    """Before a batch's names are made: its temp files' data on the device (``temps``:
    ``(open fd, path)`` of those holding any), so that no filesystem commit (ours or
    anyone's) can make a name durable without its data.

    With ``sync_file_range``, each temp's data is written back (its blocks allocated,
    in the running journal transaction) and waited for, but not flushed from the
    device's cache: the one ``syncfs`` after the names commits names and allocations
    together, and its cache flush comes before the commit record. The filesystems
    that take this path (see ``_ORDERED_FILESYSTEMS`` in
    :mod:`ray_workflows.backends._file_syncfs`) commit metadata in order, so a name
    never lands before the allocation of its data. Elsewhere: a ``syncfs``."""
    if not one_syncfs(root):
        sync_filesystem(root)
        return
    for fd, tmp in temps:
        write_back(fd, SFR_WAIT_BEFORE | SFR_WRITE | SFR_WAIT_AFTER, tmp)


def _batched(root: str, items: Sized) -> bool:
    """Whether a batch of ``items`` keys under ``root`` is made durable with syncfs."""
    return SYNCFS is not None and len(items) > 1 and root_syncfs(root)


def replace_many(root: str, writes: list[tuple[str, str, bytes]]) -> None:
    """``writes``: (path, lock, data) per key."""
    batched = _batched(root, writes)
    temps: list[str] = []
    fds: list[int] = []  # the temps' (batched: kept open for data_first)
    renamed = 0
    try:
        for path, _, data in writes:
            fd, tmp = write_temp_open(os.path.dirname(path), data, sync=not batched)
            temps.append(tmp)
            fds.append(fd)
            if not batched:
                os.close(fds.pop())
        if batched:
            data_first(
                root,
                [(fd, tmp) for fd, tmp, (*_, data) in zip(fds, temps, writes, strict=True) if data],
            )
        # One lock at a time, each held for its rename only: a batch never holds one
        # lock while it waits for another, so batches cannot deadlock each other.
        for tmp, (path, lock, _) in zip(temps, writes, strict=False):
            with flocked(lock):
                os.replace(tmp, path)
            renamed += 1
    finally:
        for fd in fds:
            os.close(fd)
        for tmp in temps[renamed:]:
            unlink_quietly(tmp)
    if batched:
        sync_filesystem(root)  # the renames (and new directories)
        return
    for directory in dict.fromkeys(os.path.dirname(path) for path, _, _ in writes):
        fsync_dir(directory)


_EMPTY = "<empty>"  # in create_many: a key whose empty file is created in place


def _create_empty(path: str) -> bool:
    """Create an empty file at ``path`` unless something is there (atomic: there is no
    content to be torn); made durable by the batch's ``syncfs``."""
    for attempt in range(DIR_RETRIES):
        try:
            os.close(os.open(path, CREATE_FLAGS, 0o666))
            return True
        except FileExistsError:
            return False
        except FileNotFoundError:
            if attempt == DIR_RETRIES - 1:
                raise
            ensure_dir(os.path.dirname(path), sync=False)
    return False


def create_many(root: str, pairs: list[tuple[str, bytes]]) -> list[bool]:
    if not _batched(root, pairs):
        return [create(path, data) for path, data in pairs]
    # No early lexists per key: a new workflow's keys are absent, and link() and
    # O_EXCL decide anyway (a key that exists costs a temp file, not a wrong answer).
    temps: list[str] = []  # per key: its temp file, or _EMPTY (created in place)
    fds: list[tuple[int, str]] = []  # the temps holding data, open for data_first
    created = [False] * len(pairs)
    try:
        for path, data in pairs:
            if not data:
                temps.append(_EMPTY)  # created in place below: an empty file needs no temp
            else:
                fd, tmp = write_temp_open(os.path.dirname(path), data, sync=False)
                fds.append((fd, tmp))
                temps.append(tmp)
        data_first(root, fds)
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
                unlink_quietly(tmp)
    if any(created):
        sync_filesystem(root)  # the new names (and directories)
    return created


def delete_many(root: str, targets: list[tuple[str, str]]) -> list[bool]:
    if not _batched(root, targets):
        return [delete(path, lock) for path, lock in targets]
    existed = [unlink(path, lock) for path, lock in targets]
    if any(existed):
        sync_filesystem(root)
    return existed


__all__ = ["create_many", "data_first", "delete_many", "replace_many", "sync_filesystem"]
