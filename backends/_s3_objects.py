"""Object requests beneath the S3 storage's contract: reads, conditional PUTs and
multipart uploads of one bucket.

``put_if_absent`` is a ``PutObject`` with ``If-None-Match: *`` and
``compare_and_set`` one with ``If-Match``: the server decides, so both are atomic
against every writer. The ETags of small values this process read or wrote last
are remembered, so that a ``compare_and_set`` of what was just read (a lease
renewal) is one request, not a read and a write.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import random
import secrets
import threading
from typing import Any

from botocore.exceptions import ClientError
from ray_workflows.backends._s3_client import (
    S3Clients,
    is_conflict,
    is_missing,
    precondition_failed,
    was_retried,
)

from ray_workflows.exceptions import TransientStorageError

# Our random token on every conditional write: after a retried request answers 412,
# it tells whether the write that succeeded was ours (its first attempt landed).
_TOKEN = "rwf-token"
_CONFLICT_RETRIES = 8
# ETags of small values this process read or wrote last, so that a compare_and_set
# of what was just read (a lease renewal) is one request, not a read and a write.
_ETAG_CACHE_ENTRIES = 512
_ETAG_CACHE_VALUE_LIMIT = 16 * 1024


class S3Objects:
    """The object requests of one S3 storage, in ``bucket``, through ``clients``.
    Objects are named by their full name (the storage's prefix included); ``op`` and
    ``key`` name the storage call, for errors."""

    def __init__(self, uri: str, bucket: str, clients: S3Clients) -> None:
        self._uri = uri
        self._bucket = bucket
        self._clients = clients
        self._lock = threading.Lock()
        self._etags: collections.OrderedDict[str, tuple[bytes, str]] = collections.OrderedDict()

    async def read(self, op: str, key: str, name: str) -> tuple[bytes, str] | None:
        """The object's bytes and ETag, or None if there is none."""
        client = await self._clients.get()
        with self._clients.translate(op, repr(key)):
            try:
                response = await client.get_object(Bucket=self._bucket, Key=name)
            except ClientError as exc:
                if is_missing(exc):
                    return None
                raise
            async with response["Body"] as body:
                data: bytes = await body.read()
        etag = str(response.get("ETag") or "")
        self.remember(name, data, etag)
        return data, etag

    def remember(self, name: str, data: bytes, etag: str | None) -> None:
        """Remember that ``name`` holds ``data`` with ``etag``; with no ``etag``,
        forget what it held."""
        with self._lock:
            if etag and len(data) <= _ETAG_CACHE_VALUE_LIMIT:
                self._etags[name] = (bytes(data), etag)
                self._etags.move_to_end(name)
                if len(self._etags) > _ETAG_CACHE_ENTRIES:
                    self._etags.popitem(last=False)
            else:
                self._etags.pop(name, None)

    def recalled(self, name: str, expected: bytes) -> str | None:
        """The remembered ETag of ``name`` if it was remembered holding ``expected``."""
        with self._lock:
            data, etag = self._etags.get(name, (None, ""))
        return etag if data == expected else None

    async def head(self, name: str, op: str, key: str) -> bool:
        """Whether the object exists."""
        client = await self._clients.get()
        with self._clients.translate(op, repr(key)):
            try:
                await client.head_object(Bucket=self._bucket, Key=name)
            except ClientError as exc:
                if is_missing(exc):
                    return False
                raise
        return True

    async def conditional_put(
        self, op: str, key: str, name: str, data: bytes, etag: str | None
    ) -> bool:
        """PutObject with If-None-Match: * (``etag`` None) or If-Match: etag."""
        client = await self._clients.get()
        token = secrets.token_hex(16)
        params: dict[str, Any] = {
            "Bucket": self._bucket,
            "Key": name,
            "Body": as_body(data),
            "Metadata": {_TOKEN: token},
        }
        if etag is None:
            params["IfNoneMatch"] = "*"
        else:
            params["IfMatch"] = etag
        with self._clients.translate(op, repr(key)):
            for attempt in range(_CONFLICT_RETRIES):
                try:
                    response = await client.put_object(**params)
                    self.remember(name, data, response.get("ETag"))
                    return True
                except ClientError as exc:
                    if is_conflict(exc):
                        await asyncio.sleep(random.uniform(0, 0.05 * 2**attempt))
                        continue
                    if not precondition_failed(exc, etag is not None):
                        raise
                    if was_retried(exc):
                        # An earlier attempt may have been written before its answer
                        # was lost; then the precondition failed against our own write.
                        return await self._has_token(client, name, token)
                    return False
        raise TransientStorageError(
            f"S3 storage {self._uri}: {op} {key!r} failed: the server answered "
            f"ConditionalRequestConflict {_CONFLICT_RETRIES} times in a row.",
            uri=self._uri,
            operation=op,
        )

    async def _has_token(self, client: Any, name: str, token: str) -> bool:
        try:
            head = await client.head_object(Bucket=self._bucket, Key=name)
        except ClientError as exc:
            if is_missing(exc):
                return False
            raise
        return bool(head.get("Metadata", {}).get(_TOKEN) == token)

    async def put_multipart(
        self, client: Any, name: str, data: bytes, part_size: int, concurrency: int
    ) -> None:
        """Upload ``data`` in parts of ``part_size`` (or more), ``concurrency`` parts
        at a time."""
        # Parts are cut from the caller's buffer as they are sent, so at most
        # ``concurrency`` parts are copied at a time, never the whole value.
        # S3 allows 10,000 parts; a huge value gets bigger parts.
        part = max(part_size, -(-len(data) // 10_000))
        view = memoryview(data)
        created = await client.create_multipart_upload(Bucket=self._bucket, Key=name)
        upload_id = created["UploadId"]
        limit = asyncio.Semaphore(concurrency)

        async def send(number: int, offset: int) -> dict[str, Any]:
            async with limit:
                response = await client.upload_part(
                    Bucket=self._bucket,
                    Key=name,
                    UploadId=upload_id,
                    PartNumber=number,
                    Body=bytes(view[offset : offset + part]),
                )
            return {"PartNumber": number, "ETag": response["ETag"]}

        try:
            results = await asyncio.gather(
                *(send(i + 1, offset) for i, offset in enumerate(range(0, len(data), part))),
                return_exceptions=True,
            )
            for result in results:
                if isinstance(result, BaseException):
                    raise result
            await client.complete_multipart_upload(
                Bucket=self._bucket,
                Key=name,
                UploadId=upload_id,
                MultipartUpload={"Parts": results},
            )
        except BaseException:
            # Best effort: an upload left open is invisible to readers, but is billed.
            with contextlib.suppress(Exception):
                await asyncio.shield(
                    client.abort_multipart_upload(Bucket=self._bucket, Key=name, UploadId=upload_id)
                )
            raise


def md5_etag(data: bytes) -> str:
    return f'"{hashlib.md5(data, usedforsecurity=False).hexdigest()}"'


def as_body(data: bytes) -> bytes | bytearray:
    # botocore takes bytes and bytearray, not other buffers such as memoryview.
    return data if isinstance(data, (bytes, bytearray)) else bytes(data)


__all__ = ["S3Objects", "as_body", "md5_etag"]
