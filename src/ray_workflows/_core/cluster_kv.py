"""Records every process of a Ray cluster shares, in Ray's internal KV (kept by the
GCS): the cluster token (:mod:`ray_workflows._core.incarnation`), the signing key of a
storage (:mod:`ray_workflows._core.signing`), the storage and settings the
cluster's workflows use (:mod:`ray_workflows._core.cluster_storage`), and Ray's own
``runtime_env`` packages, kept outside any namespace
(:mod:`ray_workflows._core.environment`).

A record several processes may race to create is *claimed*: written if absent, then
read back, so that every process ends up with the one that won.
"""

from __future__ import annotations

import hashlib

from ray.experimental import internal_kv


def digest_key(prefix: bytes, text: str) -> bytes:
    """A short record key for ``text`` (a storage URI may be long or hold any byte)."""
    return prefix + hashlib.sha256(text.encode()).hexdigest()[:32].encode()


def read(namespace: str | None, key: bytes) -> bytes | None:
    """The record, or ``None`` when there is none (or it is empty)."""
    raw = internal_kv._internal_kv_get(key, namespace=namespace)
    return raw if isinstance(raw, bytes) and raw else None


def exists(namespace: str | None, key: bytes) -> bool:
    return bool(internal_kv._internal_kv_exists(key, namespace=namespace))


def create(namespace: str | None, key: bytes, value: bytes) -> bool:
    """Write ``value`` unless the record exists; whether this call wrote it."""
    existed = internal_kv._internal_kv_put(key, value, overwrite=False, namespace=namespace)
    return not existed


def write(namespace: str | None, key: bytes, value: bytes) -> None:
    """Write the record, replacing any."""
    internal_kv._internal_kv_put(key, value, overwrite=True, namespace=namespace)


def claim(namespace: str | None, key: bytes, value: bytes) -> tuple[bytes, bool]:
    """Write ``value`` unless the record exists; the record that won, and whether it
    is this one's write."""
    created = create(namespace, key, value)
    stored = read(namespace, key)
    if stored is None:
        raise RuntimeError(f"Ray's internal KV lost the record {key!r} just written")
    return stored, created


__all__ = ["claim", "create", "digest_key", "exists", "read", "write"]
