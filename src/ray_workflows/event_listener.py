"""``workflow.event_listener``: the listener interface, the context a listener reads,
and the timer, where Ray's ``ray.workflow.event_listener`` had them
(``workflow.event_listener.TimerListener``). The conformance suite for a listener is
``ray_workflows.testing.ListenerConformance``."""

from ray_workflows._core.events import EventContext, EventListener, current_context
from ray_workflows.listeners.timer import TimerListener

__all__ = ["EventContext", "EventListener", "TimerListener", "current_context"]
