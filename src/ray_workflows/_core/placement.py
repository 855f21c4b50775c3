"""Placement: where and how a ready task runs. The runner decides *what* is ready; this
policy decides *how* it goes to Ray, and nothing else: every attempt, whatever its
placement, is retried, committed, cancelled and charged by the runner's one set of
rules (:mod:`ray_workflows._core.scheduler`).

The placements:

* **alone**: one attempt in a Ray task of its own, with the task's own Ray options.
* **fused**: a task's *only* consumer runs in the task's own Ray task, right after it
  (:meth:`Placement.fused_consumer`): one submission and one worker dispatch instead
  of two.
* **batched**: a quick task whose inputs all exist may wait a moment to share a Ray
  task with other quick ones while the CPUs are busy (:meth:`Placement.batchable`;
  the executor forms the batches).
* **ahead**: a consumer is submitted before its inputs exist, passed the refs of their
  outputs (:meth:`Placement.ahead`); Ray starts it the moment they do. Not ahead of
  a task whose function returned a continuation last time: that task's Ray value is
  not its output, and the consumer would run for nothing.
* **in place**: for a runner hosted in a Ray task (:mod:`ray_workflows._core.host`), a task
  with Ray's default options runs in the host's own process, without a Ray task of
  its own (:meth:`Placement.in_place`); the others there go to Ray as above.

A task whose shared Ray task (a pair, a batch) died is placed alone from then on, so
that the next death is charged to the task that died (``GraphView.alone``).
The driver's settings turn placements off (``submit_ahead``, ``fuse`` and ``batch``
of :class:`~ray_workflows._core.settings.Settings`: ``RAY_WORKFLOWS_SUBMIT_AHEAD=0``,
``RAY_WORKFLOWS_FUSE=0`` and ``RAY_WORKFLOWS_BATCH=0`` in the driver).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

from ray_workflows._core.plan import TaskSpec
from ray_workflows._core.settings import Settings


class GraphView(Protocol):
    """What the policy reads of a run's task graph (a :class:`TaskGraph`)."""

    @property
    def specs(self) -> Mapping[str, TaskSpec]: ...  # tasks not finished yet
    @property
    def waiting(self) -> Mapping[str, set[str]]: ...  # task -> inputs not finished yet
    @property
    def consumers(self) -> Mapping[str, list[str]]: ...  # output -> tasks waiting for it
    @property
    def root_of(self) -> Mapping[str, str]: ...  # continuation output -> its task


class AttemptsView(Protocol):
    """What the policy reads of a run's attempts (its :class:`Dispatch`)."""

    @property
    def running(self) -> Mapping[str, Any]: ...  # tasks with an attempt under way
    @property
    def inflight(self) -> Mapping[str, Any]: ...  # output -> the attempt making it
    @property
    def alone(self) -> set[str]: ...  # tasks whose shared Ray task died


class Placement:
    """The placement policy of one workflow's run; ``quick(func_key)`` says whether a
    function's last attempt ran quickly (``Executor.quick``), ``continues(func_key)``
    whether it returned a continuation (``Executor.continues``); ``settings`` says which
    placements are on (the executor's, as the run starts)."""

    def __init__(
        self,
        graph: GraphView,
        attempts: AttemptsView,
        quick: Callable[[str], bool],
        continues: Callable[[str], bool],
        settings: Settings,
        *,
        here: bool,
    ) -> None:
        self.graph = graph
        self.attempts = attempts
        self.quick = quick
        self.continues = continues
        # A hosted runner runs tasks in place, one after another: nothing to submit
        # ahead, fuse or batch.
        self.here = here
        self.submit_ahead = settings.submit_ahead and not here
        # Fusing submits the consumer with its producer: it needs submitting ahead.
        self.fuse = settings.fuse and self.submit_ahead
        self.batching = settings.batch and not here
        self._indirect: dict[str, frozenset[str]] = {}  # inputs a task needs as refs

    def ahead(self, tid: str) -> bool:
        """Whether ``tid`` can be submitted before its unfinished inputs exist: each of
        them is being computed by a Ray task and passed to ``tid`` as a plain argument
        (Ray then holds ``tid`` back until it exists; a nested ref would reach the user
        code unresolved)."""
        graph = self.graph
        spec = graph.specs.get(tid)
        pending = graph.waiting.get(tid)
        if (
            not self.submit_ahead
            or spec is None
            or not pending
            or tid in self.attempts.running
            or spec.kind != "function"
        ):
            return False
        indirect = self._indirect.get(tid)
        if indirect is None:
            indirect = self._indirect[tid] = frozenset(
                u
                for u, is_direct, is_nested in zip(
                    spec.upstream, spec.direct, spec.nested, strict=True
                )
                if is_nested or not is_direct
            )
        inflight, specs = self.attempts.inflight, graph.specs
        # An input whose function returned a continuation last time will likely do so
        # again: its Ray task's value is not the input's output, and a task submitted
        # ahead of it would run for nothing.
        return all(
            u in inflight
            and u not in indirect
            and (u not in specs or not self.continues(specs[u].func_key))
            for u in pending
        )

    def batchable(self, tid: str, spec: TaskSpec, ahead: bool) -> bool:
        """Whether ``tid`` may wait a moment to share a Ray task with others (see
        ``Executor.offer``): its inputs all exist, it has Ray's default options, its
        function ran quickly last time, and no shared Ray task of it died."""
        return (
            self.batching
            and not ahead
            and not spec.options.ray_options
            and tid not in self.attempts.alone
            and self.quick(spec.func_key)
        )

    def fused_consumer(self, tid: str, spec: TaskSpec) -> str | None:
        """The consumer to run in ``tid``'s own Ray task, if there is one: ``tid``'s only
        consumer, a function task with the same Ray options whose function ran quickly
        last time, for which ``tid``'s output is the last input missing and a plain
        (direct, not nested) argument. It could not start before ``tid`` ends anyway,
        and one Ray task costs half of two. The price: ``tid``'s output comes back with
        the consumer's receipt, so it is saved once the consumer ends, or by the worker
        itself if the consumer runs longer than ``worker.FUSED_FLUSH_SECONDS``."""
        graph = self.graph
        if not self.fuse or tid in self.attempts.alone or self.continues(spec.func_key):
            return None
        produced = graph.root_of.get(tid, tid)
        consumers = graph.consumers.get(produced)
        if consumers is None or len(consumers) != 1:
            return None
        then = consumers[0]
        then_spec = graph.specs.get(then)
        if (
            then_spec is None
            or then_spec.kind != "function"
            or then in self.attempts.running
            or then in self.attempts.alone
            or graph.waiting.get(then) != {produced}
            or then_spec.options.ray_options != spec.options.ray_options
            or not self.quick(then_spec.func_key)
        ):
            return None
        i = then_spec.upstream.index(produced)
        if not then_spec.direct[i] or then_spec.nested[i]:
            return None
        return then

    def in_place(self, spec: TaskSpec) -> bool:
        """Whether ``spec`` runs in this process (a hosted runner's task with Ray's
        default options, that takes no input as a nested ObjectRef)."""
        return (
            self.here
            and spec.kind == "function"
            and not spec.options.ray_options
            and not any(spec.nested)
        )

    def forget(self, tid: str) -> None:
        """``tid`` is finished: nothing about it is kept."""
        self._indirect.pop(tid, None)


__all__ = ["AttemptsView", "GraphView", "Placement"]
