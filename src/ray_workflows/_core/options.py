"""Workflow task options, carried through Ray's own option machinery.

Current Ray rejects unknown task options (``_metadata`` included), so
``workflow.options(...)`` rides in ``_labels``, a task option Ray accepts as a
free-form dict: the mapping is ``{"_labels": {LABEL_KEY: "<json>"}}``. The engine
reads it back from the DAG node and strips it before submitting the Ray task, so
Ray never sees it. This keeps both documented forms working unchanged::

    f.options(**workflow.options(catch_exceptions=True)).bind()

    @workflow.options(checkpoint=False)
    @ray.remote
    def g(): ...
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from collections.abc import Iterator, Mapping
from typing import Any

from ray import cloudpickle

LABEL_KEY = "ray-workflows.io/options"

#: Options only the workflow engine understands, with what each means.
WORKFLOW_OPTIONS: dict[str, str] = {
    "task_id": "the task's id in the workflow (repeats get _1, _2, ...)",
    "name": "same as task_id (the older API's name)",
    "metadata": "a JSON-serializable dict stored with the task",
    "catch_exceptions": "return (value, None) or (None, exception) instead of failing",
    "checkpoint": "persist the task's output (default True, inherited by continuations)",
    "max_retries": "attempts after the first (default 3; -1 for unlimited)",
    "retry_exceptions": "True, or a list of exception classes, to retry application errors",
    "allow_inplace": "run a continuation task inside the worker that returned it",
}

# Ray options the engine owns: the underlying Ray task always runs with Ray's
# own retries off, because the engine retries (and checkpoints) instead.
_ENGINE_RAY_OPTIONS = ("max_retries", "retry_exceptions", "_labels", "num_returns")


def check_metadata(metadata: object, what: str = "metadata") -> dict[str, Any]:
    """Validate user metadata: a dict that survives JSON; return a JSON-normalised copy."""
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise ValueError(f"{what} must be a dict, got {type(metadata).__name__}: {metadata!r}")
    try:
        normalised: dict[str, Any] = json.loads(json.dumps(metadata))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} must be JSON serializable: {exc}") from exc
    return normalised


# retry_exceptions classes named in workflow.options(...): the JSON label carries a
# token, and the classes stay in this process (the one that builds the DAG), where
# classes defined in __main__ or inside a function exist.
_CLASSES: dict[str, tuple[type[BaseException], ...]] = {}


def _exception_option(value: object) -> bool | dict[str, Any]:
    """``retry_exceptions`` for the JSON label: a bool, or a token plus names."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (list, tuple)) and all(
        isinstance(cls, type) and issubclass(cls, BaseException) for cls in value
    ):
        token = uuid.uuid4().hex
        _CLASSES[token] = tuple(value)
        return {"token": token, "names": [_class_name(c) for c in value]}
    raise ValueError(
        f"retry_exceptions must be a bool or a list of exception classes, got {value!r}"
    )


def _class_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _exception_classes(value: object) -> bool | tuple[type[BaseException], ...]:
    """The classes behind a ``retry_exceptions`` value from the label or from Ray."""
    if isinstance(value, dict):
        classes = _CLASSES.get(value["token"])
        if classes is None:
            raise ValueError(
                "retry_exceptions classes given to workflow.options(...) are only known in "
                "the process that called it; build the DAG in that process."
            )
        return classes
    if isinstance(value, bool) or value is None:
        return bool(value)
    if isinstance(value, (list, tuple)):
        return tuple(value)
    raise ValueError(f"retry_exceptions must be a bool or exception classes, got {value!r}")


