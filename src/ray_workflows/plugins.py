"""Plugin discovery: entry points read once, plugins imported only when used.

Three groups: ``ray_workflows.storage`` (URI scheme -> Storage class),
``ray_workflows.clocks`` (name -> clock class) and ``ray_workflows.listeners``
(name -> EventListener subclass). Built-in plugins are registered by this
distribution's own entry points, exactly as a third-party plugin would be.
"""

from __future__ import annotations

import functools
import importlib
import os
from importlib.metadata import entry_points
from typing import Any
from urllib.parse import urlsplit

STORAGE_GROUP = "ray_workflows.storage"
CLOCK_GROUP = "ray_workflows.clocks"
LISTENER_GROUP = "ray_workflows.listeners"

#: Plugins that ship with an optional extra: scheme/name -> what to install.
KNOWN_EXTRAS: dict[str, str] = {
    "s3": "pip install 'ray-workflows[s3]'",
    "http": "pip install 'ray-workflows[http]'",
}


@functools.cache
def _entry_points(group: str) -> dict[str, str]:
    return {ep.name: ep.value for ep in entry_points(group=group)}


def available(group: str) -> list[str]:
    """The names registered in an entry-point group, sorted."""
    return sorted(_entry_points(group))


def load(group: str, name: str) -> Any:
    """Import and return the object registered as ``name`` in ``group``.

    Raises ``LookupError`` naming the known names and, for a plugin that an
    extra provides, what to install.
    """
    target = _entry_points(group).get(name)
    if target is None:
        hint = f" It is provided by an extra: {KNOWN_EXTRAS[name]}." if name in KNOWN_EXTRAS else ""
        raise LookupError(
            f"No plugin {name!r} in entry-point group {group!r}; "
            f"known: {', '.join(available(group)) or 'none'}.{hint}"
        )
    module_name, _, attr = target.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        hint = KNOWN_EXTRAS.get(name, f"install the package that provides {module_name!r}")
        raise LookupError(
            f"Plugin {name!r} ({target}) could not be imported: {exc}. To use it: {hint}."
        ) from exc
    for part in attr.split(".") if attr else ():
        obj = getattr(obj, part)
    return obj


def storage_scheme(uri: str) -> str:
    """The scheme of a storage URI; a bare path means ``file``."""
    if uri.startswith("/") or uri.startswith("~") or uri.startswith("."):
        return "file"
    scheme = urlsplit(uri).scheme
    if len(scheme) == 1 and os.name == "nt":  # a Windows drive letter
        return "file"
    return scheme or "file"


__all__ = [
    "CLOCK_GROUP",
    "KNOWN_EXTRAS",
    "LISTENER_GROUP",
    "STORAGE_GROUP",
    "available",
    "load",
    "storage_scheme",
]
