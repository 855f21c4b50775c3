"""The fault matrix's table: each row a fault caused against one storage, with what it
cost. Test modules append rows; conftest prints them at the end of the session, and
``RWF_FAULT_TABLE=path`` also writes them there as JSON lines (for docs/faults.md)."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path


@dataclasses.dataclass
class Row:
    fault: str
    storage: str
    workflows: int
    finished_tasks: int  # durable when the fault hit
    reruns: int  # of those, runs beyond the first
    lost: int  # workflows that did not end SUCCESSFUL with the right output
    in_flight_reruns: int  # runs again of tasks caught in flight (allowed)
    seconds: float


ROWS: list[Row] = []

_HEADER = (
    "fault",
    "storage",
    "workflows",
    "finished tasks",
    "re-runs of a finished task",
    "workflows lost",
    "in-flight tasks run again",
    "seconds",
)


def add(row: Row) -> None:
    ROWS.append(row)
    target = os.environ.get("RWF_FAULT_TABLE")
    if target:
        with Path(target).open("a") as handle:
            handle.write(json.dumps(dataclasses.asdict(row)) + "\n")


def render(rows: list[Row]) -> str:
    """A Markdown table of ``rows``."""
    lines = ["| " + " | ".join(_HEADER) + " |", "|" + "---|" * len(_HEADER)]
    for r in rows:
        cells = (
            r.fault,
            r.storage,
            r.workflows,
            r.finished_tasks,
            r.reruns,
            r.lost,
            r.in_flight_reruns,
            f"{r.seconds:.0f}" if r.seconds else "-",
        )
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def durable_tasks(uri: str, wid: str) -> set[str]:
    """The task ids of ``wid`` whose outputs are in storage ``uri`` now (in packs or in
    records of their own; a torn pack holds nothing)."""
    from ray_workflows._core import bridge, config
    from ray_workflows._core.records import decode_pack
    from ray_workflows.storage import open_storage

    store = open_storage(config.normalise_storage(uri))

    async def read() -> set[str]:
        found: set[str] = set()
        for key in await store.list(f"workflows/{wid}/tasks/"):
            name = key.rsplit("/", 1)[-1]
            if name.endswith(".out"):
                found.add(name[: -len(".out")])
            elif name.endswith(".pack"):
                data = await store.get(key)
                try:
                    found |= set(decode_pack(data or b"", key))
                except Exception:  # noqa: BLE001 - torn
                    pass
        return found

    return bridge.run(read())


def count(
    fault: str,
    storage: str,
    runs: Path,
    durable_at_fault: dict[str, set[str]],
    succeeded: dict[str, bool],
    tasks: tuple[str, ...],
    seconds: float,
) -> Row:
    """The row of one fault: ``succeeded[wid]`` says whether workflow ``wid`` ended
    SUCCESSFUL with the right output; runs are counted from ``runs`` (one file per
    start, named ``<wid>.<task>.start.*``)."""
    finished = reruns = in_flight = 0
    names = [p.name for p in runs.iterdir()]
    for wid in succeeded:
        for tid in tasks:
            starts = sum(1 for n in names if n.startswith(f"{wid}.{tid}.start."))
            if tid in durable_at_fault.get(wid, set()):
                finished += 1
                reruns += starts - 1
            else:
                in_flight += max(starts - 1, 0)
    lost = sum(1 for ok in succeeded.values() if not ok)
    row = Row(fault, storage, len(succeeded), finished, reruns, lost, in_flight, seconds)
    add(row)
    return row
