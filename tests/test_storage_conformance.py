"""The built-in storage backends against the conformance suite, plus what is
particular to each: the file layout and its temp files, the memory store's
per-process sharing, and the registry's errors for unknown schemes."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from ray_workflows.backends.filesystem import FileStorage
from ray_workflows.backends.memory import MemoryStorage

from ray_workflows.exceptions import StorageError, UnknownStorageError
from ray_workflows.storage import Storage, forget_storage, open_storage
from ray_workflows.testing import StorageConformance

TEMP_PREFIX = ".rwf-tmp-"


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


class TestFileStorage(StorageConformance):
    @pytest.fixture(params=["bare-path", "file-uri"])
    async def storage(
        self, request: pytest.FixtureRequest, tmp_path: Path
    ) -> AsyncIterator[Storage]:
        root = tmp_path / "store"  # not created: the backend makes it on first write
        uri = str(root) if request.param == "bare-path" else root.as_uri()
        storage = open_storage(uri)
        assert isinstance(storage, FileStorage)
        assert storage.root == str(root)
        yield storage
        await storage.close()
        forget_storage(uri)

    async def test_key_is_a_file_under_the_root(self, storage: FileStorage) -> None:
        await storage.put("workflows/w1/meta.json", b"{}")
        assert (Path(storage.root) / "workflows" / "w1" / "meta.json").read_bytes() == b"{}"

    async def test_no_temp_files_remain(self, storage: FileStorage) -> None:
        await storage.put("a/put", b"1")
        await storage.put_many({"a/m1": b"1", "b/m2": b"2"})
        assert await storage.put_if_absent("a/pia", b"1")
        assert not await storage.put_if_absent("a/pia", b"2")
        assert await storage.compare_and_set("a/cas", None, b"1")
        assert await storage.compare_and_set("a/cas", b"1", b"2")
        names = [n for n in files_under(Path(storage.root)) if not n.startswith(".rwf-locks")]
        assert names == ["a/cas", "a/m1", "a/pia", "a/put", "b/m2"]

    async def test_stray_temp_file_is_invisible(self, storage: FileStorage) -> None:
        await storage.put("a/b", b"real")
        stray = Path(storage.root) / "a" / f"{TEMP_PREFIX}0123456789abcdef"
        stray.write_bytes(b"half a wri")  # what a writer that crashed mid-put leaves
        assert await storage.list() == ["a/b"]
        assert await storage.list("a/") == ["a/b"]
        assert await storage.get("a/b") == b"real"
        with pytest.raises(ValueError, match="reserves"):
            await storage.get(f"a/{stray.name}")
        assert await storage.delete_prefix("a/") == 1
        assert await storage.list() == []

    async def test_reserved_names_are_refused(self, storage: FileStorage) -> None:
        for key in [".rwf-locks/x", "a/.rwf-tmp-1", "a/.rwf-anything/b"]:
            with pytest.raises(ValueError):
                await storage.put(key, b"x")
        await storage.put("a/.rw-fine", b"x")  # only the exact reserved prefix is refused
        assert await storage.list() == ["a/.rw-fine"]

    async def test_key_that_is_also_a_directory_fails_clearly(self, storage: FileStorage) -> None:
        await storage.put("a", b"file")
        with pytest.raises(StorageError, match="cannot also be a directory") as info:
            await storage.put("a/b", b"x")
        assert storage.root in str(info.value)
        assert isinstance(info.value.__cause__, OSError)
        assert await storage.get("a/b") is None
        assert await storage.list() == ["a"]

    async def test_delete_prefix_removes_empty_directories(self, storage: FileStorage) -> None:
        await storage.put_many({"w/1/a/x": b"", "w/1/b": b"", "w/2": b""})
        assert await storage.delete_prefix("w/1/") == 2
        assert not (Path(storage.root) / "w" / "1").exists()
        assert (Path(storage.root) / "w").is_dir()
        assert await storage.delete_prefix("w/") == 1
        assert not (Path(storage.root) / "w").exists()
        assert Path(storage.root).is_dir()


async def test_file_uri_forms(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    cases = {
        str(tmp_path / "x"): tmp_path / "x",
        (tmp_path / "x y").as_uri(): tmp_path / "x y",  # percent-encoded
        f"file://localhost{tmp_path}/x": tmp_path / "x",
        "~/s": tmp_path / "home" / "s",
        "rel/dir": tmp_path / "rel" / "dir",
        "./rel": tmp_path / "rel",
    }
    for uri, root in cases.items():
        storage = FileStorage(uri)
        assert storage.uri == uri  # kept as given: the registry caches by it
        assert storage.root == str(root)
    with pytest.raises(StorageError, match="three slashes"):
        FileStorage("file://somehost/x")


async def test_check_names_an_unusable_directory(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_bytes(b"")
    storage = FileStorage(str(blocker / "store"))
    with pytest.raises(StorageError) as info:
        await storage.check()
    assert str(blocker / "store") in str(info.value)
    ok = FileStorage(str(tmp_path / "new" / "store"))
    await ok.check()
    assert os.path.isdir(ok.root)
    assert await ok.list() == []


class TestMemoryStorage(StorageConformance):
    @pytest.fixture
    async def storage(self) -> AsyncIterator[Storage]:
        uri = f"memory://{uuid.uuid4().hex}"
        storage = open_storage(uri)
        assert isinstance(storage, MemoryStorage)
        yield storage
        await storage.delete_prefix("")
        forget_storage(uri)


async def test_memory_instances_share_by_name() -> None:
    name = uuid.uuid4().hex
    first, second = MemoryStorage(f"memory://{name}"), MemoryStorage(f"memory://{name}")
    other = MemoryStorage(f"memory://{name}-other")
    await first.put("k", b"v")
    assert await second.get("k") == b"v"
    assert await other.get("k") is None
    await first.delete_prefix("")


async def test_memory_stores_copies() -> None:
    storage = MemoryStorage(f"memory://{uuid.uuid4().hex}")
    data: Any = bytearray(b"abc")  # callers may hand a mutable buffer
    await storage.put("k", data)
    data[0] = ord("X")
    stored = await storage.get("k")
    assert stored == b"abc"
    assert type(stored) is bytes
    await storage.delete_prefix("")


def test_unknown_scheme_lists_the_known_ones() -> None:
    with pytest.raises(UnknownStorageError) as info:
        open_storage("nosuch://x")
    message = str(info.value)
    assert "'nosuch'" in message
    assert "file" in message
    assert "memory" in message


def test_s3_scheme_names_the_extra() -> None:
    # Run where aiobotocore cannot be imported, as without the [s3] extra.
    code = (
        "import sys; sys.modules['aiobotocore'] = None\n"
        "from ray_workflows.exceptions import UnknownStorageError\n"
        "from ray_workflows.storage import open_storage\n"
        "try:\n    open_storage('s3://bucket')\n"
        "except UnknownStorageError as exc:\n    print(exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "pip install 'ray-workflows[s3]'" in out.stdout, out.stdout + out.stderr
