"""The one bridge from sync code to the async core.

A daemon thread runs an event loop for the whole process; sync callers (the
blocking API, Ray workers writing checkpoints) submit coroutines to it and wait.
Calling it from inside that loop would deadlock, so it refuses with a clear error.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None
_thread: threading.Thread | None = None


def _start() -> asyncio.AbstractEventLoop:
    global _loop, _thread
    with _lock:
        if _loop is None or _thread is None or not _thread.is_alive():
            loop = asyncio.new_event_loop()
            ready = threading.Event()

            def main() -> None:
                asyncio.set_event_loop(loop)
                loop.call_soon(ready.set)
                loop.run_forever()

            _thread = threading.Thread(target=main, name="ray-workflows-bridge", daemon=True)
            _thread.start()
            ready.wait()
            _loop = loop
        return _loop


def loop() -> asyncio.AbstractEventLoop:
    """The bridge's event loop (started on first use)."""
    return _start()


def run(coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
    """Run ``coro`` on the bridge loop and return its result, from sync code."""
    target = _start()
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is target:
        coro.close()
        raise RuntimeError(
            "A blocking ray-workflows call was made from inside its own event loop; "
            "use the awaitable twin in ray_workflows.aio instead."
        )
    return asyncio.run_coroutine_threadsafe(coro, target).result(timeout)


__all__ = ["loop", "run"]
