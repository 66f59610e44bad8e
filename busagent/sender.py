"""Sending: a call is queued and returns a placeholder at once; a background thread pipelines
whatever has queued while the previous batch was on the wire (group commit), and a resolve
flushes the queue itself first so a lone call pays one round trip. That is what lets
``gather([a(x) for _ in range(1000)])`` cost a handful of round trips instead of a thousand.

Calls to agents go through the routing script (:func:`busagent.scripts.route`); entries that
name their inbox themselves (creates, control ops) are XADDed as :class:`Entry` fields.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import redis

from . import scripts
from .errors import RedisUnavailable, UsageError
from .protocol import VERSION, Entry, Kind, signature
from .tuning import EXIT_NOTICE_AFTER, LINGER, SEND_BATCH, SEND_PATIENCE, SENT_MARK_TTL

if TYPE_CHECKING:
    from .bus import Bus

#: redis-py errors that mean Redis cannot be reached for now: wait and try again.
REDIS_DOWN = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)


def _in_multiprocessing_child() -> bool:
    """Whether this process is a ``multiprocessing`` child (any start method): it will leave
    through ``os._exit``, past ``atexit``, so a queued send could be lost at its exit."""
    mp = sys.modules.get("multiprocessing")  # never imported: not a multiprocessing child
    return mp is not None and mp.parent_process() is not None


@dataclass
class Op:
    """Commands the sender adds to a pipeline, and who to tell if they could not be sent."""

    add: Callable[[Any], None]
    ncmds: int
    on_error: Callable[[BaseException], None]
    #: commands that are Lua route calls: on NOSCRIPT they are re-sent after loading the script.
    scripted: bool = False


class Sender:
    def __init__(self, bus: Bus) -> None:
        self._bus = bus
        self._queue: list[Op] = []
        self._cond = threading.Condition()
        self._send_lock = threading.Lock()
        self._closed = False
        #: send on the calling thread, at once: in a multiprocessing child (see after_fork).
        self._inline = _in_multiprocessing_child()
        self._thread: threading.Thread | None = None
        if not self._inline:
            self._thread = threading.Thread(target=self._run, name="busagent-sender",
                                            daemon=True)
            self._thread.start()

    def after_fork(self) -> None:
        """Make this sender usable in a forked child. The queue copied from the parent is the
        parent's to send (dropped here), its locks may have been held by a thread that does not
        exist here, and so does not the sender thread. The child then sends each call on the
        calling thread before the call returns, as a spawned ``multiprocessing`` child does:
        such a child leaves through ``os._exit``, past ``atexit``, so nothing queued may wait
        for a later flush. The price is one round trip per call (per fanout chunk) in those
        children, none in other processes."""
        self._queue = []
        self._cond = threading.Condition()
        self._send_lock = threading.Lock()
        self._thread = None
        self._inline = True

    def submit(self, op: Op) -> None:
        with self._cond:
            if self._closed:
                raise UsageError("busagent is shut down; call busagent.init() again")
            self._queue.append(op)
            n = len(self._queue)
            if n == 1 or n == SEND_BATCH:
                self._cond.notify()
        if self._inline:
            self.flush()

    # --- what callers send ----------------------------------------------------------------------

    def entry(self, kind: Kind, body: bytes, call: str = "", agent: str = "") -> Entry:
        """An entry from this process, signed with the bus's secret if it has one."""
        return Entry.new(self._bus.settings.secret, kind, body, call=call, agent=agent,
                         caller=self._bus.caller)

    def route(self, agent_id: str, call_id: str, kind: Kind, body: bytes,
              on_error: Callable[[BaseException], None]) -> None:
        """Queue a call to an agent (routed by its registry record)."""
        self.route_many([call_id], [agent_id], kind, body, lambda _ids, e: on_error(e))

    def route_many(self, call_ids: Sequence[str], agent_ids: Sequence[str], kind: Kind,
                   body: bytes, on_error: Callable[[list[str], BaseException], None]) -> None:
        """Queue one call body to many agents (route.lua: a thousand calls a script call)."""
        b = self._bus
        s, secret = b.settings, b.settings.secret
        for i in range(0, len(call_ids), SEND_BATCH):
            chunk = [(c, a, signature(secret, VERSION, c, a, kind, body))
                     for c, a in zip(call_ids[i : i + SEND_BATCH], agent_ids[i : i + SEND_BATCH],
                                     strict=True)]
            add = scripts.route(b.scripts, b.keys, chunk, kind=kind, body=body, caller=b.caller,
                                version=VERSION, reply_ttl=s.reply_ttl, sent_ttl=SENT_MARK_TTL)
            ids = [c[0] for c in chunk]

            def failed(e: BaseException, ids: list[str] = ids) -> None:
                on_error(ids, e)

            self.submit(Op(add, 1, failed, scripted=True))

    def send(self, add: Callable[[Any], None], ncmds: int,
             on_error: Callable[[BaseException], None]) -> None:
        """Queue ``ncmds`` commands that ``add`` puts on a pipeline."""
        self.submit(Op(add, ncmds, on_error))

    def queued(self) -> bool:
        with self._cond:
            return bool(self._queue)

    def flush(self, until: float | None = None) -> None:
        """Send everything queued before this call returns. ``until`` (``time.monotonic()``
        seconds): a caller's deadline; if Redis is still unreachable then, RedisUnavailable is
        raised and what was not sent stays queued (the sender thread keeps trying for up to
        SEND_PATIENCE seconds), so a resolve never waits out the send queue's patience on top
        of its own deadline."""
        if until is None:
            self._send_lock.acquire()
        elif not self._send_lock.acquire(timeout=max(until - time.monotonic(), 0.0)):
            raise RedisUnavailable(
                f"Redis at {self._bus.url_for_humans} did not take the queued calls before the "
                "caller's deadline (sending them is being retried); check that it is up and "
                "accepts busagent's credentials"
            )
        try:
            while True:
                with self._cond:
                    batch = self._queue[:SEND_BATCH]
                    del self._queue[:SEND_BATCH]
                if not batch:
                    return
                late = self._send(batch, until)
                if late is not None:
                    with self._cond:
                        self._queue[:0] = batch
                    cause = self._bus.translate(late)
                    raise RedisUnavailable(
                        f"could not send before the caller's deadline: {cause}; the calls stay "
                        f"queued and are sent if Redis takes them within {SEND_PATIENCE:g} s"
                    )
        finally:
            self._send_lock.release()

    def close(self) -> None:
        """Send what is queued (waiting out a Redis outage up to SEND_PATIENCE seconds, and
        saying so on stderr if that takes over EXIT_NOTICE_AFTER), then stop the thread."""
        notice = threading.Timer(EXIT_NOTICE_AFTER, self._notice)
        notice.daemon = True
        notice.start()
        try:
            self.flush()
        finally:
            notice.cancel()
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(2)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if self._closed and not self._queue:
                    return
                # Linger: a caller that resolves right away flushes on its own thread, which is
                # cheaper than handing the send to this one; this thread sends what nobody
                # waits for (fire-and-forget calls), and bursts that fill a batch.
                until = time.monotonic() + LINGER
                while 0 < len(self._queue) < SEND_BATCH and not self._closed:
                    left = until - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
            # _send reports failures to each op; nothing may kill this thread.
            with contextlib.suppress(Exception):
                self.flush()

    def _send(self, batch: list[Op], until: float | None = None) -> BaseException | None:
        """Send a batch, waiting out a Redis outage for up to SEND_PATIENCE seconds (what is
        sent is idempotent: the routing script drops a call id it has already routed), then
        failing its ops. Returns the last error, with the ops not told, when the caller's
        ``until`` comes first."""
        deadline = time.monotonic() + SEND_PATIENCE
        delay = 0.05
        while True:
            try:
                self._attempt(batch)
                return None
            except (*REDIS_DOWN, OSError) as e:
                now = time.monotonic()
                if now + delay > deadline:
                    err = self._unavailable(e)
                    for op in batch:
                        op.on_error(err)
                    return None
                if until is not None and now + delay > until:
                    return e
                time.sleep(delay)
                delay = min(delay * 2, 1.0)

    def _attempt(self, batch: list[Op]) -> None:
        client = self._bus.redis
        if len(batch) == 1 and batch[0].ncmds == 1:
            # A lone command skips the pipeline machinery: the common case of a caller that
            # resolves each call before making the next.
            op = batch[0]
            try:
                try:
                    op.add(client)
                except redis.exceptions.NoScriptError:
                    self._bus.scripts.load()
                    op.add(client)
            except (redis.exceptions.ResponseError, redis.exceptions.DataError) as e:
                op.on_error(self._bus.translate(e))
            return
        for attempt in range(2):
            pipe = client.pipeline(transaction=False)
            for op in batch:
                op.add(pipe)
            results = pipe.execute(raise_on_error=False)
            retry: list[Op] = []
            i = 0
            for op in batch:
                res = results[i : i + op.ncmds]
                i += op.ncmds
                bad = [r for r in res if isinstance(r, Exception)]
                if not bad:
                    continue
                if op.scripted and attempt == 0 and any(
                    isinstance(r, redis.exceptions.NoScriptError) for r in bad
                ):
                    retry.append(op)
                else:
                    op.on_error(self._bus.translate(bad[0]))
            if not retry:
                return
            self._bus.scripts.load()
            batch = retry

    def _notice(self) -> None:
        print(f"busagent: waiting up to {SEND_PATIENCE:g} s to send the calls still queued to "
              f"Redis at {self._bus.url_for_humans} (it does not answer)", file=sys.stderr,
              flush=True)

    def _unavailable(self, e: BaseException) -> RedisUnavailable:
        return RedisUnavailable(f"could not send for {SEND_PATIENCE:g} s: "
                                f"{self._bus.translate(e)}")
