"""Settings: built once in the driver (explicit arguments, else its environment, else
defaults) and passed to the manager, which reads no knob from its own environment."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import ray
from conftest import kill_manager

import ray_workflows as workflow
from ray_workflows._core import bridge, config
from ray_workflows._core.settings import ENV, Settings, build

# Knobs set below only in this (the driver's) process, after Ray started: the manager
# and other workers were started with an environment that lacks them.
DRIVER_ONLY = {
    "RAY_WORKFLOWS_LEASE_TTL": "7.25",
    "RAY_WORKFLOWS_BATCH": "0",
    "RAY_WORKFLOWS_TASK_EVENTS": "1",
}


def _inside(manager: Any) -> dict[str, Any]:
    """Run in the manager actor's process (``__ray_call__``): what it has."""
    engine = manager.engine
    return {
        "env": {name: os.environ.get(name) for name in DRIVER_ONLY},
        "executor": engine.executor.settings,
        "ttl": engine.leases.ttl,
    }


def test_a_knob_set_only_in_the_driver_reaches_the_manager(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in DRIVER_ONLY.items():
        monkeypatch.setenv(name, value)
    uri = str(tmp_path / "storage")
    workflow.init(uri, max_running_workflows=3)
    try:
        handle = bridge.run(config.manager())
        inside = ray.get(handle.__ray_call__.remote(_inside))
        assert inside["env"] == dict.fromkeys(DRIVER_ONLY)  # not in the manager's process
        assert inside["ttl"] == 7.25
        assert not inside["executor"].batch and inside["executor"].task_events
        described = ray.get(handle.describe.remote())
        assert described["ttl"] == 7.25
        settings: Settings = described["settings"]
        assert settings == config.current()
        assert (settings.batch, settings.task_events, settings.max_running_workflows) == (
            False,
            True,
            3,
        )

        # A later init reaches the manager that runs: its placements, not its lease ttl
        # (fixed when it started), and limits it does not give stay as they were.
        monkeypatch.setenv("RAY_WORKFLOWS_BATCH", "1")
        monkeypatch.setenv("RAY_WORKFLOWS_LEASE_TTL", "9")
        workflow.init(uri)
        handle = bridge.run(config.manager())
        inside = ray.get(handle.__ray_call__.remote(_inside))
        assert inside["executor"].batch and inside["ttl"] == 7.25
        settings = ray.get(handle.describe.remote())["settings"]
        assert (settings.batch, settings.lease_ttl, settings.max_running_workflows) == (
            True,
            7.25,
            3,
        )
    finally:
        kill_manager(uri)


def test_settings_are_read_once(storage: str, monkeypatch: pytest.MonkeyPatch) -> None:
    before = config.current()
    monkeypatch.setenv("RAY_WORKFLOWS_FUSE", "0" if before.fuse else "1")
    assert config.current() is before  # the environment is not read again...
    workflow.init(storage)
    assert config.current().fuse is not before.fuse  # ...until the next init
    monkeypatch.undo()
    workflow.init(storage)  # the session's manager as it was


def test_explicit_over_environment_over_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for variable, _ in ENV.values():
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.delenv("RAY_WORKFLOWS_LEASE_TTL", raising=False)
    uri = str(tmp_path)
    assert build(uri) == Settings(uri)
    monkeypatch.setenv("RAY_WORKFLOWS_AUTO_RESUME", "off")
    monkeypatch.setenv("RAY_WORKFLOWS_HOST", " Yes ")
    monkeypatch.setenv("RAY_WORKFLOWS_HOST_EXIT_WAIT", "0.5")
    monkeypatch.setenv("RAY_WORKFLOWS_CLOCK", "virtual")
    monkeypatch.setenv("RAY_WORKFLOWS_LEASE_TTL", "4")
    got = build(uri)
    assert (got.auto_resume, got.host, got.host_exit_wait, got.clock, got.lease_ttl) == (
        False,
        True,
        0.5,
        "virtual",
        4.0,
    )
    got = build(uri, auto_resume=True, host=False, clock="system", lease_ttl=2)
    assert (got.auto_resume, got.host, got.clock, got.lease_ttl) == (True, False, "system", 2.0)
    monkeypatch.setenv("RAY_WORKFLOWS_STORAGE", str(tmp_path / "from-env"))
    assert build().storage == str(tmp_path / "from-env")
    assert build(uri).storage == uri


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("RAY_WORKFLOWS_BATCH", "maybe"),
        ("RAY_WORKFLOWS_HOST", "2"),
        ("RAY_WORKFLOWS_HOST_EXIT_WAIT", "-1"),
        ("RAY_WORKFLOWS_HOST_EXIT_WAIT", "soon"),
        ("RAY_WORKFLOWS_CLOCK", "sundial"),
        ("RAY_WORKFLOWS_LEASE_TTL", "0"),
        ("RAY_WORKFLOWS_MAILBOX_LIMIT", "0"),
        ("RAY_WORKFLOWS_MAILBOX_LIMIT", "lots"),
    ],
)
def test_a_bad_variable_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ValueError, match=variable):
        build(str(tmp_path))


def test_bad_explicit_settings_are_refused(tmp_path: Path) -> None:
    uri = str(tmp_path)
    with pytest.raises(TypeError, match="unknown_knob"):
        build(uri, unknown_knob=1)
    with pytest.raises(ValueError, match="sundial"):
        build(uri, clock="sundial")
    with pytest.raises(ValueError, match="max_pending_workflows"):
        build(uri, max_pending_workflows=-3)
    with pytest.raises(ValueError, match="batch"):
        build(uri, batch="sometimes")
