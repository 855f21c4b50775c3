"""Signed records: storage is a code-execution boundary, so with a signing key every
record the engine writes is signed and every record it reads is verified before it is
unpickled or otherwise trusted.

A signed record is ``RWS1`` + the key's id (8 hex digits) + HMAC-SHA256 + the bytes.
The MAC covers the prefix, the storage key and the bytes: a record copied or moved to
another key fails the check as surely as a changed one. Signing is deterministic, so a
conditional write that compares old bytes (``compare_and_set``) still compares equal.

:class:`SignedStorage` wraps the backend at the storage boundary, so every writer and
reader (runner, workers, packs, continuations, mailboxes, virtual actors, ``meta.json``,
leases) goes through it. The engine opens storage with :func:`engine_storage`, never
with :func:`~ray_workflows.storage.open_storage` itself.

How a process learns the key: the driver has it in its
:class:`~ray_workflows._core.settings.Settings` (``RAY_WORKFLOWS_SIGNING_KEY``, read
once) and so do the manager and a host task, which are handed those settings. The
manager (or host) publishes it in Ray's internal KV under a digest of the storage URI;
a worker, handed only the URI and the key's id, takes it from there. The key is never
in a URI, a repr, a log line or a pickled storage (that pickles to the URI and the id).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import threading
from collections.abc import Mapping
from typing import Any

import ray

from ray_workflows._core import cluster_kv
from ray_workflows.exceptions import RecordSignatureError
from ray_workflows.storage import Storage, check_key, open_storage

MAGIC = b"RWS1"
_ID_CHARS = 8
_MAC_BYTES = 32
HEADER_BYTES = len(MAGIC) + _ID_CHARS + _MAC_BYTES
MIN_SECRET_CHARS = 32
#: Records at least this big are hashed in a thread, not in the event loop.
_THREAD_BYTES = 1 << 20
_KV_NAMESPACE = "ray_workflows_signing"
_HOW_TO_MAKE = "python -c 'import secrets; print(secrets.token_hex(32))'"


class SigningKey:
    """A secret for signing records. Its repr shows only its id."""

    __slots__ = ("_base", "_prefix", "_secret", "key_id")

    def __init__(self, secret: bytes) -> None:
        self._secret = secret
        self.key_id = hmac.new(secret, b"ray-workflows key id", hashlib.sha256).hexdigest()
        self.key_id = self.key_id[:_ID_CHARS]
        self._prefix = MAGIC + self.key_id.encode()
        self._base = hmac.new(secret, self._prefix, hashlib.sha256)

    def __reduce__(self) -> Any:
        return (SigningKey, (self._secret,))  # travels to the manager with the Settings

    def __repr__(self) -> str:
        return f"SigningKey(id={self.key_id!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SigningKey) and hmac.compare_digest(self._secret, other._secret)

    def __hash__(self) -> int:
        return hash(self.key_id)

    def _mac(self, key: str, data: bytes) -> bytes:
        mac = self._base.copy()
        mac.update(key.encode())
        mac.update(b"\0")  # a key never holds a NUL: key and bytes cannot be re-split
        mac.update(data)
        return mac.digest()

    def sign(self, key: str, data: bytes) -> bytes:
        return b"".join((self._prefix, self._mac(check_key(key), data), data))

    def verify(self, where: str, key: str, record: bytes) -> bytes:
        """The bytes signed in ``record`` under ``key``; else RecordSignatureError."""
        if len(record) < HEADER_BYTES or not record.startswith(MAGIC):
            raise RecordSignatureError(
                f"The record {key!r} in storage {where} is not signed, but this cluster "
                "signs its records (RAY_WORKFLOWS_SIGNING_KEY is set); it was not read. "
                "It was written without the key (before signing was turned on: start "
                "with a new storage), or by someone who should not write this storage.",
                key=key,
            )
        key_id = record[len(MAGIC) : len(self._prefix)].decode("ascii", "replace")
        if key_id != self.key_id:
            raise RecordSignatureError(
                f"The record {key!r} in storage {where} is signed with another key (id "
                f"{key_id}) than this cluster's (id {self.key_id}); it was not read. Give "
                "every driver the RAY_WORKFLOWS_SIGNING_KEY the storage was written with.",
                key=key,
            )
        mac = record[len(self._prefix) : HEADER_BYTES]
        data = record[HEADER_BYTES:]
        if not hmac.compare_digest(mac, self._mac(key, data)):
            raise RecordSignatureError(
                f"The record {key!r} in storage {where} fails its signature check: it "
                "was changed after it was written, or copied here from another key; it "
                "was not read. Find out who can write this storage, then restore the "
                "record from a backup or delete the workflow.",
                key=key,
            )
        return data


def parse_key(name: str, value: Any) -> SigningKey:
    """The signing key given as ``value`` (a string or bytes) for knob ``name``."""
    if isinstance(value, SigningKey):
        return value
    if isinstance(value, str):
        value = value.strip().encode()
    if not isinstance(value, bytes):
        raise TypeError(f"{name} must be a string, got {type(value).__name__}")
    if len(value) < MIN_SECRET_CHARS:
        raise ValueError(
            f"{name} must be a secret of at least {MIN_SECRET_CHARS} characters, got "
            f"{len(value)}; make one with: {_HOW_TO_MAKE}"
        )
    return SigningKey(value)


class SignedStorage(Storage):
    """``inner``, with every value signed by ``key`` when written and verified when read."""

    scheme = "signed"

    def __init__(self, inner: Storage, key: SigningKey) -> None:
        super().__init__(inner.uri)
        self.inner, self.key = inner, key

    @property
    def shared(self) -> bool:  # type: ignore[override]
        return self.inner.shared

    @property
    def blocking_batches(self) -> bool:  # type: ignore[override]
        return self.inner.blocking_batches

    @property
    def ordered_batches(self) -> bool:  # type: ignore[override]
        return self.inner.ordered_batches

    def __reduce__(self) -> Any:
        return (open_ref, ((self.uri, self.key.key_id),))

    def __repr__(self) -> str:
        return f"SignedStorage({self.uri!r}, key_id={self.key.key_id!r})"

    async def _sign(self, key: str, data: bytes) -> bytes:
        if len(data) >= _THREAD_BYTES:
            return await asyncio.to_thread(self.key.sign, key, data)
        return self.key.sign(key, data)

    async def get(self, key: str) -> bytes | None:
        record = await self.inner.get(key)
        if record is None:
            return None
        if len(record) >= _THREAD_BYTES:
            return await asyncio.to_thread(self.key.verify, self.uri, key, record)
        return self.key.verify(self.uri, key, record)

    async def put(self, key: str, data: bytes) -> None:
        await self.inner.put(key, await self._sign(key, data))

    async def put_many(self, items: Mapping[str, bytes]) -> None:
        await self.inner.put_many({k: await self._sign(k, v) for k, v in items.items()})

    async def put_if_absent(self, key: str, data: bytes) -> bool:
        return await self.inner.put_if_absent(key, await self._sign(key, data))

    async def put_if_absent_many(self, items: Mapping[str, bytes]) -> dict[str, bool]:
        signed = {k: await self._sign(k, v) for k, v in items.items()}
        return await self.inner.put_if_absent_many(signed)

    def put_if_absent_many_blocking(self, items: Mapping[str, bytes]) -> dict[str, bool]:
        signed = {k: self.key.sign(k, v) for k, v in items.items()}
        return self.inner.put_if_absent_many_blocking(signed)

    async def compare_and_set(self, key: str, expected: bytes | None, data: bytes) -> bool:
        old = None if expected is None else await self._sign(key, expected)
        return await self.inner.compare_and_set(key, old, await self._sign(key, data))

    async def delete(self, key: str) -> bool:
        return await self.inner.delete(key)

    async def delete_many(self, keys: list[str]) -> dict[str, bool]:
        return await self.inner.delete_many(keys)

    async def discard_many(self, keys: list[str]) -> None:
        await self.inner.discard_many(keys)

    async def delete_prefix(self, prefix: str) -> int:
        return await self.inner.delete_prefix(prefix)

    async def list(self, prefix: str = "") -> list[str]:
        return await self.inner.list(prefix)

    async def exists(self, key: str) -> bool:
        return await self.inner.exists(key)

    async def check(self) -> None:
        await self.inner.check()

    async def close(self) -> None:
        await self.inner.close()


_lock = threading.Lock()
_keys: dict[str, SigningKey] = {}  # storage URI -> the key this process was given
_asked: dict[str, SigningKey | None] = {}  # storage URI -> what Ray's KV said
_signed: dict[str, SignedStorage] = {}


def use(uri: str, key: SigningKey | None) -> None:
    """Sign the records of storage ``uri`` with ``key`` in this process. ``None``: this
    process was given no key; it uses the one the cluster's manager published, if any."""
    with _lock:
        _asked.pop(uri, None)
        if key is None:
            _keys.pop(uri, None)
        else:
            _keys[uri] = key


