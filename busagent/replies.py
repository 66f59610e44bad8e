"""A reply's whole life: ``{p}:reply:{call}``, a one-element list holding an encoded
:class:`~busagent.protocol.Reply`, kept ``reply_ttl`` seconds.

* written by the worker's group commit (``commit.lua``), by ``route.lua`` (unknown agent),
  ``move.lua`` (dead-lettered) and recovery (:func:`write`);
* read without waiting by :func:`peek` (``collect.lua``: many replies a script call), the way a
  worker reads the placeholders passed to it;
* waited for by :func:`fetch` (blocking) and :func:`afetch` (asyncio): one wait loop,
  :class:`_Wait`, under both;
* deleted by :func:`release` (or read and deleted at once with ``take``).

Placeholders are built on this module; so is the worker's reading of its inputs.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

import redis

from . import records, scripts
from .errors import CallTimeout, MessageTooLarge, PlacementError, RedisUnavailable
from .protocol import Reply
from .sender import REDIS_DOWN
from .tuning import CHECK_AGENTS, PEEK_BATCH, SEND_BATCH

if TYPE_CHECKING:
    from .bus import Bus

#: a timeout argument meaning "the ``call_timeout`` setting".
DEFAULT: Any = object()


def key(b: Bus, call_id: str) -> str:
    return b.keys.reply(call_id)


def decode(data: bytes) -> Any:
    """A reply's value, or its error raised (busagent's own class, else a RemoteError)."""
    return Reply.parse(data).value_or_raise()


def write(b: Bus, pipe: Any, call_id: str, reply: bytes) -> None:
    """Queue on ``pipe`` the writing of a reply (``Reply.ok``/``Reply.fail`` bytes)."""
    k = key(b, call_id)
    pipe.rpush(k, reply)
    pipe.expire(k, b.settings.reply_ttl)


def peek(b: Bus, call_ids: Sequence[str], take: bool = False) -> dict[str, bytes]:
    """The replies already there, without waiting (``take``: and delete them)."""
    got: dict[str, bytes] = {}
    for i in range(0, len(call_ids), PEEK_BATCH):
        chunk = call_ids[i : i + PEEK_BATCH]
        values = scripts.collect(b.scripts, [b.keys.reply(c) for c in chunk], take)
        got.update((c, v) for c, v in zip(chunk, values, strict=True) if v is not None)
    return got


async def apeek(b: Bus, call_ids: Sequence[str], take: bool = False) -> dict[str, bytes]:
    """:func:`peek` on this event loop's client."""
    client = b.async_client()
    got: dict[str, bytes] = {}
    for i in range(0, len(call_ids), PEEK_BATCH):
        chunk = call_ids[i : i + PEEK_BATCH]
        values = await scripts.acollect(b.scripts, client, [b.keys.reply(c) for c in chunk], take)
        got.update((c, v) for c, v in zip(chunk, values, strict=True) if v is not None)
    return got


def release(b: Bus, call_ids: Sequence[str]) -> None:
    """Delete replies nobody needs any more, before their ``reply_ttl``."""
    with b.errors():
        for i in range(0, len(call_ids), SEND_BATCH):
            b.redis.unlink(*[key(b, c) for c in call_ids[i : i + SEND_BATCH]])


def flush(b: Bus, timeout: float | object | None) -> float | None:
    """Send this process's queued calls within the caller's ``timeout`` (seconds, DEFAULT for
    ``call_timeout``, None for none) and return what is left of it for the wait, so that the
    flush and the wait together honour the deadline. Raises RedisUnavailable (naming the cause:
    unreachable, credentials refused) if the calls could not be sent in time."""
    t = b.settings.call_timeout if timeout is DEFAULT else timeout
    if t is None:
        b.sender.flush()
        return None
    start = time.monotonic()
    b.sender.flush(until=start + float(t))  # type: ignore[arg-type]
    return max(float(t) - (time.monotonic() - start), 0.0)  # type: ignore[arg-type]


