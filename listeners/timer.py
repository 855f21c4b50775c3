"""The ``timer`` listener: an event that happens at an absolute time.

``workflow.sleep(seconds)`` is ``wait_for_event(TimerListener, deadline)`` with
the deadline computed (and checkpointed) when the workflow reaches the sleep, so
a resumed workflow keeps the original deadline.
"""

from __future__ import annotations

from ray_workflows.backends.clocks import SystemClock

from ray_workflows._core.events import EventListener, context_or_none
from ray_workflows.clock import Clock, check_deadline


class TimerListener(EventListener):
    """Returns ``None`` at ``deadline`` (epoch seconds), at once if it has passed.

    The time is the workflow's clock (``system``, or ``virtual`` in tests); called
    outside a workflow it sleeps on the system clock.
    """

    waits_on_clock = True

    async def poll_for_event(self, deadline: float) -> None:
        deadline = check_deadline(deadline)
        ctx = context_or_none()
        clock: Clock = ctx.clock if ctx is not None else SystemClock()
        await clock.sleep_until(deadline)


__all__ = ["TimerListener"]
