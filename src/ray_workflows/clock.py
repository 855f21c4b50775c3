"""The clock contract: where timers get their time.

A clock plugin implements :class:`Clock` and registers its class under a name in
the ``ray_workflows.clocks`` entry-point group::

    [project.entry-points."ray_workflows.clocks"]
    myclock = "my_package.module:MyClock"

``system`` and ``virtual`` ship built in (:mod:`ray_workflows.backends.clocks`).
The engine tells a clock what "nothing but timers" means: it wraps every other
wait (a Ray task, a listener that is not a timer) in ``clock.activity()``.
"""

from __future__ import annotations

import abc
import contextlib
import math


class Clock(abc.ABC):
    """The time source of timers. One instance serves one asyncio loop (the manager's).

    * ``time()`` is the current time in epoch seconds, like :func:`time.time`.
      Deadlines are absolute epoch seconds so that they survive restarts.
    * ``sleep_until(deadline)`` returns once ``time() >= deadline`` (at once if it
      already is). It is cancellable.
    * ``activity()`` is a plain (synchronous) context manager that marks a wait
      which is not a timer; use it around awaits in async code::

          with clock.activity():
              result = await ray_object_ref

      A clock may skip time only while no activity is open.
    """

    @abc.abstractmethod
    def time(self) -> float:
        """Now, in epoch seconds."""

    @abc.abstractmethod
    async def sleep_until(self, deadline: float) -> None:
        """Return once ``time() >= deadline``."""

    async def sleep(self, seconds: float) -> None:
        """Sleep ``seconds`` of this clock's time."""
        await self.sleep_until(self.time() + seconds)

    def activity(self) -> contextlib.AbstractContextManager[None]:
        """Mark a non-timer wait for the duration of the ``with`` block."""
        return contextlib.nullcontext()


def check_deadline(deadline: object) -> float:
    """Return ``deadline`` as a float; refuse what is not a finite real number."""
    if isinstance(deadline, bool) or not isinstance(deadline, (int, float)):
        raise TypeError(
            f"a deadline must be epoch seconds as an int or float, got "
            f"{type(deadline).__name__}: {deadline!r:.60}"
        )
    value = float(deadline)
    if not math.isfinite(value):
        raise ValueError(f"a deadline must be a finite number of epoch seconds, got {value}")
    return value


__all__ = ["Clock", "check_deadline"]
