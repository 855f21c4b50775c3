"""Which roots of the file storage may make a batch durable with ``syncfs``.

``syncfs`` and ``sync_file_range`` are loaded from the C library once per process;
whether a root may use them is decided once per root, at its first batch, from the
filesystem that ``/proc/self/mountinfo`` says holds it. The module docstring of
:mod:`ray_workflows.backends.filesystem` says why only some filesystems qualify.
"""

from __future__ import annotations

import ctypes
import os
import re
import threading
from collections.abc import Callable

from ray_workflows._core.log import get_logger

log = get_logger()


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


SYNCFS = _load_syncfs()


def _load_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    if SYNCFS is None:
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


# With it, a batch needs one syncfs, not two (see _file_batches.data_first).
SYNC_FILE_RANGE = _load_sync_file_range()
SFR_WAIT_BEFORE, SFR_WRITE, SFR_WAIT_AFTER = 1, 2, 4

# Filesystems whose syncfs writes and flushes their own disk (and, from Linux 5.8,
# reports writeback errors). A network or FUSE filesystem may answer syncfs
# without the server having persisted anything (FUSE passes it on only from Linux
# 5.14, and only to daemons that implement it). Overlay does sync its upper layer,
# but a writeback error there lands on the upper filesystem's error counter, which
# syncfs on the overlay never checks; fsync goes to the upper file and reports it.
_SYNCFS_FILESYSTEMS = frozenset({"ext2", "ext3", "ext4", "xfs", "btrfs", "f2fs", "zfs", "tmpfs"})
# Of those, the ones that commit metadata in order (journaled or copy-on-write), so
# a batch needs one syncfs only (see _file_batches.data_first); tmpfs keeps nothing
# anyway. (Not btrfs: it records a file's extents and size only after its writeback
# ends, so another commit between a rename and the syncfs could land the name first.)
_ORDERED_FILESYSTEMS = frozenset({"ext3", "ext4", "xfs", "tmpfs"})
_MOUNTINFO = "/proc/self/mountinfo"
# Decided once per root, in a worker thread, at the root's first batch.
syncfs_roots: dict[str, bool] = {}
ordered_roots: dict[str, bool] = {}
_syncfs_lock = threading.Lock()


def _unescape(field: str) -> str:
    # The kernel writes space, tab, newline and backslash in paths as octal escapes.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def root_filesystem(mountinfo: str, root: str) -> str | None:
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


def syncfs_trusted(fstype: str | None) -> bool:
    return fstype in _SYNCFS_FILESYSTEMS


def root_syncfs(root: str) -> bool:
    trusted = syncfs_roots.get(root)
    if trusted is not None:
        return trusted
    with _syncfs_lock:  # two first batches of one root: one decides, and logs
        trusted = syncfs_roots.get(root)
        if trusted is None:
            try:
                with open(_MOUNTINFO, "rb") as f:
                    mountinfo = os.fsdecode(f.read())
            except OSError:
                mountinfo = ""
            fstype = root_filesystem(mountinfo, os.path.realpath(root))
            ordered_roots[root] = fstype in _ORDERED_FILESYSTEMS
            trusted = syncfs_roots[root] = syncfs_trusted(fstype)
            log.debug(
                "storage.batch_sync_chosen",
                root=root,
                filesystem=fstype,
                method="syncfs" if trusted else "fsync",
            )
    return trusted


def one_syncfs(root: str) -> bool:
    """Whether a batch under ``root`` takes one ``syncfs`` (see
    :func:`ray_workflows.backends._file_batches.data_first`): its filesystem, looked
    up at its first batch, commits metadata in order."""
    return SYNC_FILE_RANGE is not None and ordered_roots.get(root, False)


def write_back(fd: int, flags: int, path: str) -> None:
    """``sync_file_range`` of the whole file ``fd`` with ``flags`` (``SFR_*``)."""
    assert SYNC_FILE_RANGE is not None
    if SYNC_FILE_RANGE(fd, 0, 0, flags) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"sync_file_range: {os.strerror(errno)}", path)


__all__ = [
    "SFR_WAIT_AFTER",
    "SFR_WAIT_BEFORE",
    "SFR_WRITE",
    "SYNCFS",
    "SYNC_FILE_RANGE",
    "one_syncfs",
    "ordered_roots",
    "root_filesystem",
    "root_syncfs",
    "syncfs_roots",
    "syncfs_trusted",
    "write_back",
]
