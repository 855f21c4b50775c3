"""An event listener plugin for ray-workflows: the event is a file appearing.

    wait_for_event("file_exists", "/data/inbox/report.csv")

returns ``{"path": ..., "text": ...}`` once the file exists. Write the file
atomically (write a temp file, then rename it into place), or the listener may
read it half-written. Once the event is checkpointed the file is renamed to
``<path>.done``, so it is consumed exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from typing import Any

from ray_workflows.event_listener import EventListener


class FileExistsListener(EventListener):
    async def poll_for_event(self, path: str, poll_interval: float = 0.1) -> dict[str, Any]:
        # Runs in the workflow manager's event loop: file reads go to a thread.
        while True:
            try:
                text = await asyncio.to_thread(_read, path)
            except FileNotFoundError:
                await asyncio.sleep(poll_interval)
            else:
                return {"path": path, "text": text}

    async def event_checkpointed(self, event: dict[str, Any]) -> None:
        # At least once: a second call finds the file already renamed.
        with contextlib.suppress(FileNotFoundError):
            await asyncio.to_thread(os.replace, event["path"], event["path"] + ".done")


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()
