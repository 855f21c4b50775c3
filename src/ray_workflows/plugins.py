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
import threading
from importlib.metadata import entry_points
from typing import Any
from urllib.parse import urlsplit

from ray_workflows.exceptions import UnknownStorageError
from ray_workflows.storage import Storage

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


# Reentrant: a wrapper plugin (e.g. faulty://) opens its inner storage while being opened.
_open_lock = threading.RLock()
_opened: dict[str, Storage] = {}


def open_storage(uri: str) -> Storage:
    """Return the storage for ``uri``, one shared instance per URI in a process."""
    if not isinstance(uri, str) or not uri.strip():
        raise UnknownStorageError(
            f"storage must be a URI such as '/path', 'file:///path', 'memory://' or "
            f"'s3://bucket/prefix', got {uri!r}"
        )
    with _open_lock:
        storage = _opened.get(uri)
        if storage is None:
            storage = _open_new(uri)
            _opened[uri] = storage
        return storage


def _open_new(uri: str) -> Storage:
    scheme = storage_scheme(uri)
    try:
        cls = load(STORAGE_GROUP, scheme)
    except LookupError as exc:
        raise UnknownStorageError(
            f"Unknown storage scheme {scheme!r} in {uri!r}. {exc}", uri=uri, scheme=scheme
        ) from None
    if not (isinstance(cls, type) and issubclass(cls, Storage)):
        raise UnknownStorageError(
            f"Plugin {scheme!r} is {cls!r}, not a ray_workflows.storage.Storage subclass.",
            uri=uri,
            scheme=scheme,
        )
    storage: Storage = cls(uri)
    return storage


def forget_storage(uri: str) -> None:
    """Drop the cached instance for ``uri`` (tests, and after ``close``)."""
    with _open_lock:
        _opened.pop(uri, None)


__all__ = [
    "CLOCK_GROUP",
    "KNOWN_EXTRAS",
    "LISTENER_GROUP",
    "STORAGE_GROUP",
    "available",
    "forget_storage",
    "load",
    "open_storage",
    "storage_scheme",
]
