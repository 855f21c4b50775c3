"""Storage in an S3 bucket or on any S3-compatible server.

URI: ``s3://bucket/prefix?endpoint_url=http://host:port&region=us-east-1``. Key
``a/b`` is the object ``prefix/a/b``. Query parameters (all optional):

``endpoint_url``        an S3-compatible server (MinIO, SeaweedFS, Ceph, R2 ...)
``region``              the signing region
``profile``             a named profile of ``~/.aws/credentials`` / ``~/.aws/config``
``addressing_style``    ``path``, ``virtual`` or ``auto`` (default: ``path`` with an
                        ``endpoint_url``, else ``auto``)
``conditional_writes``  ``true`` (default) or ``false``: see below

Credentials never go in the URI (it names the manager actor, shows in logs and
travels with every task): they come from the standard AWS chain of each process,
environment variables, a profile, or an instance role. A URI with a user name or
password in it is refused.

``put_if_absent`` is one ``PutObject`` with ``If-None-Match: *``; ``compare_and_set``
reads the ETag and writes with ``If-Match``. The server decides, so both are atomic
against every writer. ``check`` verifies that the server honours these headers
(some ignore them, which would make leases silently unsafe). With
``conditional_writes=false`` the two operations raise :class:`StorageError`
instead: there is no non-atomic fallback.

One aiobotocore client (and connection pool) per event loop that uses the storage,
created on first use: a client is bound to the loop it was made on, and this
storage is used from the manager's loop, the sync bridge's thread and workers.

Errors: throttling (``SlowDown``, HTTP 429), a server error (5xx), a timeout or a
lost connection raise :class:`TransientStorageError` (retry later); ``AccessDenied``,
``NoSuchBucket``, missing credentials and other refusals a plain
:class:`StorageError` (fix the cause first).

This module is the plugin class; private modules hold the rest: ``_s3_uri`` (the
URI), ``_s3_client`` (the clients per loop and the errors) and ``_s3_objects``
(reads, conditional PUTs, multipart uploads).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import secrets
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from botocore.config import Config
from ray_workflows.backends._s3_client import S3Clients, preload_models, transient
from ray_workflows.backends._s3_objects import S3Objects, as_body, md5_etag
from ray_workflows.backends._s3_uri import S3Location, parse_uri

from ray_workflows.exceptions import StorageError, TransientStorageError
from ray_workflows.storage import Storage, check_key, check_prefix

MiB = 1024 * 1024
# Keys the backend keeps for itself (the probe of check()): refused as keys, never listed.
_RESERVED = ".rwf-"


class S3Storage(Storage):
    scheme = "s3"
    shared = True

    #: Values larger than this are uploaded in parts, ``part_size`` each.
    multipart_threshold: int = 8 * MiB
    part_size: int = 8 * MiB
    #: Requests in flight for one ``put_many`` / one multipart upload.
    max_concurrency: int = 16
    part_concurrency: int = 4
    #: Attempts per request (botocore's standard retry mode: throttling such as
    #: SlowDown, 5xx, RequestTimeout and connection errors, with jittered backoff).
    max_attempts: int = 6

    def __init__(self, uri: str) -> None:
        super().__init__(uri)
        self.location: S3Location = parse_uri(uri)
        self._bucket: str = self.location.bucket
        self._root: str = self.location.prefix
        self._config = Config(
            region_name=self.location.region,
            s3={"addressing_style": self.location.addressing_style},
            retries={"mode": "standard", "total_max_attempts": self.max_attempts},
            connect_timeout=10,
            read_timeout=60,
            max_pool_connections=max(self.max_concurrency, self.part_concurrency) * 2,
            # Checksums only where the API requires them: many S3-compatible servers
            # reject the newer flexible-checksum trailers.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        # check() must answer in seconds: short timeouts, one retry.
        self._check_config = self._config.merge(
            Config(
                connect_timeout=3,
                read_timeout=3,
                retries={"mode": "standard", "total_max_attempts": 2},
            )
        )
        self._s3: S3Clients = S3Clients(uri, self.location, self._config)
        self._objects: S3Objects = S3Objects(uri, self._bucket, self._s3)
        self._verified = False
        #: HTTP requests sent by this instance (retries included), by S3 operation.
        self.requests: collections.Counter[str] = self._s3.requests

    # -- the Storage contract ----------------------------------------------------
    async def get(self, key: str) -> bytes | None:
        found: tuple[bytes, str] | None = await self._objects.read("get", key, self._name(key))
        return None if found is None else found[0]

    async def put(self, key: str, data: bytes) -> None:
        name = self._name(key)
        self._objects.remember(name, b"", None)
        client = await self._s3.get()
        with self._s3.translate("put", repr(key)):
            if len(data) > self.multipart_threshold:
                await self._objects.put_multipart(
                    client, name, data, self.part_size, self.part_concurrency
                )
            else:
                await client.put_object(Bucket=self._bucket, Key=name, Body=as_body(data))

    async def put_many(self, items: Mapping[str, bytes]) -> None:
        for key in items:
            self._name(key)  # refuse a bad key before anything is written
        limit = asyncio.Semaphore(self.max_concurrency)
        # Large values one at a time: each is already uploaded in parallel parts, and
        # several at once would hold that many more part copies in memory.
        large = asyncio.Semaphore(1)

        async def one(key: str, data: bytes) -> None:
            async with large if len(data) > self.multipart_threshold else limit:
                await self.put(key, data)

        results = await asyncio.gather(
            *(one(key, data) for key, data in items.items()), return_exceptions=True
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def put_if_absent(self, key: str, data: bytes) -> bool:
        name = self._name(key)
        self._require_conditional_writes("put_if_absent")
        created: bool = await self._objects.conditional_put("put_if_absent", key, name, data, None)
        return created

    async def put_if_absent_many(self, items: Mapping[str, bytes]) -> dict[str, bool]:
        # Conditional PUTs of different keys are independent: all at once.
        return await self._each(self.put_if_absent, list(items.items()))

    async def delete_many(self, keys: list[str]) -> dict[str, bool]:
        return await self._each(self.delete, [(key,) for key in keys])

    async def _each(
        self, op: Callable[..., Awaitable[bool]], calls: list[tuple[Any, ...]]
    ) -> dict[str, bool]:
        for call in calls:
            self._name(call[0])  # refuse a bad key before anything is written
        limit = asyncio.Semaphore(self.max_concurrency)

        async def one(call: tuple[Any, ...]) -> bool:
            async with limit:
                return await op(*call)

        results = await asyncio.gather(*(one(call) for call in calls), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return {call[0]: bool(result) for call, result in zip(calls, results, strict=True)}

    async def compare_and_set(self, key: str, expected: bytes | None, data: bytes) -> bool:
        name = self._name(key)
        self._require_conditional_writes("compare_and_set")
        put = self._objects.conditional_put
        if expected is None:
            created: bool = await put("compare_and_set", key, name, data, None)
            return created
        etag: str | None = self._objects.recalled(name, expected)
        if etag is not None:
            if await put("compare_and_set", key, name, data, etag):
                return True
            if etag == md5_etag(expected):
                # The server's ETags are the MD5 of the bytes (single PUTs, no KMS), so
                # another ETag now means other bytes. (An equal value written as a
                # multipart or KMS object elsewhere would make this a spurious False,
                # which never loses a write: callers retry from a fresh read.)
                return False
        # Nothing remembered, or the object changed since: decide by its bytes now.
        found: tuple[bytes, str] | None = await self._objects.read("compare_and_set", key, name)
        if found is None or found[0] != expected:
            return False
        # A 412 now means another write came between our read and our write. Its
        # bytes could equal ``expected`` only with the same ETag (the MD5 of a
        # single-part object), and then If-Match would have matched.
        replaced: bool = await put("compare_and_set", key, name, data, found[1])
        return replaced

    async def delete(self, key: str) -> bool:
        name = self._name(key)
        self._objects.remember(name, b"", None)
        # DeleteObject answers 204 whether or not the key existed: ask first.
        if not await self._objects.head(name, "delete", key):
            return False
        client = await self._s3.get()
        with self._s3.translate("delete", repr(key)):
            await client.delete_object(Bucket=self._bucket, Key=name)
        return True

    async def delete_prefix(self, prefix: str) -> int:
        keys = await self.list(prefix)
        if not keys:
            return 0
        client = await self._s3.get()
        limit = asyncio.Semaphore(self.max_concurrency)

        async def batch(names: list[str]) -> int:
            async with limit:
                response = await client.delete_objects(
                    Bucket=self._bucket,
                    Delete={"Objects": [{"Key": n} for n in names], "Quiet": False},
                )
            errors = response.get("Errors") or []
            if errors:
                first = errors[0]
                code = str(first.get("Code", ""))
                cls = TransientStorageError if transient(code, 0) else StorageError
                raise cls(
                    f"S3 storage {self._uri}: delete_prefix {prefix!r} failed for "
                    f"{len(errors)} keys, the first {first.get('Key')!r}: "
                    f"{first.get('Code')}: {first.get('Message')}",
                    uri=self._uri,
                    operation="delete_prefix",
                )
            return len(response.get("Deleted") or [])

        names = [self._root + key for key in keys]
        with self._s3.translate("delete_prefix", repr(prefix)):
            counts = await asyncio.gather(
                *(batch(names[i : i + 1000]) for i in range(0, len(names), 1000))
            )
        return sum(counts)

    async def list(self, prefix: str = "") -> list[str]:
        check_prefix(prefix)
        client = await self._s3.get()
        keys: list[str] = []
        params: dict[str, Any] = {"Bucket": self._bucket, "Prefix": self._root + prefix}
        start = len(self._root)
        with self._s3.translate("list", repr(prefix)):
            while True:
                page = await client.list_objects_v2(**params)
                for item in page.get("Contents") or ():
                    key = str(item["Key"])[start:]
                    if key and not key.startswith(_RESERVED):
                        keys.append(key)
                token = page.get("NextContinuationToken")
                if not page.get("IsTruncated") or not token:
                    break
                params["ContinuationToken"] = token
        keys.sort()
        return keys

    async def exists(self, key: str) -> bool:
        found: bool = await self._objects.head(self._name(key), "exists", key)
        return found

    async def check(self) -> None:
        # A client of its own, with short timeouts: a wrong endpoint fails in seconds.
        client = await self._s3.new(self._check_config)
        try:
            with self._s3.translate("check", f"bucket {self._bucket!r}"):
                await client.list_objects_v2(Bucket=self._bucket, Prefix=self._root, MaxKeys=1)
        finally:
            with contextlib.suppress(Exception):
                await client.close()
        if self.location.conditional_writes and not self._verified:
            await self._probe_conditional_writes()
            self._verified = True

    async def close(self) -> None:
        await self._s3.close()

    # -- helpers -------------------------------------------------------------------
    def _name(self, key: str) -> str:
        check_key(key)
        if key.startswith(_RESERVED):
            raise ValueError(
                f"storage key {key!r} starts with {_RESERVED!r}, which the S3 storage "
                "reserves for its own probe objects"
            )
        return self._root + key

    def _require_conditional_writes(self, op: str) -> None:
        if not self.location.conditional_writes:
            raise StorageError(
                f"S3 storage {self._uri}: {op} needs a conditional write, and this storage "
                "was opened with conditional_writes=false. Workflows need atomic writes to "
                "start a workflow exactly once and to hold leases: use an S3 server that "
                "supports If-None-Match/If-Match on PutObject (AWS S3, MinIO, SeaweedFS, "
                "Ceph RGW, Cloudflare R2), or a file storage on a shared directory.",
                uri=self._uri,
                operation=op,
            )

    async def _probe_conditional_writes(self) -> None:
        name = f"{self._root}{_RESERVED}probe-{secrets.token_hex(8)}"
        put = self._objects.conditional_put
        created = await put("check", name, name, b"1", None)
        try:
            again = await put("check", name, name, b"2", None)
            stale = await put("check", name, name, b"3", f'"{"0" * 32}"')
        finally:
            client = await self._s3.get()
            with self._s3.translate("check", "the probe object"):
                await client.delete_object(Bucket=self._bucket, Key=name)
        if not created or again or stale:
            raise StorageError(
                f"S3 storage {self._uri}: the server ignores conditional writes "
                "(If-None-Match/If-Match on PutObject), so leases and exactly-once "
                "starts would not be safe. Use a server that supports them (AWS S3, "
                "MinIO, SeaweedFS, Ceph RGW, Cloudflare R2) or a file storage.",
                uri=self._uri,
                operation="check",
            )


__all__ = ["S3Location", "S3Storage", "parse_uri", "preload_models"]