class _Wait:
    """The state of one wait for many replies, shared by :func:`fetch` and :func:`afetch`:
    what is still pending, the deadline sliced into blocking reads, and the backoff through a
    Redis outage. The front ends only do the I/O it asks for."""

    def __init__(self, b: Bus, call_ids: Sequence[str], timeout: float | object | None,
                 errors: dict[str, BaseException] | None, take: bool,
                 agents: Mapping[str, str] | None = None) -> None:
        self.b = b
        self.take = take
        t = b.settings.call_timeout if timeout is DEFAULT else timeout
        now = time.monotonic()
        self.deadline = None if t is None else now + float(t)  # type: ignore[arg-type]
        self.out: dict[str, bytes] = {}
        self.pending = [c for c in dict.fromkeys(call_ids) if not (errors and c in errors)]
        self.delay = 0.05
        #: why Redis last refused the blocking read (it is a write: refused when Redis is out
        #: of memory), for the CallTimeout message.
        self.refused = ""
        #: call id -> agent id, for the liveness check (:meth:`due`); none: no check.
        self.agents: Mapping[str, str] = agents or {}
        self.checking = agents is not None
        # A wait shorter than dead_after never checks: no server can be dead by then that
        # was not dead when the call was sent (and then recovery had already moved it).
        self.check_at = now + b.settings.dead_after
        #: monotonic time the liveness check first found the call unhostable, or None.
        self.suspect_since: float | None = None

    def due(self) -> list[str]:
        """The agents of the pending calls when it is time to ask whether any of them can
        still run (once ``dead_after`` into the wait, then every ``heartbeat``), else []."""
        now = time.monotonic()
        if not self.checking or now < self.check_at:
            return []
        self.check_at = now + self.b.settings.heartbeat
        return [a for c in self.pending[:CHECK_AGENTS] if (a := self.agents.get(c))]

    def checked(self, reason: str | None) -> None:
        """Raise PlacementError with ``reason`` once the liveness check has found one for
        ``dead_after`` in a row. One finding is not enough: right after Redis restarts (or
        was unreachable) every record is stale, though the workers are alive and beat again
        within a heartbeat or two of reconnecting; a real death stays silent."""
        if not reason:
            self.suspect_since = None
            return
        now = time.monotonic()
        if self.suspect_since is None:
            self.suspect_since = now
        if now - self.suspect_since >= self.b.settings.dead_after:
            raise PlacementError(reason)

    def check(self) -> None:
        """The liveness check, blocking (:func:`fetch`, or on an executor thread)."""
        agents = self.due()
        if agents:
            k, s, r = self.b.keys, self.b.settings, self.b.redis
            servers = self.b.server_snapshot.get(r, k.servers, s.heartbeat)
            reason = records.unhostable(r, k.agents, servers, agents, s.dead_after)
            if reason and records.redis_uptime(r) < 2 * s.dead_after:
                # Redis restarted a moment ago: every record predates it, and the workers
                # reconnect with back-off. Their silence says nothing yet.
                reason = None
            self.checked(reason)

    def should_peek(self) -> bool:
        # One key: the blocking read below returns at once if its reply is there.
        return len(self.pending) > 1

    def peeked(self, got: dict[str, bytes]) -> bool:
        """Take what a peek found; True when nothing is left."""
        self.out.update(got)
        self.pending = [c for c in self.pending if c not in got]
        return not self.pending

    def next(self) -> tuple[str, float]:
        """The key to block on and for how long. Wait on the newest: replies to a fan-out tend
        to arrive in order, so once it is there most of the others are too, and one more peek
        collects them."""
        wait = self.b.settings.block_slice
        if self.deadline is not None:
            left = self.deadline - time.monotonic()
            if left <= 0:
                n = len(self.pending)
                why = (f"; meanwhile Redis refused writes ({self.refused})" if self.refused
                       else "")
                raise CallTimeout(
                    f"{n} of {n + len(self.out)} call(s) not answered in time (first: "
                    f"{self.pending[0]}); the agent may be busy or its worker down: see "
                    f"`busagent servers`, or pass a longer timeout{why}"
                )
            wait = min(wait, left)
        if self.checking:
            wait = min(wait, self.check_at - time.monotonic())
        # BLMOVE takes a float timeout; 0 means forever, and so does 0.001 on Redis 6.2
        # (measured: it never returns), so never below 10 ms.
        return self.b.keys.reply(self.pending[-1]), max(wait, 0.01)

    def read(self, got: Any) -> None:
        """Take the answer of the blocking read (BLPOP's ``[key, value]`` when taking)."""
        self.delay = 0.05  # Redis answered: an outage is over
        if self.take:
            got = None if got is None else got[1]
        if got is not None:
            self.out[self.pending.pop()] = cast(bytes, got)

    def refusal(self, e: BaseException) -> float:
        """How long to wait before trying again when Redis refused the blocking read (out of
        memory: BLMOVE is a write); the peek that comes first still reads what is there.
        Never past the deadline: :meth:`next` raises CallTimeout there."""
        self.suspect_since = None  # the workers' heartbeats were refused alike
        self.refused = str(self.b.translate(e))
        d = self.delay
        self.delay = min(self.delay * 2, 1.0)
        if self.deadline is not None:
            d = min(d, max(self.deadline - time.monotonic(), 0.0))
        return d

    def backoff(self, e: BaseException) -> float:
        """How long to wait before trying again through an outage; past the caller's deadline,
        say Redis was the problem (not the agent)."""
        self.suspect_since = None  # the workers could not beat either: start judging afresh
        if self.deadline is not None and time.monotonic() + self.delay > self.deadline:
            raise RedisUnavailable(
                f"lost Redis at {self.b.url_for_humans} while waiting for replies and it did "
                f"not come back before the deadline: {e}"
            ) from None
        d = self.delay
        self.delay = min(self.delay * 2, 1.0)
        return d


