"""Which storage roots the file backend batches with ``syncfs``: only those on a
local filesystem known to honour it, read from /proc/self/mountinfo; any other root
(NFS, SMB, FUSE, overlay, unknown) fsyncs each file."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
from ray_workflows.backends import _file_batches, _file_syncfs
from ray_workflows.backends.filesystem import FileStorage

MOUNTINFO = """\
22 27 0:21 / /proc rw,relatime - proc proc rw
27 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw,discard
30 27 0:27 / /tmp rw,nosuid,nodev - tmpfs tmpfs rw,size=1024k
40 27 0:40 / /mnt/shared rw,relatime shared:7 master:2 - nfs4 server:/export rw,vers=4.2
41 40 259:1 / /mnt/shared/scratch rw,relatime - xfs /dev/nvme0n1 rw
42 27 0:42 / /home/me/remote rw,nosuid,nodev - fuse.sshfs me@host:/srv rw,user_id=1000
43 27 0:43 / /mnt/my\\040disk rw,relatime - cifs //nas/share rw,vers=3.0
44 27 259:2 / /srv/a\\134b\\011c rw,relatime - btrfs /dev/nvme0n1p2 rw
45 27 0:45 / /var/lib/docker/overlay2/x/merged rw - overlay overlay rw,lowerdir=/l,upperdir=/u
"""


@pytest.mark.parametrize(
    ("root", "fstype"),
    [
        ("/home/me/.local/share/ray-workflows", "ext4"),
        ("/", None),  # every other mount lies inside it
        ("/tmp/store", "tmpfs"),
        ("/tmpfoo/store", "ext4"),  # a mount point is a whole path segment
        ("/mnt/shared/runs/store", "nfs4"),
        ("/mnt/shared/scratch/store", "xfs"),  # the longest mount point wins
        ("/mnt/shared/scratchy", "nfs4"),
        ("/home/me/remote/store", "fuse.sshfs"),
        ("/mnt/my disk/store", "cifs"),  # mountinfo writes the space as \040
        ("/mnt/my\\040disk/store", "ext4"),  # a literal backslash path is another one
        ("/srv/a\\b\tc/store", "btrfs"),
        ("/var/lib/docker/overlay2/x/merged/store", "overlay"),
    ],
)
def test_root_filesystem(root: str, fstype: str | None) -> None:
    assert _file_syncfs.root_filesystem(MOUNTINFO, root) == fstype


def test_a_mount_inside_the_root_is_unknown() -> None:
    # syncfs of the root's filesystem would miss the keys under the inner mount.
    assert _file_syncfs.root_filesystem(MOUNTINFO, "/mnt/shared/runs") == "nfs4"
    assert _file_syncfs.root_filesystem(MOUNTINFO, "/mnt/shared") is None
    assert _file_syncfs.root_filesystem(MOUNTINFO, "/mnt") is None


def test_the_last_of_stacked_mounts_wins() -> None:
    stacked = MOUNTINFO + "50 40 0:50 / /mnt/shared rw - ext4 /dev/vdb rw\n"
    assert _file_syncfs.root_filesystem(stacked, "/mnt/shared/store") == "ext4"


def test_no_mountinfo_is_unknown() -> None:
    assert _file_syncfs.root_filesystem("", "/home/me/store") is None
    broken = "garbage\n\n1 2 3\n1 2 3 / /home rw -\n"  # the last has no type after " - "
    assert _file_syncfs.root_filesystem(broken, "/home/me/store") is None


@pytest.mark.parametrize(
    ("fstype", "trusted"),
    [
        ("ext4", True),
        ("xfs", True),
        ("btrfs", True),
        ("tmpfs", True),
        ("nfs4", False),
        ("nfs", False),
        ("cifs", False),
        ("smb3", False),
        ("9p", False),
        ("ceph", False),
        ("lustre", False),
        ("fuse.sshfs", False),
        ("fuse.glusterfs", False),
        ("fuse", False),
        ("overlay", False),  # the upper layer's writeback errors never reach its syncfs
        ("something-new", False),
        (None, False),
    ],
)
def test_syncfs_trusted(fstype: str | None, trusted: bool) -> None:
    assert _file_syncfs.syncfs_trusted(fstype) is trusted


def _count_syncfs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []
    real = _file_batches.sync_filesystem

    def counting(root: str) -> None:
        calls.append(root)
        real(root)

    monkeypatch.setattr(_file_batches, "sync_filesystem", counting)
    return calls


async def _round_trip(storage: FileStorage) -> None:
    items = {"w/1/plan": b"plan", "w/1/meta.json": b"{}", "status/RUNNING/1": b""}
    await storage.put_many(items)
    assert await storage.put_if_absent_many({"w/1/plan": b"other", "w/2/plan": b"p2"}) == {
        "w/1/plan": False,
        "w/2/plan": True,
    }
    for key, data in {**items, "w/2/plan": b"p2"}.items():
        assert await storage.get(key) == data
    assert await storage.delete_many(["w/1/meta.json", "nope"]) == {
        "w/1/meta.json": True,
        "nope": False,
    }
    assert await storage.list() == ["status/RUNNING/1", "w/1/plan", "w/2/plan"]


async def test_real_root_batches_as_its_filesystem_allows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="ray_workflows")
    calls = _count_syncfs(monkeypatch)
    storage = FileStorage(str(tmp_path / "store"))
    await _round_trip(storage)
    with open("/proc/self/mountinfo", "rb") as f:
        fstype = _file_syncfs.root_filesystem(os.fsdecode(f.read()), str(tmp_path.resolve()))
    syncfs = _file_syncfs.SYNCFS is not None and _file_syncfs.syncfs_trusted(fstype)
    in_order = ("ext3", "ext4", "xfs", "tmpfs")  # filesystems that commit metadata in order
    ordered = _file_syncfs.SYNC_FILE_RANGE is not None and fstype in in_order
    # put_many and put_if_absent_many: data then names (where metadata is committed
    # in order: data written back first, one syncfs for both); delete_many: names.
    assert len(calls) == (0 if not syncfs else 3 if ordered else 5)
    decisions = [r.getMessage() for r in caplog.records if "batch_sync_chosen" in r.getMessage()]
    assert len(decisions) == (1 if _file_syncfs.SYNCFS is not None else 0)


async def test_an_untrusted_root_fsyncs_each_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = _count_syncfs(monkeypatch)
    storage = FileStorage(str(tmp_path / "store"))
    monkeypatch.setitem(_file_syncfs.syncfs_roots, storage.root, False)  # as on NFS
    await _round_trip(storage)
    assert calls == []


@pytest.mark.parametrize(
    ("ordered", "syncfs_calls"),
    [
        pytest.param(
            False,
            5,
            id="two-per-batch",
            marks=pytest.mark.skipif(_file_syncfs.SYNCFS is None, reason="no syncfs (Linux < 5.8)"),
        ),
        pytest.param(
            True,
            3,
            id="one-per-batch",
            marks=pytest.mark.skipif(
                _file_syncfs.SYNC_FILE_RANGE is None, reason="no syncfs and sync_file_range"
            ),
        ),
    ],
)
async def test_a_trusted_root_batches_with_syncfs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ordered: bool, syncfs_calls: int
) -> None:
    # Two syncfs per batch of puts (data, then names), one where metadata is committed
    # in order (the data written back first); one per batch of deletes either way.
    calls = _count_syncfs(monkeypatch)
    storage = FileStorage(str(tmp_path / "store"))
    monkeypatch.setitem(_file_syncfs.syncfs_roots, storage.root, True)
    monkeypatch.setitem(_file_syncfs.ordered_roots, storage.root, ordered)
    await _round_trip(storage)
    assert calls == [storage.root] * syncfs_calls