def _kv_name(uri: str) -> bytes:
    return cluster_kv.digest_key(b"key-", uri)


def publish(uri: str, key: SigningKey | None) -> None:
    """Make ``key`` the cluster's key for ``uri`` (where workers find it), unless the
    cluster has another one already: that is an error naming both ids."""
    use(uri, key)
    if key is None:
        return
    stored, _ = cluster_kv.claim(_KV_NAMESPACE, _kv_name(uri), key._secret)
    if not hmac.compare_digest(stored, key._secret):
        other = SigningKey(stored).key_id
        raise ValueError(
            f"Storage {uri} is signed in this Ray cluster with key id {other}, but this "
            f"process was given key id {key.key_id}: give every driver the same "
            "RAY_WORKFLOWS_SIGNING_KEY, or use another storage."
        )


def published_key(uri: str) -> SigningKey | None:
    """The key the cluster's manager of ``uri`` published, asked now (not cached)."""
    stored = cluster_kv.read(_KV_NAMESPACE, _kv_name(uri))
    return None if stored is None else SigningKey(stored)


def _key_for(uri: str) -> SigningKey | None:
    key = _keys.get(uri)
    if key is not None:
        return key
    if uri in _asked:
        return _asked[uri]
    if not ray.is_initialized():
        return None  # asked again once Ray runs
    found = published_key(uri)
    with _lock:
        _asked[uri] = found
    return found


