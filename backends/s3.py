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
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import random
import secrets
import threading
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

# Imported eagerly: without the [s3] extra this import fails, and the plugin
# registry turns that into "pip install 'ray-workflows[s3]'" at open time.
import aiobotocore.session
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from ray_workflows.exceptions import StorageError
from ray_workflows.storage import Storage, check_key, check_prefix

MiB = 1024 * 1024
_OPTIONS = ("endpoint_url", "region", "profile", "addressing_style", "conditional_writes")
_BOOLEANS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
# Keys the backend keeps for itself (the probe of check()): refused as keys, never listed.
_RESERVED = ".rwf-"
# Our random token on every conditional write: after a retried request answers 412,
# it tells whether the write that succeeded was ours (its first attempt landed).
_TOKEN = "rwf-token"
_CONFLICT_RETRIES = 8
# ETags of small values this process read or wrote last, so that a compare_and_set
# of what was just read (a lease renewal) is one request, not a read and a write.
_ETAG_CACHE_ENTRIES = 512
_ETAG_CACHE_VALUE_LIMIT = 16 * 1024
_AUTH_CODES = frozenset(
    {
        "AccessDenied",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "ExpiredToken",
        "InvalidToken",
        "TokenRefreshRequired",
        "403",
    }
)
_WIRE_ERRORS = (BotoCoreError, OSError, asyncio.TimeoutError)

_loader_lock = threading.Lock()
_loader: Any = None


@dataclass(frozen=True)
class S3Location:
    """What an ``s3://`` URI says, parsed and checked."""

    bucket: str
    prefix: str  # "" or ending with "/"
    endpoint_url: str | None = None
    region: str | None = None
    profile: str | None = None
    addressing_style: str = "auto"
    conditional_writes: bool = True


def parse_uri(uri: str) -> S3Location:
    """Parse an ``s3://bucket/prefix?...`` URI; :class:`StorageError` if it is not one."""

    def bad(why: str) -> StorageError:
        shown = _redacted(uri)
        return StorageError(f"Invalid S3 storage URI {shown!r}: {why}", uri=shown)

    parts = urlsplit(uri)
    if parts.scheme != "s3":
        raise bad("it must start with 's3://'")
    if "@" in parts.netloc:
        raise bad(
            "credentials do not belong in the URI; set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY, or a profile, on every node"
        )
    if not parts.netloc or ":" in parts.netloc:
        raise bad("it must name a bucket: s3://bucket/prefix")
    if parts.fragment:
        raise bad("it has a '#' fragment")
    prefix = parts.path.strip("/")
    if prefix:
        try:
            check_key(prefix)
        except ValueError as exc:
            raise bad(f"bad prefix: {exc}") from None
        prefix += "/"
    query: dict[str, str] = {}
    for name, value in parse_qsl(parts.query, keep_blank_values=True, strict_parsing=False):
        if name not in _OPTIONS:
            raise bad(f"unknown parameter {name!r}; known: {', '.join(_OPTIONS)}")
        if name in query:
            raise bad(f"parameter {name!r} is given twice")
        query[name] = value
    endpoint = query.get("endpoint_url") or None
    if endpoint is not None:
        ep = urlsplit(endpoint)
        if ep.scheme not in ("http", "https") or not ep.hostname:
            raise bad(f"endpoint_url must be an http(s) URL, got {endpoint!r}")
        if ep.username is not None or ep.password is not None:
            raise bad("endpoint_url must not carry credentials")
    style = query.get("addressing_style") or ("path" if endpoint else "auto")
    if style not in ("path", "virtual", "auto"):
        raise bad(f"addressing_style must be path, virtual or auto, got {style!r}")
    flag = query.get("conditional_writes", "true").lower()
    if flag not in _BOOLEANS:
        raise bad(f"conditional_writes must be true or false, got {flag!r}")
    return S3Location(
        bucket=parts.netloc,
        prefix=prefix,
        endpoint_url=endpoint,
        region=query.get("region") or None,
        profile=query.get("profile") or None,
        addressing_style=style,
        conditional_writes=_BOOLEANS[flag],
    )


def _redacted(uri: str) -> str:
    # For the error about a URI that is refused: it may hold what it should not.
    parts = urlsplit(uri)
    query = [
        (name, urlsplit(value)._replace(netloc=urlsplit(value).netloc.rpartition("@")[2]).geturl())
        if name == "endpoint_url"
        else (name, value if name in _OPTIONS else "***")
        for name, value in parse_qsl(parts.query, keep_blank_values=True)
    ]
    netloc = parts.netloc.rpartition("@")[2]
    return parts._replace(netloc=netloc, query=urlencode(query, safe=":/")).geturl()


