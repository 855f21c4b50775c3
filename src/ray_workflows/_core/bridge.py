"""The one bridge from sync code to the async core.

A daemon thread runs an event loop for the whole process; sync callers (the
blocking API, Ray workers writing checkpoints) submit coroutines to it and wait.
Calling it from inside that loop would deadlock, so it refuses with a clear error.

Why not anyio's blocking portal (``anyio.from_thread.start_blocking_portal``), kept
for the process:

* **Cost per call.** A portal call crosses to the loop's thread twice: once to spawn
  the coroutine as a task of the portal's task group (the caller waits for that), once
  more for its result. This bridge crosses once (``run_coroutine_threadsafe``). The
  bridge sits on hot paths (each checkpoint a Ray worker writes, every blocking API
  call), where the second handoff makes each call markedly slower.
* **Exit.** A portal kept open is a context manager never exited; at interpreter
  exit its generator is finalised and asks the portal, through the loop's thread, to
  stop, while that daemon thread can no longer run: the process hangs. A portal for
  the process would need an exit hook, and any later sync call (other exit hooks)
  would start a second one.
* **Fork.** A forked child inherits the portal object but not its thread; a call into
  it waits forever (or, from a thread that reuses the dead one's id, is refused as if
  made on the loop). The portal cannot tell, so this module's check of its thread
  (:func:`_start` starts a new loop when the thread is not alive) would be needed
  anyway.

Neither Ray's own threads nor loop reuse rule it out: both work either way.
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
        refuse_own_loop(target)
    except RuntimeError:
        coro.close()
        raise
    return asyncio.run_coroutine_threadsafe(coro, target).result(timeout)


def refuse_own_loop(target: asyncio.AbstractEventLoop | None = None) -> None:
    """RuntimeError if called on the bridge loop: a blocking call made there would
    wait for the loop it blocks. Blocking code that does its work in the calling
    thread checks this before it starts."""
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        return
    if running is (target or _start()):
        raise RuntimeError(
            "A blocking ray-workflows call was made from inside its own event loop; "
            "use the awaitable twin in ray_workflows.aio instead."
        )


__all__ = ["loop", "refuse_own_loop", "run"]
