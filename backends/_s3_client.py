"""The S3 storage's aiobotocore clients, and what the server's errors mean.

One client (and connection pool) per event loop that uses the storage, created on
first use: a client is bound to the loop it was made on, and a storage is used from
the manager's loop, the sync bridge's thread and workers. A loop that shuts down
closes its own client (see :func:`_closer`). Every client of the process shares one
loader of botocore's S3 models, the bulk of a new client's cost.

Requests run inside :meth:`S3Clients.translate`, which turns botocore's errors into
a :class:`StorageError` that names the storage, the operation and, where it can
tell, what to fix. Failures a later retry may get past (throttling, a 5xx, a timeout,
a lost or refused connection) become a :class:`TransientStorageError`; the rest
(AccessDenied and other 4xx, no such bucket, no credentials, a certificate that does
not verify) a plain :class:`StorageError`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import threading
from collections.abc import AsyncGenerator, Awaitable, Iterator
from typing import Any

# Imported eagerly (the s3 plugin module imports this one): without the [s3] extra
# this import fails, and the plugin registry turns that into
# "pip install 'ray-workflows[s3]'" at open time.
import aiobotocore.session
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, HTTPClientError, SSLError
from botocore.exceptions import ConnectionError as BotoConnectionError
from ray_workflows.backends._s3_uri import S3Location

from ray_workflows.exceptions import StorageError, TransientStorageError

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
# Codes S3 (and compatible servers) answer when the same request may pass later.
_TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "TooManyRequests",
        "RequestLimitExceeded",
        "RequestTimeout",
        "InternalError",
        "ServiceUnavailable",
        "ConditionalRequestConflict",
    }
)

_loader_lock = threading.Lock()
_loader: Any = None


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


def transient(code: str, status: int) -> bool:
    """Whether an S3 error (its code and HTTP status) may pass if the request is retried."""
    return code in _TRANSIENT_CODES or status == 429 or status >= 500


def _transient_wire(exc: BaseException) -> bool:
    # A timeout, a refused or dropped connection; not a certificate that fails to
    # verify, missing credentials or a request botocore refuses to build.
    if isinstance(exc, SSLError):
        return False
    return isinstance(exc, (BotoConnectionError, HTTPClientError, OSError, asyncio.TimeoutError))


def was_retried(exc: ClientError) -> bool:
    return int(exc.response.get("ResponseMetadata", {}).get("RetryAttempts", 0)) > 0


def is_missing(exc: ClientError) -> bool:
    return _http_status(exc) == 404 or _error_code(exc) in ("NoSuchKey", "NotFound")


def precondition_failed(exc: ClientError, if_match: bool) -> bool:
    if _http_status(exc) == 412 or _error_code(exc) == "PreconditionFailed":
        return True
    # If-Match on a missing key: 404 on some servers (moto), 412 on others.
    return if_match and _error_code(exc) == "NoSuchKey"


def is_conflict(exc: ClientError) -> bool:
    # Another conditional write to the key was in flight; AWS says to retry.
    return _error_code(exc) == "ConditionalRequestConflict"


class S3Clients:
    """The clients of one S3 storage, one per event loop, and the errors of their
    requests. ``config`` is the botocore configuration of the shared clients."""

    def __init__(self, uri: str, location: S3Location, config: Config) -> None:
        self._uri = uri
        self._location = location
        self._config = config
        self._lock = threading.Lock()
        self.clients: dict[asyncio.AbstractEventLoop, asyncio.Task[Any]] = {}
        self.keepers: dict[asyncio.AbstractEventLoop, AsyncGenerator[None, None]] = {}
        #: HTTP requests sent by these clients (retries included), by S3 operation.
        self.requests: collections.Counter[str] = collections.Counter()

    async def get(self) -> Any:
        """The client of the running event loop, created on its first use."""
        loop = asyncio.get_running_loop()
        task = self.clients.get(loop)
        if task is None:
            with self._lock:
                task = self.clients.get(loop)
                if task is None:
                    # Loops that have closed (asyncio.run in a worker) leave their
                    # entries behind; forget them here, where new ones are made.
                    for old in [old for old in self.clients if old.is_closed()]:
                        del self.clients[old]
                        self.keepers.pop(old, None)
                    task = loop.create_task(self._keep(self.new(self._config)))
                    self.clients[loop] = task
        if task.done() and not task.cancelled() and task.exception() is None:
            return task.result()
        try:
            # Shielded: a caller that is canceled must not cancel the shared creation.
            return await asyncio.shield(task)
        except Exception:
            with self._lock:
                if self.clients.get(loop) is task:
                    del self.clients[loop]
            raise

    async def _keep(self, connecting: Awaitable[Any]) -> Any:
        client = await connecting
        keeper = _closer(client)
        await keeper.__anext__()  # first iterated on this loop, so the loop finalises it
        with self._lock:
            self.keepers[asyncio.get_running_loop()] = keeper
        return client

    async def new(self, config: Config) -> Any:
        """A new client with ``config``, its requests counted; the caller closes it
        unless it is one of the shared clients."""
        with self.translate("connect", "a client"):
            session = aiobotocore.session.AioSession(profile=self._location.profile)
            _shared_loader(session)
            context = session.create_client(
                "s3", endpoint_url=self._location.endpoint_url, config=config
            )
            client = await context.__aenter__()
        client.meta.events.register("before-send.s3", self._count)
        return client

    def _count(self, event_name: str = "", **_: Any) -> None:
        self.requests[event_name.rpartition(".")[2]] += 1

    async def close(self) -> None:
        """Close every shared client, each on its own loop."""
        with self._lock:
            keepers, self.keepers = self.keepers, {}
            self.clients = {}
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

    @contextlib.contextmanager
    def translate(self, op: str, what: str) -> Iterator[None]:
        """Turn botocore's errors raised inside into a :class:`StorageError` that
        says that ``op`` on ``what`` failed, and why."""
        try:
            yield
        except ClientError as exc:
            code, status = _error_code(exc), _http_status(exc)
            message = exc.response.get("Error", {}).get("Message") or ""
            summary = f"{code or 'error'} (HTTP {status})" + (f": {message}" if message else "")
            hint = _hint(code, status, self._location)
            raise self._error(op, what, summary, hint, transient(code, status)) from exc
        except _WIRE_ERRORS as exc:
            summary = str(exc) or type(exc).__name__
            hint = _hint(type(exc).__name__, 0, self._location)
            raise self._error(op, what, summary, hint, _transient_wire(exc)) from exc

    def _error(
        self, op: str, what: str, summary: str, hint: str, transient: bool = False
    ) -> StorageError:
        cls = TransientStorageError if transient else StorageError
        return cls(
            f"S3 storage {self._uri}: {op} {what} failed: {summary}.{hint}",
            uri=self._uri,
            operation=op,
        )


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


__all__ = [
    "S3Clients",
    "is_conflict",
    "is_missing",
    "precondition_failed",
    "preload_models",
    "transient",
    "was_retried",
]