def preload_models() -> None:
    """Load botocore's S3 models into the cache that every client of the process
    shares. Optional: a process that forks others (a forkserver) calls it once, and
    the children create their clients in milliseconds instead of ~0.2 s each."""
    loader = _shared_loader(aiobotocore.session.AioSession())
    for name in ("service-2", "endpoint-rule-set-1"):
        loader.load_service_model("s3", name)
    for name in ("endpoints", "partitions", "sdk-default-configuration"):
        loader.load_data(name)


def _shared_loader(session: Any) -> Any:
    # Loading the S3 service model is most of a new client's cost (~0.2 s); every
    # client of the process shares one loader and its cache.
    global _loader
    with _loader_lock:
        if _loader is None:
            _loader = session.get_component("data_loader")
        else:
            session.register_component("data_loader", _loader)
        return _loader


def _error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _http_status(exc: ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))


def _was_retried(exc: ClientError) -> bool:
    return int(exc.response.get("ResponseMetadata", {}).get("RetryAttempts", 0)) > 0


def _is_missing(exc: ClientError) -> bool:
    return _http_status(exc) == 404 or _error_code(exc) in ("NoSuchKey", "NotFound")


def _precondition_failed(exc: ClientError, if_match: bool) -> bool:
    if _http_status(exc) == 412 or _error_code(exc) == "PreconditionFailed":
        return True
    # If-Match on a missing key: 404 on some servers (moto), 412 on others.
    return if_match and _error_code(exc) == "NoSuchKey"


