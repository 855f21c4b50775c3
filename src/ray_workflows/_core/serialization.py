"""Pickling for checkpoints: ObjectRefs out of band, every record checksummed.

* :func:`dumps` pickles a value with cloudpickle but lifts every ``ray.ObjectRef``
  out into a list, so the refs can be passed to Ray alive (in memory) or replaced
  by the storage keys of their checkpointed values (on disk).
* Every stored record is an *envelope*: magic, a JSON header (kind, length,
  CRC32 of the payload, the object keys of its refs) and the payload. A torn,
  truncated or foreign file fails :func:`decode` with ``CheckpointError``; it is
  never read as a valid output.
* :class:`ObjectStore` checkpoints the values behind ObjectRefs, content-addressed
  (``sha256`` of the envelope), so one object is written once per workflow however
  often it is referenced, and before any record that references it.
"""

from __future__ import annotations

import collections
import copyreg
import hashlib
import io
import json
import pickle
import struct
import zlib
from collections.abc import Callable
from typing import Any

import ray
from ray import cloudpickle
from ray.actor import ActorHandle

from ray_workflows._core.signing import MAGIC as SIGNED_MAGIC
from ray_workflows.exceptions import CheckpointError, RecordSignatureError

MAGIC = b"RWF\x01"
_HEADER_LEN = struct.Struct(">I")


class ActorHandleError(TypeError):
    """A value to checkpoint holds a Ray actor handle (it does not survive a recovery)."""


def _refuse_actor_handle(handle: Any) -> Any:
    raise ActorHandleError(
        f"{handle!r} is a Ray actor handle, and a workflow checkpoints every task's "
        "arguments and output: after a recovery the actor is gone and the handle dead. "
        "Create the actor inside the task that uses it, or keep the state in a virtual "
        "actor (@workflow.virtual_actor)."
    )


class _Pickler(cloudpickle.Pickler):
    def __init__(
        self,
        file: io.BytesIO,
        refs: list[Any],
        hook: Callable[[Any], Any] | None,
        actors: bool = False,
    ):
        if not actors:
            # cloudpickle's reducers over copyreg's, as its ChainMap has them, plus the
            # refusal: one dict lookup per object, which the C pickler makes anyway.
            # (Set before __init__, which reads it.)
            table: dict[Any, Any] = {
                **copyreg.dispatch_table,
                **cloudpickle.Pickler._dispatch_table,
                ActorHandle: _refuse_actor_handle,
            }
            # pickle takes any mapping; cloudpickle's declared type is its ChainMap.
            self.dispatch_table = table  # type: ignore[assignment]
        super().__init__(file, protocol=5)  # type: ignore[no-untyped-call]
        self._refs = refs
        self._seen: dict[bytes, int] = {}
        self._hook = hook

    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, ray.ObjectRef):
            key = obj.binary()
            index = self._seen.get(key)
            if index is None:
                index = self._seen[key] = len(self._refs)
                self._refs.append(obj)
            return ("ref", index)
        if self._hook is not None:
            return self._hook(obj)
        return None


class _Unpickler(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, refs: list[Any], hook: Callable[[Any], Any] | None):
        super().__init__(file)
        self._refs = refs
        self._hook = hook

    def persistent_load(self, pid: Any) -> Any:
        if pid[0] == "ref":
            return self._refs[pid[1]]
        if self._hook is not None:
            return self._hook(pid)
        raise pickle.UnpicklingError(f"unknown persistent id {pid!r}")


# Values the C pickler writes exactly as cloudpickle does, with nothing to lift out:
# atoms, and short flat lists, tuples and dicts of them (most task outputs).
ATOMS = frozenset({int, float, str, bytes, bool, type(None)})
_FLAT = 64


def _plain(value: Any) -> bool:
    kind = type(value)
    if kind in ATOMS:
        return True
    if kind is list or kind is tuple:
        return len(value) <= _FLAT and all(type(v) in ATOMS for v in value)
    if kind is dict:
        return len(value) <= _FLAT and all(
            type(k) in ATOMS and type(v) in ATOMS for k, v in value.items()
        )
    return False


def dumps(
    value: Any, hook: Callable[[Any], Any] | None = None, *, actors: bool = False
) -> tuple[bytes, list[Any]]:
    """Pickle ``value``; return the bytes and the ObjectRefs found in it, in order.

    ``hook(obj)`` may return a persistent id for other objects (DAG nodes when
    compiling a plan); :func:`loads` then needs the matching hook. A Ray actor handle
    in ``value`` raises :class:`ActorHandleError`, unless ``actors`` (a value that is
    never stored).
    """
    if _plain(value):
        return pickle.dumps(value, protocol=5), []
    buffer = io.BytesIO()
    refs: list[Any] = []
    _Pickler(buffer, refs, hook, actors).dump(value)
    return buffer.getvalue(), refs


