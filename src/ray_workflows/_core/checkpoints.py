"""Stored outputs and objects as a Ray worker reads and writes them.

A task attempt reads and writes its workflow's objects through :func:`object_store`
(directly in a shared storage, else through the engine). The engine's helper tasks
load checkpointed outputs (:func:`load_output`, :func:`load_outputs`) and checkpoint
ObjectRef values (:func:`save_objects`); the executor submits them as Ray tasks.
"""

from __future__ import annotations

from typing import Any

from ray_workflows._core import bridge, serialization
from ray_workflows._core.store import objects_prefix, read_record
from ray_workflows.storage import Storage


def object_store(
    storage: Storage, workflow_id: str, writes: dict[str, bytes]
) -> serialization.ObjectStore:
    """Objects of one workflow, as a worker sees them: written directly to a shared
    storage, else collected in ``writes`` for the engine to store."""

    def read(key: str) -> bytes | None:
        if key in writes:
            return writes[key]
        return bridge.run(storage.get(key))

    def write(key: str, data: bytes) -> None:
        if storage.shared:
            bridge.run(storage.put_if_absent(key, data))
        else:
            writes[key] = data

    return serialization.ObjectStore(objects_prefix(workflow_id), read, write)


def load_output(
    storage: Storage,
    workflow_id: str,
    records: dict[str, bytes] | None,
    key: str,
    packs: dict[str, dict[str, bytes]] | None = None,
) -> Any:
    """Read a task's checkpointed output (a helper task). For a storage only the engine
    can read, ``records`` holds the output record and the object records it refers to.
    ``packs`` caches decoded packs across the calls of one :func:`load_outputs`."""
    writes: dict[str, bytes] = {}

    def read(name: str) -> bytes | None:
        if records is not None:
            return records.get(name)
        return bridge.run(storage.get(name))

    data = read(key) if records is not None else read_record(read, key, packs)
    if data is None:
        from ray_workflows.exceptions import CheckpointError

        raise CheckpointError(f"Checkpoint {key!r} is missing from {storage.uri}.", key=key)
    header, payload = serialization.decode(data, key)
    objects = serialization.ObjectStore(objects_prefix(workflow_id), read, writes.__setitem__)
    return serialization.loads(payload, [objects.load_ref(k) for k in header["refs"]])


def load_outputs(
    storage: Storage, workflow_id: str, records: dict[str, bytes] | None, keys: list[str]
) -> tuple[Any, ...]:
    """Several :func:`load_output` in one helper task, one return value each (a pack
    holding many of them is read once)."""
    packs: dict[str, dict[str, bytes]] = {}
    return tuple(load_output(storage, workflow_id, records, key, packs) for key in keys)


def save_objects(
    storage: Storage, workflow_id: str, refs: list[Any]
) -> tuple[list[str], dict[str, bytes]]:
    """Checkpoint ObjectRef values (a helper task); return their keys, and the records
    the engine must write itself when the storage is not shared."""
    writes: dict[str, bytes] = {}
    return object_store(storage, workflow_id, writes).save(refs), writes


__all__ = ["load_output", "load_outputs", "object_store", "save_objects"]