def _is_conflict(exc: ClientError) -> bool:
    # Another conditional write to the key was in flight; AWS says to retry.
    return _error_code(exc) == "ConditionalRequestConflict"


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
        self.location = parse_uri(uri)
        self._bucket = self.location.bucket
        self._root = self.location.prefix
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
        self._lock = threading.Lock()
        self._clients: dict[asyncio.AbstractEventLoop, asyncio.Task[Any]] = {}
        self._keepers: dict[asyncio.AbstractEventLoop, AsyncGenerator[None, None]] = {}
        self._verified = False
        self._etags: collections.OrderedDict[str, tuple[bytes, str]] = collections.OrderedDict()
        #: HTTP requests sent by this instance (retries included), by S3 operation.
        self.requests: collections.Counter[str] = collections.Counter()

    # -- the Storage contract ----------------------------------------------------
    async def get(self, key: str) -> bytes | None:
        found = await self._read("get", key, self._name(key))
        return None if found is None else found[0]

    async def put(self, key: str, data: bytes) -> None:
        name = self._name(key)
        self._remember(name, b"", None)
        client = await self._client()
        with self._translate("put", repr(key)):
            if len(data) > self.multipart_threshold:
                await self._put_multipart(client, name, data)
            else:
                await client.put_object(Bucket=self._bucket, Key=name, Body=_body(data))

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
        return await self._conditional_put("put_if_absent", key, name, data, None)

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
        if expected is None:
            return await self._conditional_put("compare_and_set", key, name, data, None)
        etag = self._recalled(name, expected)
        if etag is not None:
            if await self._conditional_put("compare_and_set", key, name, data, etag):
                return True
            if etag == _md5_etag(expected):
                # The server's ETags are the MD5 of the bytes (single PUTs, no KMS), so
                # another ETag now means other bytes. (An equal value written as a
                # multipart or KMS object elsewhere would make this a spurious False,
                # which never loses a write: callers retry from a fresh read.)
                return False
        # Nothing remembered, or the object changed since: decide by its bytes now.
        found = await self._read("compare_and_set", key, name)
        if found is None or found[0] != expected:
            return False
        # A 412 now means another write came between our read and our write. Its
        # bytes could equal ``expected`` only with the same ETag (the MD5 of a
        # single-part object), and then If-Match would have matched.
        return await self._conditional_put("compare_and_set", key, name, data, found[1])

    async def delete(self, key: str) -> bool:
        name = self._name(key)
        self._remember(name, b"", None)
        # DeleteObject answers 204 whether or not the key existed: ask first.
        if not await self._head(name, "delete", key):
            return False
        client = await self._client()
        with self._translate("delete", repr(key)):
            await client.delete_object(Bucket=self._bucket, Key=name)
        return True

    async def delete_prefix(self, prefix: str) -> int:
        keys = await self.list(prefix)
        if not keys:
            return 0
        client = await self._client()
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
                raise StorageError(
                    f"S3 storage {self._uri}: delete_prefix {prefix!r} failed for "
                    f"{len(errors)} keys, the first {first.get('Key')!r}: "
                    f"{first.get('Code')}: {first.get('Message')}",
                    uri=self._uri,
                    operation="delete_prefix",
                )
            return len(response.get("Deleted") or [])

        names = [self._root + key for key in keys]
        with self._translate("delete_prefix", repr(prefix)):
            counts = await asyncio.gather(
                *(batch(names[i : i + 1000]) for i in range(0, len(names), 1000))
            )
        return sum(counts)

    async def list(self, prefix: str = "") -> list[str]:
        check_prefix(prefix)
        client = await self._client()
        keys: list[str] = []
        params: dict[str, Any] = {"Bucket": self._bucket, "Prefix": self._root + prefix}
        start = len(self._root)
        with self._translate("list", repr(prefix)):
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
        return await self._head(self._name(key), "exists", key)

    async def check(self) -> None:
        # A client of its own, with short timeouts: a wrong endpoint fails in seconds.
        client = await self._new_client(self._check_config)
        try:
            with self._translate("check", f"bucket {self._bucket!r}"):
                await client.list_objects_v2(Bucket=self._bucket, Prefix=self._root, MaxKeys=1)
        finally:
            with contextlib.suppress(Exception):
                await client.close()
        if self.location.conditional_writes and not self._verified:
            await self._probe_conditional_writes()
            self._verified = True

    async def close(self) -> None:
        with self._lock:
            keepers, self._keepers = self._keepers, {}
            self._clients = {}
        here = asyncio.get_running_loop()
        for loop, keeper in keepers.items():
            if loop is here:
                with contextlib.suppress(Exception):
                    await keeper.aclose()
            elif loop.is_running():
                future = asyncio.run_coroutine_threadsafe(keeper.aclose(), loop)
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(asyncio.wrap_future(future), 10)
            # A loop that is closed took its client with it (see _keep).

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

    async def _client(self) -> Any:
        loop = asyncio.get_running_loop()
        task = self._clients.get(loop)
        if task is None:
            with self._lock:
                task = self._clients.get(loop)
                if task is None:
                    # Loops that have closed (asyncio.run in a worker) leave their
                    # entries behind; forget them here, where new ones are made.
                    for old in [old for old in self._clients if old.is_closed()]:
                        del self._clients[old]
                        self._keepers.pop(old, None)
                    task = loop.create_task(self._keep(self._new_client(self._config)))
                    self._clients[loop] = task
        if task.done() and not task.cancelled() and task.exception() is None:
            return task.result()
        try:
            # Shielded: a caller that is canceled must not cancel the shared creation.
            return await asyncio.shield(task)
        except Exception:
            with self._lock:
                if self._clients.get(loop) is task:
                    del self._clients[loop]
            raise

    async def _keep(self, connecting: Awaitable[Any]) -> Any:
        client = await connecting
        keeper = _closer(client)
        await keeper.__anext__()  # first iterated on this loop, so the loop finalises it
        with self._lock:
            self._keepers[asyncio.get_running_loop()] = keeper
        return client

    async def _new_client(self, config: Config) -> Any:
        with self._translate("connect", "a client"):
            session = aiobotocore.session.AioSession(profile=self.location.profile)
            _shared_loader(session)
            context = session.create_client(
                "s3", endpoint_url=self.location.endpoint_url, config=config
            )
            client = await context.__aenter__()
        client.meta.events.register("before-send.s3", self._count)
        return client

    def _count(self, event_name: str = "", **_: Any) -> None:
        self.requests[event_name.rpartition(".")[2]] += 1

    async def _read(self, op: str, key: str, name: str) -> tuple[bytes, str] | None:
        client = await self._client()
        with self._translate(op, repr(key)):
            try:
                response = await client.get_object(Bucket=self._bucket, Key=name)
            except ClientError as exc:
                if _is_missing(exc):
                    return None
                raise
            async with response["Body"] as body:
                data: bytes = await body.read()
        etag = str(response.get("ETag") or "")
        self._remember(name, data, etag)
        return data, etag

    def _remember(self, name: str, data: bytes, etag: str | None) -> None:
        with self._lock:
            if etag and len(data) <= _ETAG_CACHE_VALUE_LIMIT:
                self._etags[name] = (bytes(data), etag)
                self._etags.move_to_end(name)
                if len(self._etags) > _ETAG_CACHE_ENTRIES:
                    self._etags.popitem(last=False)
            else:
                self._etags.pop(name, None)

    def _recalled(self, name: str, expected: bytes) -> str | None:
        with self._lock:
            data, etag = self._etags.get(name, (None, ""))
        return etag if data == expected else None

    async def _head(self, name: str, op: str, key: str) -> bool:
        client = await self._client()
        with self._translate(op, repr(key)):
            try:
                await client.head_object(Bucket=self._bucket, Key=name)
            except ClientError as exc:
                if _is_missing(exc):
                    return False
                raise
        return True

    async def _conditional_put(
        self, op: str, key: str, name: str, data: bytes, etag: str | None
    ) -> bool:
        """PutObject with If-None-Match: * (``etag`` None) or If-Match: etag."""
        client = await self._client()
        token = secrets.token_hex(16)
        params: dict[str, Any] = {
            "Bucket": self._bucket,
            "Key": name,
            "Body": _body(data),
            "Metadata": {_TOKEN: token},
        }
        if etag is None:
            params["IfNoneMatch"] = "*"
        else:
            params["IfMatch"] = etag
        with self._translate(op, repr(key)):
            for attempt in range(_CONFLICT_RETRIES):
                try:
                    response = await client.put_object(**params)
                    self._remember(name, data, response.get("ETag"))
                    return True
                except ClientError as exc:
                    if _is_conflict(exc):
                        await asyncio.sleep(random.uniform(0, 0.05 * 2**attempt))
                        continue
                    if not _precondition_failed(exc, etag is not None):
                        raise
                    if _was_retried(exc):
                        # An earlier attempt may have been written before its answer
                        # was lost; then the precondition failed against our own write.
                        return await self._has_token(client, name, token)
                    return False
        raise StorageError(
            f"S3 storage {self._uri}: {op} {key!r} failed: the server answered "
            f"ConditionalRequestConflict {_CONFLICT_RETRIES} times in a row.",
            uri=self._uri,
            operation=op,
        )

    async def _has_token(self, client: Any, name: str, token: str) -> bool:
        try:
            head = await client.head_object(Bucket=self._bucket, Key=name)
        except ClientError as exc:
            if _is_missing(exc):
                return False
            raise
        return bool(head.get("Metadata", {}).get(_TOKEN) == token)

    async def _put_multipart(self, client: Any, name: str, data: bytes) -> None:
        # Parts are cut from the caller's buffer as they are sent, so at most
        # ``part_concurrency`` parts are copied at a time, never the whole value.
        # S3 allows 10,000 parts; a huge value gets bigger parts.
        part = max(self.part_size, -(-len(data) // 10_000))
        view = memoryview(data)
        created = await client.create_multipart_upload(Bucket=self._bucket, Key=name)
        upload_id = created["UploadId"]
        limit = asyncio.Semaphore(self.part_concurrency)

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

    async def _probe_conditional_writes(self) -> None:
        name = f"{self._root}{_RESERVED}probe-{secrets.token_hex(8)}"
        created = await self._conditional_put("check", name, name, b"1", None)
        try:
            again = await self._conditional_put("check", name, name, b"2", None)
            stale = await self._conditional_put("check", name, name, b"3", f'"{"0" * 32}"')
        finally:
            client = await self._client()
            with self._translate("check", "the probe object"):
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

    @contextlib.contextmanager
    def _translate(self, op: str, what: str) -> Iterator[None]:
        try:
            yield
        except ClientError as exc:
            code, status = _error_code(exc), _http_status(exc)
            message = exc.response.get("Error", {}).get("Message") or ""
            summary = f"{code or 'error'} (HTTP {status})" + (f": {message}" if message else "")
            raise self._error(op, what, summary, _hint(code, status, self.location)) from exc
        except _WIRE_ERRORS as exc:
            summary = str(exc) or type(exc).__name__
            raise self._error(
                op, what, summary, _hint(type(exc).__name__, 0, self.location)
            ) from exc

    def _error(self, op: str, what: str, summary: str, hint: str) -> StorageError:
        return StorageError(
            f"S3 storage {self._uri}: {op} {what} failed: {summary}.{hint}",
            uri=self._uri,
            operation=op,
        )


def _md5_etag(data: bytes) -> str:
    return f'"{hashlib.md5(data, usedforsecurity=False).hexdigest()}"'


def _body(data: bytes) -> bytes | bytearray:
    # botocore takes bytes and bytearray, not other buffers such as memoryview.
    return data if isinstance(data, (bytes, bytearray)) else bytes(data)


def _hint(code: str, status: int, location: S3Location) -> str:
    if code == "NoSuchBucket":
        return f" Create the bucket {location.bucket!r}, or fix the bucket in the URI."
    if code in _AUTH_CODES or status == 403 or code.endswith("CredentialsError"):
        where = f" (profile {location.profile!r})" if location.profile else ""
        return (
            f" Check the AWS credentials{where} of this process: AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY, AWS_PROFILE or ~/.aws/credentials; every node needs them."
        )
    if code == "ProfileNotFound":
        return " Add the profile to ~/.aws/credentials or ~/.aws/config, or fix the URI."
    if code in ("EndpointConnectionError", "ConnectTimeoutError", "ConnectionClosedError"):
        endpoint = location.endpoint_url or "the AWS S3 endpoint"
        return f" Is {endpoint} reachable from this process?"
    return ""


async def _closer(client: Any) -> AsyncGenerator[None, None]:
    # A loop's shutdown_asyncgens() (asyncio.run calls it) closes the async
    # generators first iterated on it: this one then closes the client, on its loop.
    try:
        yield
    finally:
        await client.close()


__all__ = ["S3Location", "S3Storage", "parse_uri", "preload_models"]
