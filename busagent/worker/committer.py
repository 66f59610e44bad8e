"""The group commit: finished calls written to Redis together by ``commit.lua``.

For each :class:`.jobs.Done` the script acknowledges and deletes the inbox entry, writes the
reply and applies the agent's memory changes, atomically; so the inbox holds only calls in
flight, and Redis always has each agent's memory as of its last completed call. Completions
queue from every thread; whoever holds the commit lock writes everyone's, up to COMMIT_BATCH per
script call, and the others return at once.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable

import redis

from busagent import scripts
from busagent.bus import Bus
from busagent.errors import ProtocolError
from busagent.protocol import Reply
from busagent.tuning import COMMIT_BATCH

from .jobs import Done
from .lasting import MOST, Lasting

log = logging.getLogger("busagent.worker")

#: seconds a worker's exit keeps retrying replies Redis refuses, after its grace.
EXIT_RETRY = 5.0


class Committer:
    """Writes to the inbox stream ``inbox``; calls ``on_written(batch)`` after each batch is
    written (or given up on at exit), from the writing thread."""

    def __init__(self, bus: Bus, inbox: str, loop: asyncio.AbstractEventLoop,
                 on_written: Callable[[list[Done]], None]) -> None:
        self.bus = bus
        self.inbox = inbox
        self.loop = loop
        self.on_written = on_written
        self.queue: list[Done] = []
        self.queue_lock = threading.Lock()
        self.commit_lock = threading.Lock()
        self.flush_scheduled = False
        #: shutting down (:meth:`close`): stop retrying a refusing Redis at ``give_up_at``.
        self.exiting = False
        self.give_up_at = float("inf")
        #: a failure that lasts is logged once, with back-off (:mod:`.lasting`).
        self.lasting = Lasting(log, "writing replies works again")

    def add(self, done: Done, flush: bool = True) -> None:
        """Queue a finished call; write the queue now unless ``flush`` is False (more of the
        agent's calls follow and will flush it)."""
        with self.queue_lock:
            self.queue.append(done)
        if flush:
            self.flush()

    def add_soon(self, done: Done) -> None:
        """:meth:`add` from the loop thread without blocking it: completions of one loop turn
        are written together, on a pool thread (ten thousand sleeps that end at once are a few
        commits, not ten thousand round trips on the loop)."""
        with self.queue_lock:
            self.queue.append(done)
        if not self.flush_scheduled:
            self.flush_scheduled = True
            self.loop.call_soon(self._flush_in_pool)

    def _flush_in_pool(self) -> None:
        self.flush_scheduled = False
        self.loop.run_in_executor(None, self.flush)

    def queued(self) -> int:
        """Completions waiting to be written (count)."""
        return len(self.queue)

    def flush(self) -> None:
        """Write queued completions. Whoever gets the lock writes everyone's (group commit);
        the others return at once."""
        while True:
            if not self.commit_lock.acquire(blocking=False):
                return
            try:
                while True:
                    with self.queue_lock:
                        batch = self.queue[:COMMIT_BATCH]
                        del self.queue[:COMMIT_BATCH]
                    if not batch:
                        break
                    self._write_retrying(batch)
                    self.on_written(batch)
            finally:
                self.commit_lock.release()
            with self.queue_lock:
                if not self.queue:
                    return  # else: added after our last look; loop to write it too

    def close(self) -> None:
        """At exit, once the grace is over: write what is queued, retrying a Redis that refuses
        for at most EXIT_RETRY seconds, then give up on it (logged; those calls stay
        unacknowledged in the inbox, so the stop answers them as not run, or a drain or a
        recovery runs them again)."""
        self.give_up_at = time.monotonic() + EXIT_RETRY
        self.exiting = True
        # A thread may be retrying a batch now (it holds the commit lock): wait for it to give
        # up too, so that its "giving up" is logged before the process ends.
        if self.commit_lock.acquire(timeout=EXIT_RETRY + MOST + 1):
            self.commit_lock.release()
        self.flush()

    def _write_retrying(self, batch: list[Done]) -> None:
        while True:
            try:
                self._write(batch)
                self.lasting.worked()
                return
            except (redis.exceptions.RedisError, OSError) as e:
                # Nothing is acknowledged until written: retry until Redis is back (or, for an
                # out-of-memory refusal or an ACL change, takes it again).
                left = self.give_up_at - time.monotonic()
                if self.exiting and left <= 0:
                    log.error("giving up on %d replies at exit (%s); their calls stay "
                              "unacknowledged, as if not run, and their memory changes are not "
                              "saved", len(batch), self.bus.translate(e))
                    return
                delay = self.lasting.failed(f"writing replies failed: {self.bus.translate(e)}; "
                                            "retrying with backoff")
                time.sleep(min(delay, left))

    def _write(self, batch: list[Done]) -> None:
        try:
            self._write_batch(batch)
        except (redis.exceptions.RedisError, OSError):
            raise
        except Exception:
            if len(batch) == 1:
                self._write_batch([_refused(batch[0])])
            else:
                log.exception("a batch of %d replies did not encode; writing one by one",
                              len(batch))
                for d in batch:
                    self._write([d])

    def _write_batch(self, batch: list[Done]) -> None:
        fenced = scripts.commit(self.bus.scripts, self.bus.keys, self.inbox,
                                self.bus.settings.reply_ttl, batch)
        if fenced:
            log.warning("%d replies refused: their calls were moved to another worker", fenced)


def _refused(d: Done) -> Done:
    """``d`` answered with an error and without its memory changes, for a Done that could not
    be written (a bug upstream: Replies encodes everything it hands over)."""
    log.exception("the reply to call %s could not be written; answering with an error", d.call_id)
    reply = Reply.fail(ProtocolError("the worker could not write this call's reply or memory "
                                     "changes; see the worker's log"))
    return Done(d.entry_id, d.call_id, reply)