def _closed_while_up(b: Bus, w: _Wait) -> bool:
    """After a read broke: False if Redis is down (wait it out). Else Redis closed our
    connection while up: most often because a reply was larger than its output-buffer limit
    for normal clients (``client-output-buffer-limit normal 32mb 16mb 5`` on many managed
    Redis), which no number of re-reads can get through. The largest pending reply is then
    read alone; if Redis closes the connection again, that call fails with MessageTooLarge
    (once: its reply is settled as that error) and True is returned, as it is when the lone
    read works (a CLIENT KILL or an idle timeout: not an outage)."""
    try:
        b.redis.ping()
        sizes = [n for i in range(0, len(w.pending), PEEK_BATCH)
                 for n in scripts.sizes(b.scripts, [key(b, c) for c in
                                                    w.pending[i : i + PEEK_BATCH]])]
    except REDIS_DOWN:
        return False
    size, call = max(zip(sizes, w.pending, strict=True))
    if size == 0:
        return False  # nothing to blame: retry with back-off as through an outage
    try:
        got = scripts.collect(b.scripts, [key(b, call)], w.take)[0]
    except REDIS_DOWN:
        try:
            b.redis.ping()
        except REDIS_DOWN:
            return False
        got = Reply.fail(MessageTooLarge(
            f"the reply to call {call} is {size:,} bytes and Redis at {b.url_for_humans} "
            "closes the connection each time it sends it: it is over Redis's output-buffer "
            "limit for normal clients (client-output-buffer-limit); raise that limit (CONFIG "
            "SET client-output-buffer-limit \"normal 0 0 0\") or return smaller replies"))
    if got is not None:
        w.peeked({call: got})
    return True


def fetch(b: Bus, call_ids: Sequence[str], timeout: float | object | None = None,
          errors: dict[str, BaseException] | None = None, take: bool = False,
          agents: Mapping[str, str] | None = None) -> dict[str, bytes]:
    """Block until every call's reply is in Redis; return the raw replies. ``errors`` holds
    calls known to have failed before reaching Redis: they are skipped and reported by the
    caller. ``take``: delete each reply as it is read (the caller is its only reader).
    ``agents`` (call id -> agent id): past ``dead_after`` into the wait, raise PlacementError
    as soon as one of those agents' server is dead with no live worker to move it to
    (:func:`busagent.records.unhostable`), rather than wait out the deadline."""
    timeout = flush(b, timeout)
    w, r = _Wait(b, call_ids, timeout, errors, take, agents), b.redis
    with b.errors():  # an outage is waited out below; any other refusal is a busagent error
        if b.blocking is None or w.peeked(peek(b, w.pending, take)):
            _wait(b, w, r)
        else:
            # On a worker's thread (a nested call): the replies are not all there, so the
            # thread is about to block. The worker lends its place in the pool meanwhile.
            with b.blocking():
                _wait(b, w, r)
    return w.out


def _wait(b: Bus, w: _Wait, r: Any) -> None:
    take = w.take
    while w.pending:
        try:
            if w.should_peek() and w.peeked(peek(b, w.pending, take)):
                break
            w.check()
            k, wait = w.next()
            # redis-py's hints say int; Redis takes fractional seconds since 6.0.
            w.read(r.blpop([k], wait) if take
                   else r.blmove(k, k, wait, "RIGHT", "LEFT"))
        except REDIS_DOWN as e:
            if not _closed_while_up(b, w):
                time.sleep(w.backoff(e))
        except redis.exceptions.OutOfMemoryError as e:
            # Replies already written stay readable: collect.lua only reads (LINDEX).
            if w.peeked(peek(b, w.pending, take)):
                break
            time.sleep(w.refusal(e))


async def afetch(b: Bus, call_ids: Sequence[str], timeout: float | object | None = None,
                 errors: dict[str, BaseException] | None = None,
                 take: bool = False, agents: Mapping[str, str] | None = None
                 ) -> dict[str, bytes]:
    """:func:`fetch` for asyncio code: the send queue is flushed on another thread and the
    event loop is never blocked."""
    loop = asyncio.get_running_loop()
    if b.sender.queued():
        timeout = await loop.run_in_executor(None, flush, b, timeout)
    w, r = _Wait(b, call_ids, timeout, errors, take, agents), b.async_client()
    with b.errors():  # as in fetch
        while w.pending:
            try:
                if w.should_peek() and w.peeked(await apeek(b, w.pending, take)):
                    break
                if w.checking and w.check_at <= time.monotonic():
                    await loop.run_in_executor(None, w.check)  # rare: off the loop
                k, wait = w.next()
                w.read(await r.blpop([k], wait) if take
                       else await r.blmove(k, k, wait, "RIGHT", "LEFT"))  # type: ignore[arg-type]
            except REDIS_DOWN as e:
                # As in fetch: a connection Redis closed while up is not an outage. The check
                # is blocking (a PING, a size read, maybe a lone read of one large reply):
                # rare, so on an executor thread rather than an async copy of it.
                if not await loop.run_in_executor(None, _closed_while_up, b, w):
                    await asyncio.sleep(w.backoff(e))
            except redis.exceptions.OutOfMemoryError as e:
                if w.peeked(await apeek(b, w.pending, take)):
                    break
                await asyncio.sleep(w.refusal(e))
    return w.out