class WorkflowOptions(Mapping[str, Any]):
    """The value of ``workflow.options(...)``: a mapping for ``.options(**...)`` and a
    decorator for remote functions.

    >>> f.options(**workflow.options(task_id="fetch", max_retries=5)).bind()
    """

    def __init__(self, **options: Any) -> None:
        unknown = sorted(set(options) - set(WORKFLOW_OPTIONS))
        if unknown:
            raise ValueError(
                f"Invalid option keywords {unknown} for workflow tasks. Valid ones are "
                f"{sorted(WORKFLOW_OPTIONS)}; Ray's own options (num_cpus, num_gpus, "
                "resources, ...) go to fn.options(...) directly."
            )
        if "name" in options:
            name = options.pop("name")
            options.setdefault("task_id", name)
        if "task_id" in options:
            from ray_workflows._core.ids import check_id

            options["task_id"] = check_id(options["task_id"], "task_id")
        if "metadata" in options:
            options["metadata"] = check_metadata(options["metadata"], "task metadata")
        for flag in ("catch_exceptions", "checkpoint", "allow_inplace"):
            if flag in options and not isinstance(options[flag], bool):
                raise ValueError(f"{flag} must be True or False, got {options[flag]!r}")
        if "max_retries" in options:
            retries = options["max_retries"]
            if not isinstance(retries, int) or isinstance(retries, bool) or retries < -1:
                raise ValueError(f"max_retries must be an int >= -1, got {retries!r}")
        if "retry_exceptions" in options:
            options["retry_exceptions"] = _exception_option(options["retry_exceptions"])
        self._options = options
        self._mapping = {"_labels": {LABEL_KEY: json.dumps(options, sort_keys=True)}}

    @property
    def options(self) -> dict[str, Any]:
        return dict(self._options)

    def __getitem__(self, key: str) -> Any:
        return self._mapping[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._mapping)

    def __len__(self) -> int:
        return len(self._mapping)

    def __repr__(self) -> str:
        return f"workflow.options({', '.join(f'{k}={v!r}' for k, v in self._options.items())})"

    def __call__(self, remote_function: Any) -> Any:
        """Decorate a Ray remote function: its default options gain these workflow options."""
        from ray.remote_function import RemoteFunction

        if not isinstance(remote_function, RemoteFunction):
            raise ValueError(
                "Apply @workflow.options(...) to a Ray remote function: put it above "
                f"@ray.remote. Got {remote_function!r}."
            )
        labels = dict(remote_function._default_options.get("_labels") or {})
        labels.update(self._mapping["_labels"])
        remote_function._default_options["_labels"] = labels
        return remote_function


def options(**kwargs: Any) -> WorkflowOptions:
    """Workflow options for a task; see :data:`WORKFLOW_OPTIONS` for the keys."""
    return WorkflowOptions(**kwargs)


@dataclasses.dataclass(frozen=True)
class TaskOptions:
    """The resolved options of one task, as the engine uses and stores them."""

    max_retries: int = 3
    retry_exceptions: bool | list[str] = False  # True, or the names of the classes
    # The classes themselves, cloudpickled: only the worker unpickles them, so the engine
    # never needs the user's exception classes.
    retry_classes: bytes | None = None
    catch_exceptions: bool | None = None
    checkpoint: bool | None = None
    allow_inplace: bool = False
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)
    ray_options: dict[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_ray_options(cls, ray_options: Mapping[str, Any]) -> tuple[TaskOptions, str | None]:
        """Split a DAG node's Ray options into (TaskOptions, explicit task id)."""
        labels = dict(ray_options.get("_labels") or {})
        encoded = labels.pop(LABEL_KEY, None)
        wf: dict[str, Any] = json.loads(encoded) if encoded else {}
        plain = {k: v for k, v in ray_options.items() if k not in _ENGINE_RAY_OPTIONS}
        if labels:
            plain["_labels"] = labels
        if isinstance(plain.get("runtime_env"), dict):
            # Ray's RuntimeEnv (a dict subclass) as a plain dict: it is recorded with the
            # workflow and shown by get_metadata (see ray_workflows._core.environment).
            # Ray's own keys ("_ray_commit") describe the Ray that built the DAG only.
            env = _plain(plain["runtime_env"])
            plain["runtime_env"] = {k: v for k, v in env.items() if not k.startswith("_")}
        if ray_options.get("num_returns", 1) not in (1, None):
            raise ValueError("A workflow task can only have one return value (num_returns=1).")
        max_retries = wf.get("max_retries", ray_options.get("max_retries", 3))
        retry = _exception_classes(
            wf.get("retry_exceptions", ray_options.get("retry_exceptions", False))
        )
        opts = cls(
            max_retries=3 if max_retries is None else int(max_retries),
            retry_exceptions=retry if isinstance(retry, bool) else [_class_name(c) for c in retry],
            retry_classes=None if isinstance(retry, bool) else cloudpickle.dumps(retry),
            catch_exceptions=wf.get("catch_exceptions"),
            checkpoint=wf.get("checkpoint"),
            allow_inplace=bool(wf.get("allow_inplace", False)),
            metadata=wf.get("metadata", {}),
            ray_options=plain,
        )
        return opts, wf.get("task_id")

    def retryable(self, exc: BaseException) -> bool:
        """Whether an application error ``exc`` may be retried (in the worker)."""
        if self.retry_exceptions is True:
            return True
        if self.retry_classes is None:
            return False
        classes: tuple[type[BaseException], ...] = cloudpickle.loads(self.retry_classes)
        return isinstance(exc, classes)

    def to_json(self) -> dict[str, Any]:
        """A JSON-safe view for ``get_metadata``."""
        data = dataclasses.asdict(self)
        data.pop("retry_classes")
        data["ray_options"] = {k: _json_safe(v) for k, v in self.ray_options.items()}
        data.pop("metadata")
        return data


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _json_safe(value: Any) -> Any:
    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError):
        return repr(value)


__all__ = [
    "LABEL_KEY",
    "WORKFLOW_OPTIONS",
    "TaskOptions",
    "WorkflowOptions",
    "check_metadata",
    "options",
]
