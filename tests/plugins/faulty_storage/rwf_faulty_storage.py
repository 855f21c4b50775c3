"""A fault-injecting wrapper around another storage, for tests of durability.

Test-only: this module is its own distribution (``rwf-faulty-storage``, see the
``pyproject.toml`` beside it), registered as the ``faulty`` scheme of the
``ray_workflows.storage`` entry-point group, so ray-workflows itself ships no such scheme.

URI: ``faulty://?inner=<quoted inner URI>&control=<quoted path of a JSON file>``.
The control file is read on every write (when its mtime changes), so a test can
switch faults on and off while workers and the manager run, in any process::

    {"fail": "tasks/.*\\\\.out$",   # writes to keys matching this regex raise StorageError
     "tear": "tasks/step_2\\\\.out$",  # such writes store only the first half of the bytes
     "fail_nth": 3,                # the 3rd write in each process raises
     "delay": 0.05,                # every write sleeps this long first
     "transient": true,            # failures raise TransientStorageError (default: StorageError)
     "unordered": true}            # put_many writes its keys last first, as S3 may land them

A missing control file means no faults. Reads are never changed.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qs, urlsplit

from ray_workflows.exceptions import StorageError, TransientStorageError
from ray_workflows.storage import Storage, open_storage


class FaultyStorage(Storage):
    scheme = "faulty"

    def __init__(self, uri: str) -> None:
        super().__init__(uri)
        query = parse_qs(urlsplit(uri).query)
        if "inner" not in query or "control" not in query:
            raise StorageError(
                f"faulty storage URI {uri!r} needs ?inner=<storage URI>&control=<JSON path>",
                uri=uri,
            )
        self.inner = open_storage(query["inner"][0])
        self.control = query["control"][0]
        self._rules: dict[str, Any] = {}
        self._mtime: float | None = None
        self._writes = 0

    @property
    def shared(self) -> bool:  # type: ignore[override]
        return self.inner.shared

    def _load_rules(self) -> dict[str, Any]:
        try:
            mtime = os.stat(self.control).st_mtime
        except FileNotFoundError:
            self._rules, self._mtime = {}, None
            return self._rules
        if mtime != self._mtime:
            with open(self.control) as handle:
                self._rules = dict(json.load(handle))
            self._mtime = mtime
        return self._rules

    async def _before_write(self, key: str, data: bytes) -> bytes:
        """Apply the rules to one write; return the bytes to store (maybe torn)."""
        rules = await asyncio.to_thread(self._load_rules)
        self._writes += 1
        if rules.get("delay"):
            await asyncio.sleep(float(rules["delay"]))
        if rules.get("fail_nth") == self._writes or (
            rules.get("fail") and re.search(rules["fail"], key)
        ):
            cls = TransientStorageError if rules.get("transient") else StorageError
            raise cls(f"injected write failure for {key!r} (faulty storage)", key=key)
        if rules.get("tear") and re.search(rules["tear"], key):
            return data[: len(data) // 2]
        return data

    async def get(self, key: str) -> bytes | None:
        return await self.inner.get(key)

    async def put(self, key: str, data: bytes) -> None:
        await self.inner.put(key, await self._before_write(key, data))

    async def put_many(self, items: Mapping[str, bytes]) -> None:
        rules = await asyncio.to_thread(self._load_rules)
        ordered = list(items.items())
        for key, data in reversed(ordered) if rules.get("unordered") else ordered:
            await self.put(key, data)

    async def put_if_absent(self, key: str, data: bytes) -> bool:
        return await self.inner.put_if_absent(key, await self._before_write(key, data))

    async def compare_and_set(self, key: str, expected: bytes | None, data: bytes) -> bool:
        return await self.inner.compare_and_set(key, expected, await self._before_write(key, data))

    async def delete(self, key: str) -> bool:
        return await self.inner.delete(key)

    async def delete_prefix(self, prefix: str) -> int:
        return await self.inner.delete_prefix(prefix)

    async def list(self, prefix: str = "") -> list[str]:
        return await self.inner.list(prefix)

    async def check(self) -> None:
        await self.inner.check()
