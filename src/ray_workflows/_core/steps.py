"""The older step API (Ray 1.x): ``@workflow.step``, ``fn.step(...)``, ``.run()``.

::

    @workflow.step
    def add(a: int, b: int) -> int:
        return a + b

    assert add.step(1, add.step(2, 3)).run(workflow_id="sum") == 6

A step call builds exactly the DAG node that ``ray.remote(fn).bind(...)`` builds, so
steps and ``@ray.remote`` tasks run on one engine with one set of semantics:
checkpoints, retries, ``catch_exceptions``, and dynamic workflows (a step that
returns ``other.step(...)`` continues as that step). Steps and ``.bind()`` nodes mix
freely as arguments. Options go to ``@workflow.step(...)`` or ``fn.options(...)``:
the workflow options of :func:`ray_workflows._core.options` (``name``, ``max_retries``,
``catch_exceptions``, ``checkpoint``, ``metadata``, ...) and Ray's own
(``num_cpus``, ``num_gpus``, ``resources``, ...).

Retries follow Ray 1.x: a step that raises is retried up to ``max_retries`` times
(default 3), where a ``.bind()`` task retries its exceptions only with
``retry_exceptions``. ``retry_exceptions=False`` (or a list of classes) narrows it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import ray
from ray.dag import FunctionNode

from ray_workflows._core.options import WORKFLOW_OPTIONS
from ray_workflows._core.options import options as workflow_options


class StepNode(FunctionNode):
    """``fn.step(...)``: a task of a workflow, which can run itself as one."""

    def run(self, workflow_id: str | None = None, metadata: dict[str, Any] | None = None) -> Any:
        """Run the workflow that ends in this step; return its output."""
        from ray_workflows import api

        return api.run(self, workflow_id=workflow_id, metadata=metadata)

    def run_async(
        self, workflow_id: str | None = None, metadata: dict[str, Any] | None = None
    ) -> ray.ObjectRef[Any]:
        """Start the workflow that ends in this step; return an ObjectRef of its output."""
        from ray_workflows import api

        return api.run_async(self, workflow_id=workflow_id, metadata=metadata)


class StepFunction:
    """A function decorated with ``@workflow.step``; ``.step(...)`` makes a step of it."""

    def __init__(self, func: Callable[..., Any], step_options: dict[str, Any]) -> None:
        if not callable(func):
            raise TypeError(f"@workflow.step decorates a function, got {func!r}")
        self._func = func
        self._options = dict(step_options)
        workflow = {k: v for k, v in step_options.items() if k in WORKFLOW_OPTIONS}
        ray_options = {k: v for k, v in step_options.items() if k not in WORKFLOW_OPTIONS}
        # Ray 1.x's rule for steps: max_retries retries the step's own exceptions too.
        # (A .bind() task keeps Ray 2's rule: only with retry_exceptions.)
        workflow.setdefault("retry_exceptions", True)
        # Ray checks its own options here, at decoration, naming any it does not know.
        self._remote = ray.remote(func).options(**ray_options, **workflow_options(**workflow))
        functools.update_wrapper(self, func)

    def options(self, **step_options: Any) -> StepFunction:
        """The same step with these options added (``name``, ``max_retries``, ...)."""
        return StepFunction(self._func, {**self._options, **step_options})

    def step(self, *args: Any, **kwargs: Any) -> StepNode:
        """A step of this function; arguments may be other steps (their outputs)."""
        node = self._remote.bind(*args, **kwargs)
        node.__class__ = StepNode  # a FunctionNode that also has run()/run_async()
        result: StepNode = node
        return result

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Call the plain function (no workflow, no checkpoint)."""
        return self._func(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<workflow step {getattr(self._func, '__qualname__', self._func)!r}>"


def step(func: Callable[..., Any] | None = None, **step_options: Any) -> Any:
    """Make a function a workflow step: ``@workflow.step`` or ``@workflow.step(...)``
    with workflow options (``name``, ``max_retries``, ``catch_exceptions``, ...) and
    Ray options (``num_cpus``, ``num_gpus``, ``resources``, ...).

    >>> @workflow.step(max_retries=5)
    ... def fetch(url): ...
    >>> fetch.step("https://example.com").run(workflow_id="fetch-1")
    """
    if func is not None:
        if step_options:
            raise TypeError("use @workflow.step or @workflow.step(**options), not both")
        return StepFunction(func, {})
    return lambda f: StepFunction(f, step_options)


__all__ = ["StepFunction", "StepNode", "step"]
