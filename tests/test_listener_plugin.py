"""A third-party listener plugin: examples/listener_plugin, installed as its own
distribution, found by its entry point and run through the listener conformance suite.

It is installed with a real installer (uv, or pip) into a temporary target directory
that goes on ``sys.path``: importlib.metadata reads its dist-info from there, exactly
as from site-packages, and the test environment itself is left unchanged.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ray_workflows import plugins
from ray_workflows._core.events import EventContext, EventListener, use_context
from ray_workflows.testing import ListenerConformance

PLUGIN_SOURCE = Path(__file__).resolve().parent.parent / "examples" / "listener_plugin"
NAME = "file_exists"
MODULE = "rwf_example_listener"


@pytest.fixture(scope="module", autouse=True)
def ray_session() -> None:
    """Overrides the conftest's: nothing here needs Ray, so these tests start none
    (when other modules run in the same session, their Ray is simply unused here)."""


def installer(source: Path, target: Path) -> list[str] | None:
    """The command that installs ``source`` into ``target``, offline, without its
    dependencies (ray-workflows is installed already); None if there is no installer."""
    # Without build isolation the build uses this environment's setuptools; with
    # it, the installer would need the network to fetch one.
    no_isolation = ["--no-build-isolation"] if importlib.util.find_spec("setuptools") else []
    here = Path(sys.executable).parent
    uv = shutil.which("uv", path=str(here)) or shutil.which("uv")
    if uv:
        return [
            uv, "pip", "install", "--quiet", "--no-deps", *no_isolation,
            "--python", sys.executable, "--target", str(target), str(source),
        ]  # fmt: skip
    if importlib.util.find_spec("pip"):
        return [
            sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", *no_isolation,
            "--disable-pip-version-check", "--target", str(target), str(source),
        ]  # fmt: skip
    return None


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Install the example plugin; yield the directory it was installed into."""
    work = tmp_path_factory.mktemp("plugin")
    source = work / "source"  # a copy: building writes build/ and *.egg-info beside it
    shutil.copytree(PLUGIN_SOURCE, source, ignore=shutil.ignore_patterns("build", "*.egg-info"))
    target = work / "site"
    command = installer(source, target)
    if command is None:
        pytest.skip("neither uv nor pip is available to install the example plugin")
    env = {**os.environ, "PIP_NO_INPUT": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, f"{command}\n{done.stdout}\n{done.stderr}"
    sys.path.insert(0, str(target))
    plugins._entry_points.cache_clear()
    try:
        yield target
    finally:
        sys.path.remove(str(target))
        sys.modules.pop(MODULE, None)
        plugins._entry_points.cache_clear()


def test_installed_plugin_is_found_by_its_entry_point(installed: Path) -> None:
    assert NAME in plugins.available(plugins.LISTENER_GROUP)
    listener = plugins.load(plugins.LISTENER_GROUP, NAME)
    assert issubclass(listener, EventListener)
    # The installed copy, not the source tree.
    assert Path(sys.modules[listener.__module__].__file__ or "").parent == installed
    assert {"timer", "http"} <= set(plugins.available(plugins.LISTENER_GROUP))


def test_unknown_listener_name_lists_the_known_ones(installed: Path) -> None:
    with pytest.raises(LookupError, match=NAME):
        plugins.load(plugins.LISTENER_GROUP, "no_such_listener")


class TestFileExistsConformance(ListenerConformance):
    @pytest.fixture(autouse=True)
    def _plugin(self, installed: Path) -> None:
        type(self).listener = plugins.load(plugins.LISTENER_GROUP, NAME)

    def arguments(self, ctx: EventContext) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return (str(Path(ctx.storage.uri) / "inbox" / "report.csv"),), {"poll_interval": 0.02}

    async def trigger(
        self, ctx: EventContext, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        path = Path(args[0])
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text("a,b\n1,2\n")
        tmp.rename(path)

    def check_event(self, ctx: EventContext, event: Any) -> None:
        assert event["text"] == "a,b\n1,2\n"


async def test_plugin_event_is_consumed_once_checkpointed(installed: Path, tmp_path: Path) -> None:
    listener = plugins.load(plugins.LISTENER_GROUP, NAME)
    ctx = ListenerConformance().make_context(tmp_path / "storage")
    flag = tmp_path / "flag"
    with use_context(ctx):
        poll = asyncio.create_task(listener().poll_for_event(str(flag), poll_interval=0.02))
    await asyncio.sleep(0.1)
    assert not poll.done()
    flag.write_text("go")
    event = await asyncio.wait_for(poll, 10)
    assert event == {"path": str(flag), "text": "go"}
    with use_context(ctx):
        await listener().event_checkpointed(event)
        await listener().event_checkpointed(event)  # at least once: again is harmless
    assert not flag.exists() and (tmp_path / "flag.done").read_text() == "go"
