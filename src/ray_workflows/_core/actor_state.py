"""A virtual actor's state, as it is captured, stored and restored.

A worker captures the state of an instance after a call (:func:`capture`): the
instance's ``__dict__``, which must be JSON, or what ``__getstate__`` returns, which
may be anything picklable. The manager stores it as the state record after call
``n`` (:func:`state_record`): JSON, ``{"seq": n, "state": ...}``, when the state is
JSON; otherwise an envelope of the engine's serializer
(:mod:`ray_workflows._core.serialization`) with ``seq`` in its header, the values of
the ObjectRefs in it checkpointed under ``actors/<id>/objects/`` as a task output's
are under its workflow. The manager reads only the header; a worker restores the
state (:func:`restore`).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from ray_workflows._core import bridge, serialization
from ray_workflows._core.keys import actor_objects_prefix
from ray_workflows._core.signing import open_ref
from ray_workflows.exceptions import WorkflowNotFoundError
from ray_workflows.storage import Storage


@dataclasses.dataclass(frozen=True)
class Captured:
    """A state as a worker captured it: JSON (``value``), or pickled (``payload``, the
    storage keys of its ObjectRefs' values, and the object records to store first)."""

    value: Any = None
    payload: bytes | None = None
    refs: tuple[str, ...] = ()
    objects: dict[str, bytes] = dataclasses.field(default_factory=dict)


def capture(obj: Any, actor_id: str = "") -> Captured:
    """The state of a virtual actor instance, ready to store."""
    cls = type(obj)
    if not has_own(cls, "__getstate__"):
        state = dict(vars(obj))
        try:
            json.dumps(state)
        except (TypeError, ValueError) as exc:
            raise ValueError(
                f"The state of virtual actor class {cls.__qualname__} (its __dict__) must "
                f"be JSON serializable ({exc}); define __getstate__ and __setstate__ to "
                "keep any picklable state instead."
            ) from exc
        return Captured(value=state)
    state = obj.__getstate__()
    try:
        json.dumps(state)
        return Captured(value=state)
    except (TypeError, ValueError):
        pass
    try:
        payload, refs = serialization.dumps(state)
    except serialization.ActorHandleError:
        raise
    except Exception as exc:
        raise ValueError(
            f"The state {cls.__qualname__}.__getstate__ returned cannot be pickled "
            f"({exc}); return a picklable value (or JSON)."
        ) from exc
    objects: dict[str, bytes] = {}
    store = serialization.ObjectStore(
        actor_objects_prefix(actor_id), objects.get, objects.__setitem__
    )
    return Captured(payload=payload, refs=tuple(store.save(refs)), objects=objects)


def restore(record: bytes, actor_id: str, storage_ref: Any, objects: dict[str, bytes]) -> Any:
    """The state in a stored state record (its ObjectRefs' values loaded again, from
    ``objects`` or else from the storage ``storage_ref`` names)."""
    if record[: len(serialization.MAGIC)] != serialization.MAGIC:
        return json.loads(record)["state"]
    header, payload = serialization.decode(record, f"the state of virtual actor {actor_id!r}")
    if not header["refs"]:
        return serialization.loads(payload, [])

    def read(key: str) -> bytes | None:
        if key in objects:
            return objects[key]
        return bridge.run(open_ref(storage_ref).get(key))

    store = serialization.ObjectStore(actor_objects_prefix(actor_id), read, objects.__setitem__)
    return serialization.loads(payload, [store.load_ref(k) for k in header["refs"]])


def has_own(cls: type, name: str) -> bool:
    """Whether ``cls`` defines ``name`` itself (``object`` has a ``__getstate__``)."""
    return getattr(cls, name, None) is not getattr(object, name, None)


def state_record(seq: int, captured: Captured) -> bytes:
    """The record stored as the state after call ``seq``."""
    if captured.payload is None:
        return json.dumps({"seq": seq, "state": captured.value}).encode()
    return serialization.encode("actor-state", captured.payload, list(captured.refs), seq=seq)


def is_envelope(record: bytes) -> bool:
    return record[: len(serialization.MAGIC)] == serialization.MAGIC


def seq_of(record: bytes, actor_id: str) -> int:
    if is_envelope(record):
        return int(serialization.peek_header(record, actor_id)["seq"])
    return int(json.loads(record)["seq"])


def reseq(record: bytes, seq: int, actor_id: str) -> bytes:
    """The same state record, as the state after call ``seq``."""
    if is_envelope(record):
        header, payload = serialization.decode(record, actor_id)
        return serialization.encode(header["kind"], payload, header["refs"], seq=seq)
    return json.dumps({"seq": seq, "state": json.loads(record)["state"]}).encode()


async def object_records(
    storage: Storage, record: bytes | None, actor_id: str
) -> dict[str, bytes] | None:
    """The object records a pickled state refers to, for a worker that cannot read the
    storage itself (``memory://``); None when it can, or there are none."""
    if record is None or storage.shared or not is_envelope(record):
        return None
    found: dict[str, bytes] = {}
    todo = list(serialization.peek_header(record, actor_id)["refs"])
    while todo:
        key = todo.pop()
        if key in found:
            continue
        data = await storage.get(key)
        if data is None:
            raise WorkflowNotFoundError(
                f"The state of virtual actor {actor_id!r} refers to object {key!r}, which "
                f"is missing from {storage.uri!r}.",
                workflow_id=actor_id,
            )
        found[key] = data
        todo.extend(serialization.peek_header(data, key)["refs"])
    return found


__all__ = [
    "Captured",
    "capture",
    "has_own",
    "is_envelope",
    "object_records",
    "reseq",
    "restore",
    "seq_of",
    "state_record",
]
