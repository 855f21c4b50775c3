"""Structured logging: structlog on top of the standard ``logging`` module.

The library never configures logging globally: its events go to the stdlib
logger ``ray_workflows`` (silent below WARNING unless the application turns it
up), rendered as ``event key=value ...`` with ``workflow_id``/``task_id`` bound.
"""

from __future__ import annotations

import logging
from typing import Any

import structlog

_processors: list[Any] = [
    # First: an event below the logger's level is dropped before anything renders it.
    structlog.stdlib.filter_by_level,
    structlog.processors.add_log_level,
    structlog.processors.format_exc_info,
    structlog.processors.KeyValueRenderer(key_order=["event"], drop_missing=True),
]


class _BoundLogger(structlog.stdlib.BoundLogger):
    # An event below the stdlib logger's level costs one cached level check, not the
    # bound-context copy and processor chain (events happen per workflow and task).
    def debug(self, event: str | None = None, *args: Any, **kw: Any) -> Any:
        if self._logger.isEnabledFor(logging.DEBUG):
            return self._proxy_to_logger("debug", event, *args, **kw)
        return None

    def info(self, event: str | None = None, *args: Any, **kw: Any) -> Any:
        if self._logger.isEnabledFor(logging.INFO):
            return self._proxy_to_logger("info", event, *args, **kw)
        return None


def get_logger(name: str = "ray_workflows", **bound: Any) -> Any:
    """A structlog logger writing to the stdlib logger ``name``."""
    return structlog.wrap_logger(
        logging.getLogger(name),
        processors=_processors,
        wrapper_class=_BoundLogger,
        **bound,
    )


__all__ = ["get_logger"]