def loads(data: bytes, refs: list[Any], hook: Callable[[Any], Any] | None = None) -> Any:
    """Unpickle bytes from :func:`dumps`, putting ``refs[i]`` where the i-th ref was."""
    if not refs and hook is None:  # no persistent ids in it: the C unpickler alone
        return pickle.loads(data)
    return _Unpickler(io.BytesIO(data), refs, hook).load()


def encode(kind: str, payload: bytes, refs: list[str] | None = None, **meta: Any) -> bytes:
    """Wrap a payload in a checksummed envelope."""
    header = {"kind": kind, "len": len(payload), "crc": zlib.crc32(payload), "refs": refs or []}
    header.update(meta)
    head = json.dumps(header, separators=(",", ":")).encode()
    return b"".join((MAGIC, _HEADER_LEN.pack(len(head)), head, payload))


def decode(data: bytes, where: str = "") -> tuple[dict[str, Any], bytes]:
    """Check an envelope; return (header, payload). Raises ``CheckpointError`` if torn."""
    try:
        if data[:4] != MAGIC:
            _not_signed_here(data, where)
            raise ValueError("bad magic")
        (head_len,) = _HEADER_LEN.unpack_from(data, 4)
        header: dict[str, Any] = json.loads(data[8 : 8 + head_len])
        payload = data[8 + head_len :]
        if len(payload) != header["len"] or zlib.crc32(payload) != header["crc"]:
            raise ValueError(f"payload is {len(payload)} bytes, header says {header['len']}")
    except (ValueError, KeyError, struct.error) as exc:
        raise CheckpointError(
            f"Checkpoint {where or '(record)'} is torn or not a ray-workflows record ({exc}); "
            "it is ignored and the task that wrote it runs again.",
            key=where,
        ) from None
    return header, payload


def _not_signed_here(data: bytes, where: str) -> None:
    # A signed record read without the key is not torn: were it taken for torn, the
    # task that wrote it would run again and the record be replaced.
    if data[: len(SIGNED_MAGIC)] == SIGNED_MAGIC:
        raise RecordSignatureError(
            f"Record {where or '(record)'} is signed, but this process has no signing key: "
            "set RAY_WORKFLOWS_SIGNING_KEY to the key this storage was written with. It "
            "was not read.",
            key=where,
        )


def peek_header(data: bytes, where: str = "") -> dict[str, Any]:
    return decode(data, where)[0]


def _first(box: list[Any]) -> Any:
    return box[0]


_unbox_remote: Any = None


def _unbox() -> Any:
    global _unbox_remote
    if _unbox_remote is None:
        _unbox_remote = ray.remote(num_cpus=0)(_first)
    return _unbox_remote


class ObjectStore:
    """Checkpoints and loads the values of ObjectRefs for one workflow (sync; runs in
    Ray workers and helper tasks, never on the engine's event loop).

    ``write(key, data)`` stores a record if absent; for a storage that only the
    engine can write (``memory://``), pass a ``write`` that collects the records
    so the engine writes them.
    """

    _CACHE_SIZE = 256

    def __init__(
        self,
        prefix: str,
        read: Callable[[str], bytes | None],
        write: Callable[[str, bytes], None],
    ) -> None:
        self._prefix = prefix
        self._read = read
        self._write = write
        self._saved: dict[bytes, str] = {}
        self._loaded: collections.OrderedDict[str, Any] = collections.OrderedDict()

    def save(self, refs: list[Any]) -> list[str]:
        """Checkpoint the value behind each ref (depth first); return their keys."""
        keys = []
        for ref in refs:
            key = self._saved.get(ref.binary())
            if key is None:
                payload, inner = dumps(ray.get(ref))  # a ref inside is saved in turn
                record = encode("object", payload, self.save(inner))
                key = self._prefix + hashlib.sha256(record).hexdigest()
                self._write(key, record)
                self._saved[ref.binary()] = key
            keys.append(key)
        return keys

    def load_value(self, key: str) -> Any:
        data = self._read(key)
        if data is None:
            raise CheckpointError(f"Checkpointed object {key!r} is missing from storage.", key=key)
        header, payload = decode(data, key)
        return loads(payload, [self.load_ref(k) for k in header["refs"]])

    def load_ref(self, key: str) -> Any:
        """An ObjectRef holding the checkpointed object (cached: each key loads once)."""
        ref = self._loaded.get(key)
        if ref is None:
            value = self.load_value(key)
            # Ray refuses to put an ObjectRef; a task returning it makes a ref to the ref.
            ref = _unbox().remote([value]) if isinstance(value, ray.ObjectRef) else ray.put(value)
            self._loaded[key] = ref
            if len(self._loaded) > self._CACHE_SIZE:
                self._loaded.popitem(last=False)
        else:
            self._loaded.move_to_end(key)
        return ref


__all__ = [
    "ATOMS",
    "MAGIC",
    "ActorHandleError",
    "ObjectStore",
    "decode",
    "dumps",
    "encode",
    "loads",
    "peek_header",
]
