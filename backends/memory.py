"""Storage in the memory of one process: ``memory://`` or ``memory://name``.

Every instance opened with the same name in a process sees the same data, so a
storage unpickled in the same process finds what was written before. Other
processes see nothing: the class is not ``shared``, and the engine writes task
checkpoints itself. Meant for tests and single-process runs.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from urllib.parse import urlsplit

from ray_workflows.storage import Storage, check_key, check_prefix


class _Store:
    __slots__ = ("data", "lock")

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}
        # A threading lock, not an asyncio one: the same store is used from the
        # engine's loop, the sync bridge's loop and plain threads. Nothing awaits
        # while holding it.
        self.lock = threading.Lock()


_stores: dict[str, _Store] = {}
_stores_lock = threading.Lock()


def _store_named(name: str) -> _Store:
    with _stores_lock:
        store = _stores.get(name)
        if store is None:
            store = _stores[name] = _Store()
        return store


class MemoryStorage(Storage):
    scheme = "memory"
    shared = False
    ordered_batches = True  # a batch is stored in order, and nothing survives a crash

    def __init__(self, uri: str) -> None:
        super().__init__(uri)
        parts = urlsplit(uri)
        self._name = parts.netloc + parts.path
        self._store = _store_named(self._name)

    async def get(self, key: str) -> bytes | None:
        check_key(key)
        with self._store.lock:
            return self._store.data.get(key)

    async def put(self, key: str, data: bytes) -> None:
        check_key(key)
        value = bytes(data)
        with self._store.lock:
            self._store.data[key] = value

    async def put_many(self, items: Mapping[str, bytes]) -> None:
        values = {check_key(key): bytes(data) for key, data in items.items()}
        with self._store.lock:
            self._store.data.update(values)

    async def put_if_absent(self, key: str, data: bytes) -> bool:
        check_key(key)
        value = bytes(data)
        with self._store.lock:
            if key in self._store.data:
                return False
            self._store.data[key] = value
            return True

    async def compare_and_set(self, key: str, expected: bytes | None, data: bytes) -> bool:
        check_key(key)
        value = bytes(data)
        with self._store.lock:
            if self._store.data.get(key) != expected:
                return False
            self._store.data[key] = value
            return True

    async def delete(self, key: str) -> bool:
        check_key(key)
        with self._store.lock:
            return self._store.data.pop(key, None) is not None

    async def delete_prefix(self, prefix: str) -> int:
        check_prefix(prefix)
        with self._store.lock:
            doomed = [key for key in self._store.data if key.startswith(prefix)]
            for key in doomed:
                del self._store.data[key]
        return len(doomed)

    async def list(self, prefix: str = "") -> list[str]:
        check_prefix(prefix)
        with self._store.lock:
            keys = [key for key in self._store.data if key.startswith(prefix)]
        keys.sort()
        return keys

    async def exists(self, key: str) -> bool:
        check_key(key)
        with self._store.lock:
            return key in self._store.data

    async def check(self) -> None:
        pass


__all__ = ["MemoryStorage"]
