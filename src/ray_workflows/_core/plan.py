"""The plan: the tasks the engine schedules, as compiled from a Ray DAG by
:func:`ray_workflows._core.compiler.compile_dag`.

A :class:`Plan` holds no live user objects the engine must understand: each
task's function and arguments are pickled by the compiler, once, in the process
that built the DAG (the driver, or the worker that returned a continuation). The
engine only reads task ids, dependencies and options, so it never imports user
code.

Arguments keep Ray's semantics: an upstream node or ObjectRef passed directly
as an argument arrives as its value; one nested in a list or dict arrives as
an ``ObjectRef``. This holds for fresh runs and after recovery alike.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ray_workflows._core.ids import IdAllocator
from ray_workflows._core.options import TaskOptions


@dataclasses.dataclass(frozen=True)
class Up:
    """Placeholder for an upstream task's output, directly in a task's arguments."""

    index: int


@dataclasses.dataclass(frozen=True)
class Deref:
    """An ObjectRef passed directly as an argument: the task receives its value."""

    ref: Any


@dataclasses.dataclass
class TaskSpec:
    task_id: str
    base: str  # the name repeats are numbered from
    name: str  # the function's qualified name, for logs
    func_key: str
    args: bytes  # pickled (args, kwargs) with Up/("up", i) placeholders, refs out of band
    arg_refs: list[Any]  # live ObjectRefs, or storage keys once checkpointed
    upstream: list[str]  # de-duplicated upstream task ids, first-use order
    direct: list[bool]  # per upstream: passed directly (needs the value)
    nested: list[bool]  # per upstream: nested in a container (needs an ObjectRef)
    options: TaskOptions
    creator: str = ""  # the task whose continuation created this one ("" at top level)
    kind: str = "function"
    arg_keys: list[str] | None = None  # storage keys of arg_refs' values, once checkpointed

    @property
    def checkpoint(self) -> bool:
        return self.options.checkpoint is not False

    @property
    def catch_exceptions(self) -> bool:
        return bool(self.options.catch_exceptions)


@dataclasses.dataclass
class TaskHandle:
    """A task of the running workflow, by id: what ``workflow.wait`` returns for the
    tasks that are not ready yet. Pass it to ``workflow.wait`` (or bind it as an
    argument) in a continuation to use that same task, not a new run of it."""

    __slots__ = ("task_id",)

    def __init__(self, task_id: str) -> None:
        self.task_id = task_id

    def __reduce__(self) -> Any:
        return (TaskHandle, (self.task_id,))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TaskHandle) and other.task_id == self.task_id

    def __hash__(self) -> int:
        return hash(("TaskHandle", self.task_id))

    def __repr__(self) -> str:
        return f"TaskHandle({self.task_id!r})"


#: Marks an upstream id that names a task of the running workflow (a TaskHandle),
#: not a task of the plan being compiled. Task ids never contain control characters.
EXTERNAL = "\x1e"


@dataclasses.dataclass
class Plan:
    tasks: dict[str, TaskSpec]  # topological: every task after its upstream tasks
    output_task_id: str
    functions: dict[str, bytes]
    counters: dict[str, int] = dataclasses.field(default_factory=dict)  # id allocator state
    # The runtime_env recorded at submission (ray_workflows._core.environment); only
    # the entry plan has one.
    environment: dict[str, Any] | None = None

    def renamed(self, allocator: IdAllocator, creator: str) -> Plan:
        """The same plan with ids from the workflow's allocator (continuations are
        compiled in a worker with local ids; the engine gives them their final ids)."""
        mapping: dict[str, str] = {}
        tasks: dict[str, TaskSpec] = {}
        for local_id, spec in self.tasks.items():
            new_id = allocator.allocate(spec.base)
            mapping[local_id] = new_id
            tasks[new_id] = dataclasses.replace(
                spec,
                task_id=new_id,
                upstream=[u[1:] if u[0] == EXTERNAL else mapping[u] for u in spec.upstream],
                creator=creator,
            )
        return Plan(tasks, mapping[self.output_task_id], self.functions)


__all__ = ["EXTERNAL", "Deref", "Plan", "TaskHandle", "TaskSpec", "Up"]
