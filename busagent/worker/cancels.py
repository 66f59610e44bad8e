"""Which calls run now, so a ``cancel`` entry can find them (:mod:`busagent.cancel`).

No Redis. A call registers its :class:`~busagent.cancel.CallFlag` when the executor starts it
and removes it when it ends: one dict insert and one removal under a lock per call. A cancel
that finds its call neither here nor in a mailbox is remembered for a while (``pending``): the
call may be between its mailbox and the executor, and is then cancelled as it starts.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterable

from busagent.cancel import CallFlag

#: how long a cancel that found nothing waits for its call to start (seconds); and at most how
#: many are kept (cancels of calls that had already finished are the usual case).
PENDING_FOR = 60.0
PENDING_MAX = 10_000


class Cancels:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.running: dict[str, CallFlag] = {}
        #: call id -> monotonic time a cancel found nothing for it.
        self.pending: dict[str, float] = {}

    def begin(self, call: str) -> CallFlag:
        """A call starts (or starts again after waiting for its inputs): its flag, already
        cancelled if a cancel came first."""
        flag = CallFlag()
        with self._lock:
            self.running[call] = flag
            if self.pending and self.pending.pop(call, None) is not None:
                flag.cancelled = True
        return flag

    def end(self, call: str) -> None:
        with self._lock:
            self.running.pop(call, None)

    def cancel(self, calls: Iterable[str], loop: asyncio.AbstractEventLoop) -> None:
        """Mark ``calls`` cancelled: running ones see their flag (an async one gets
        CancelledError on ``loop``); the others are remembered until they start."""
        now = time.monotonic()
        tasks = []
        with self._lock:
            for call in calls:
                flag = self.running.get(call)
                if flag is not None:
                    flag.cancelled = True
                    tasks.append(flag)
                else:
                    self.pending[call] = now
            self._prune(now)
        for flag in tasks:
            # On the loop thread, where the task's start and end are too: no race with them.
            loop.call_soon_threadsafe(flag.cancel_task)

    def forget(self, call: str) -> None:
        """``call`` was answered Cancelled from its mailbox: no longer pending."""
        with self._lock:
            self.pending.pop(call, None)

    def _prune(self, now: float) -> None:
        p = self.pending
        while p and (len(p) > PENDING_MAX or next(iter(p.values())) < now - PENDING_FOR):
            p.pop(next(iter(p)))
