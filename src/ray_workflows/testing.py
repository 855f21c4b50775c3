"""The conformance suites for plugins: :class:`StorageConformance` checks every rule of
:class:`~ray_workflows.storage.Storage`, :class:`ListenerConformance` what every event
listener must do (its docstring shows how to use it).

A storage plugin author subclasses :class:`StorageConformance` in a test module and
provides a ``storage`` fixture that yields a fresh, empty storage::

    import pytest
    from ray_workflows.testing import StorageConformance

    class TestMyStorage(StorageConformance):
        @pytest.fixture
        async def storage(self, tmp_path):
            yield MyStorage(f"my://{tmp_path}")

The tests are ``async def`` and need pytest-asyncio in auto mode
(``asyncio_mode = "auto"``). For a ``shared`` backend the suite also races
processes that open the storage through the plugin registry by its URI, so the
plugin's entry point must be installed.
"""

from __future__ import annotations

from ray_workflows._core.conformance_listener import ListenerConformance
from ray_workflows._core.conformance_storage import INVALID_KEYS, StorageConformance
from ray_workflows._core.storage_races import chain_increments, increment, plain_writes

__all__ = [
    "INVALID_KEYS",
    "ListenerConformance",
    "StorageConformance",
    "chain_increments",
    "increment",
    "plain_writes",
]