def engine_storage(uri: str) -> Storage:
    """The storage ``uri`` as the engine uses it: signed if this process or its cluster
    has a signing key for it, else the backend itself (one shared instance per URI)."""
    inner = open_storage(uri)
    key = _key_for(uri)
    if key is None:
        return inner
    signed = _signed.get(uri)
    if signed is None or signed.inner is not inner or signed.key != key:
        with _lock:
            signed = _signed[uri] = SignedStorage(inner, key)
    return signed


def ref_of(storage: Storage) -> str | tuple[str, str]:
    """What a worker is sent to open ``storage``: its URI, and the key's id if signed."""
    if isinstance(storage, SignedStorage):
        return (storage.uri, storage.key.key_id)
    return storage.uri


def open_ref(ref: str | tuple[str, str]) -> Storage:
    """The storage :func:`ref_of` named. A signed one that this process has no key for
    is an error (it would otherwise read records without checking them)."""
    if isinstance(ref, str):
        return engine_storage(ref)
    uri, key_id = ref
    storage = engine_storage(uri)
    if not (isinstance(storage, SignedStorage) and storage.key.key_id == key_id):
        raise RecordSignatureError(
            f"Storage {uri} is signed with key id {key_id}, but this process has no such "
            "key: start the workflow from a driver with RAY_WORKFLOWS_SIGNING_KEY set, "
            "so that its manager publishes the key to the cluster.",
            key="",
        )
    return storage


__all__ = [
    "HEADER_BYTES",
    "MAGIC",
    "RecordSignatureError",
    "SignedStorage",
    "SigningKey",
    "engine_storage",
    "open_ref",
    "parse_key",
    "publish",
    "published_key",
    "ref_of",
    "use",
]
