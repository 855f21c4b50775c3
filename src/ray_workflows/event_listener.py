"""``workflow.event_listener``: the listener interface and the timer, where Ray's
``ray.workflow.event_listener`` had them (``workflow.event_listener.TimerListener``)."""

from ray_workflows.events import EventListener
from ray_workflows.listeners.timer import TimerListener

__all__ = ["EventListener", "TimerListener"]
