"""How many events each workflow's mailbox holds, so that a send past the limit is
refused without listing the mailbox every time.

The count of a workflow starts from one listing of its mailbox (the first send to it
in this process), then follows the sends and acknowledgements made in this process.
Sends and acknowledgements made elsewhere (another manager on the same storage) are
not seen: a mailbox near its limit is listed again before a send is refused, and at
most once per :data:`RECHECK` seconds while it stays full, so a refusal is never
based on a count older than that, and a flood of sends to a full mailbox costs one
read each (the event id's record, see ``Mailbox.send``), not one listing each.
"""

from __future__ import annotations

import collections
import threading
import time

#: Seconds a full mailbox is believed full before it is listed again.
RECHECK = 1.0
#: Workflows whose counts are kept; the least recently used is forgotten (and listed
#: again at its next send).
KEPT = 4096

_Where = tuple[str, str]  # (storage URI, workflow id)


class Counts:
    """Per (storage, workflow): the events held, and when that was last listed.
    Thread-safe: a process may send from several event loops."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: collections.OrderedDict[_Where, list[float]] = collections.OrderedDict()

    def take(self, where: _Where, limit: int) -> bool | None:
        """Reserve room for one event: True if reserved, False if the mailbox is full
        (listed less than :data:`RECHECK` seconds ago), None if it must be listed first
        (:meth:`settle`)."""
        with self._lock:
            entry = self._held.get(where)
            if entry is None:
                return None
            self._held.move_to_end(where)
            if entry[0] < limit:
                entry[0] += 1
                return True
            return False if time.monotonic() - entry[1] < RECHECK else None

    def settle(self, where: _Where, held: int, limit: int) -> bool:
        """Record ``held`` events, just listed, and reserve room for one if there is."""
        with self._lock:
            # Sends racing this listing may be counted twice or not at all: the next
            # listing (when the count reaches the limit) corrects it.
            room = held < limit
            self._held[where] = [held + 1 if room else held, time.monotonic()]
            self._held.move_to_end(where)
            while len(self._held) > KEPT:
                self._held.popitem(last=False)
            return room

    def release(self, where: _Where) -> None:
        """One event fewer: acknowledged, or a reserved send that stored nothing new."""
        with self._lock:
            entry = self._held.get(where)
            if entry is not None and entry[0] > 0:
                entry[0] -= 1

    def forget(self, where: _Where) -> None:
        with self._lock:
            self._held.pop(where, None)


counts = Counts()

__all__ = ["KEPT", "RECHECK", "Counts", "counts"]
