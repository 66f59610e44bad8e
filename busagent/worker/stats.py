"""The worker's call counters: calls answered, errors, a latency histogram and the calls running
now, published in its heartbeat record (:class:`busagent.records.ServerInfo`).

Cheap on the hot path by construction: a call costs one dict insert when it starts
(:meth:`Stats.begin`, no lock: one dict operation is atomic under the GIL) and its share of one
locked pass per *committed batch* (:meth:`Stats.written`, called with the committer's batch),
so a batch of a thousand completions takes the lock once. The heartbeat thread reads a copy.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections.abc import Iterable
from typing import Any

from busagent.records import LATENCY_BOUNDS, RunningCall
from busagent.tuning import RUNNING_SHOWN

from .jobs import Done, Job


class Stats:
    """Counters since the worker started; ``snapshot()`` gives the heartbeat's fields."""

    def __init__(self) -> None:
        self.calls = 0
        self.errors = 0
        self.buckets = [0] * (len(LATENCY_BOUNDS) + 1)
        self.total_seconds = 0.0
        #: inbox entry id -> (job, epoch seconds it started): the calls running now.
        self.running: dict[bytes, tuple[Job, float]] = {}
        self._lock = threading.Lock()
        self._last = (time.monotonic(), 0)

    def begin(self, job: Job) -> None:
        """A call starts running (first run only: a resumed call keeps its start)."""
        if not job.started:
            job.started = time.perf_counter()
            self.running[job.entry_id] = (job, time.time())

    def written(self, batch: Iterable[Done]) -> None:
        """Count the calls of a committed batch (other entries, started 0, are skipped)."""
        now = time.perf_counter()
        with self._lock:
            for d in batch:
                if not d.started:
                    continue
                self.running.pop(d.entry_id, None)
                took = now - d.started
                self.calls += 1
                self.errors += d.failed
                self.total_seconds += took
                self.buckets[bisect.bisect_left(LATENCY_BOUNDS, took)] += 1

    def snapshot(self) -> dict[str, Any]:
        """``{calls, errors, latency (bucket counts), latency_sum (s), rate (calls/s since the
        last snapshot), running}`` for the heartbeat record."""
        with self._lock:
            calls, errors = self.calls, self.errors
            buckets, total = list(self.buckets), self.total_seconds
        t, before = time.monotonic(), self._last
        rate = (calls - before[1]) / (t - before[0]) if t > before[0] else 0.0
        self._last = (t, calls)
        running = sorted(self.running.copy().values(), key=lambda v: v[1])[:RUNNING_SHOWN]
        return {
            "calls": calls, "errors": errors, "latency": buckets,
            "latency_sum": round(total, 6), "rate": round(rate, 2),
            "running": [RunningCall(call=j.entry.call, agent=j.entry.agent, kind=j.entry.kind,
                                    since=since) for j, since in running],
        }
