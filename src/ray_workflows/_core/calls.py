"""What one attempt's Ray task is given: its inputs (values, or the refs of inputs
not finished yet for a task submitted ahead), its header, and its function; for a
fused pair, both attempts' (:mod:`ray_workflows._core.placement`)."""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import Any

from ray_workflows._core.graph import TaskGraph
from ray_workflows._core.plan import TaskSpec
from ray_workflows._core.wire import Attempt, task_header
from ray_workflows.storage import Storage

_PRODUCED = object()  # the input a fused consumer gets from its producer


class Calls:
    """Builds the calls of one workflow's attempts. ``inflight`` maps a task to the
    output ref of its attempt under way (by the task whose output it will be); a
    header is made again after ``headers`` is cleared (a new lease epoch)."""

    def __init__(
        self,
        workflow_id: str,
        storage: Storage,
        graph: TaskGraph,
        funcs: dict[str, Any],
        attempts: collections.Counter[str],
        inflight: dict[str, tuple[Any, Any]],
        epoch: Callable[[], int],
    ) -> None:
        self.workflow_id = workflow_id
        self.storage = storage
        self.graph = graph
        self.funcs = funcs
        self.attempts = attempts
        self.inflight = inflight
        self.headers: dict[str, bytes] = {}  # pickled once per task, for every attempt
        self.epoch = epoch  # the lease epoch their records are written under, now

    def inputs(
        self, tid: str, spec: TaskSpec, produced: str | None = None
    ) -> tuple[list[Any], bytes, Any, dict[str, Any] | None]:
        """What a submission of ``tid`` is given: its direct input refs, its header, its
        live and nested refs, and the refs of inputs not finished yet (submitted ahead).
        The input ``produced`` (by the task it is fused with) is :data:`_PRODUCED`."""
        direct_values: list[Any] = []
        slots: list[int | None] = []
        nested: list[Any] | None = None
        ahead: dict[str, Any] | None = None
        pending = self.graph.waiting.get(tid)
        for i, (u, is_direct, is_nested) in enumerate(
            zip(spec.upstream, spec.direct, spec.nested, strict=True)
        ):
            if u == produced:
                ref: Any = _PRODUCED
            elif pending and u in pending:
                ref = self.inflight[u][0]
                ahead = ahead or {}
                ahead[u] = ref
            else:
                ref = self.graph.value_ref(u)
            slots.append(len(direct_values) if is_direct else None)
            if is_direct:
                direct_values.append(ref)
            if is_nested:
                nested = nested or [None] * len(spec.upstream)
                nested[i] = ref
        header = self.headers.get(tid)
        if header is None:
            header = self.headers[tid] = task_header(
                self.workflow_id, self.storage, spec, slots, self.epoch()
            )
        live = None if all(isinstance(r, str) for r in spec.arg_refs) else spec.arg_refs
        refs = None if live is None and nested is None else (live, nested)
        return direct_values, header, refs, ahead

    def call(
        self,
        tid: str,
        spec: TaskSpec,
        then: str | None,
        values: list[Any],
        header: bytes,
        refs: Any,
    ) -> tuple[str, tuple[Attempt, ...], tuple[Any, ...], int, int]:
        """The Ray task's name, the attempts it runs (``tid``'s, then its fused
        consumer ``then``'s), their input values, and for a pair where the consumer's
        values start and which of them is the producer's output."""
        first = Attempt(header, self.attempts[tid], self.funcs[spec.func_key], refs)
        if then is None:
            return spec.name, (first,), tuple(values), 0, 0
        then_spec = self.graph.specs[then]
        then_values, then_header, then_refs, _ = self.inputs(
            then, then_spec, self.graph.target(tid)
        )
        slot = next(i for i, v in enumerate(then_values) if v is _PRODUCED)
        then_values[slot] = None
        second = Attempt(
            then_header, self.attempts[then], self.funcs[then_spec.func_key], then_refs
        )
        name = f"{spec.name}+{then_spec.name}"
        return name, (first, second), (*values, *then_values), len(values), slot


__all__ = ["Calls"]
