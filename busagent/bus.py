"""The connection to the bus from any process: settings, Redis clients, sending and resolving.

Sending is batched: a call is queued and returns a placeholder at once; a background thread
pipelines whatever has queued while the previous batch was on the wire (group commit), and a
resolve flushes the queue itself first so a lone call pays one round trip. That is what lets
``gather([a(x) for _ in range(1000)])`` cost a handful of round trips instead of a thousand.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, Any, cast

import msgpack
import redis
import redis.asyncio as aredis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from . import embedded
from .config import Settings
from .errors import (
    BusagentError,
    BusError,
    CallTimeout,
    ConfigError,
    MessageTooLarge,
    RedisUnavailable,
    SkipStatement,
    from_wire,
)
from .ids import new_id
from .keys import Keys
from .placement import Placement  # a leaf: it imports bus.py only for type checking
from .tuning import LINGER, PEEK_BATCH, SEND_BATCH, SEND_PATIENCE
from .wire import VERSION, Reply, signature, unpack_reply

if TYPE_CHECKING:
    from .spawn import Children  # spawn imports bus.py at run time

SCRIPTS = ("route", "collect", "commit", "move", "heartbeat")
LUA = {n: resources.files("busagent").joinpath(f"{n}.lua").read_text() for n in SCRIPTS}
_REDIS_ERRORS = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)


#: set while a worker loads a user's script: see :func:`busagent.worker.load.load_script`.
loading_script = False


def socket_options(url: str, settings: Settings) -> dict[str, Any]:
    """Timeouts that turn a dead or half-open connection into an error instead of a hang, and
    health checks before reusing an idle connection."""
    opts: dict[str, Any] = {
        "socket_timeout": settings.socket_timeout,
        "socket_connect_timeout": 5,
        "health_check_interval": 30,
        "retry_on_error": [redis.exceptions.ConnectionError],
    }
    if not url.startswith("unix:"):
        opts["socket_keepalive"] = True
    return opts


def connect(url: str, settings: Settings, **kw: Any) -> redis.Redis:
    """A redis-py client with the timeouts and retries busagent relies on."""
    return redis.Redis.from_url(
        url, retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), 3),
        **socket_options(url, settings), **kw,
    )


def aconnect(url: str, settings: Settings, **kw: Any) -> aredis.Redis:
    return aredis.Redis.from_url(
        url, retry=aredis.retry.Retry(ExponentialBackoff(cap=1.0, base=0.05), 3),
        **socket_options(url, settings), **kw,
    )


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
        self._thread = threading.Thread(target=self._run, name="busagent-sender", daemon=True)
        self._thread.start()

    def submit(self, op: Op) -> None:
        with self._cond:
            if self._closed:
                raise BusagentError("busagent is shut down; call busagent.init() again")
            self._queue.append(op)
            n = len(self._queue)
            if n == 1 or n == SEND_BATCH:
                self._cond.notify()

    def queued(self) -> bool:
        with self._cond:
            return bool(self._queue)

    def flush(self) -> None:
        """Send everything queued before this call returns."""
        with self._send_lock:
            while True:
                with self._cond:
                    batch = self._queue[:SEND_BATCH]
                    del self._queue[:SEND_BATCH]
                if not batch:
                    return
                self._send(batch)

    def close(self) -> None:
        self.flush()
        with self._cond:
            self._closed = True
            self._cond.notify()
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

    def _send(self, batch: list[Op]) -> None:
        """Send a batch, waiting out a Redis outage for up to SEND_PATIENCE seconds (what is
        sent is idempotent: the routing script drops a call id it has already routed)."""
        deadline = time.monotonic() + SEND_PATIENCE
        delay = 0.05
        while True:
            try:
                self._attempt(batch)
                return
            except (*_REDIS_ERRORS, OSError) as e:
                if time.monotonic() + delay > deadline:
                    err = self._unavailable(e)
                    for op in batch:
                        op.on_error(err)
                    return
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
                    self._bus.load_scripts()
                    op.add(client)
            except (redis.exceptions.ResponseError, redis.exceptions.DataError) as e:
                op.on_error(BusagentError(f"Redis refused a command: {e}"))
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
                    op.on_error(BusagentError(f"Redis refused a command: {bad[0]}"))
            if not retry:
                return
            self._bus.load_scripts()
            batch = retry

    def _unavailable(self, e: BaseException) -> RedisUnavailable:
        return RedisUnavailable(
            f"could not send to Redis at {self._bus.url_for_humans}: {e}; check the URL "
            "(BUSAGENT_REDIS_URL) and that the server is up"
        )


class Bus:
    """One process's connection to the bus. ``busagent.init()`` makes the process-wide one."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.keys = Keys(settings.prefix)
        self._embedded: embedded.Server | None = None
        #: child worker processes this program started (busagent.spawn), made on first need.
        self.children: Children | None = None
        #: the snapshot of live servers that placing new agents reads (busagent.placement).
        self.placement: Placement = Placement()
        #: the worker this process serves as, set by the worker: its own model config
        #: overrides come first (busagent.models.get); None in a calling program.
        self.server_name: str | None = None
        self._async: dict[int, aredis.Redis] = {}
        url = settings.redis_url or embedded.shared_url()
        if url is None:
            self._embedded = embedded.start()
            url = self._embedded.url
        self.url = url
        self.redis = connect(url, settings)
        try:
            self.redis.ping()
        except redis.exceptions.AuthenticationError as e:
            self.close()
            raise RedisUnavailable(
                f"Redis at {self.url_for_humans} refused the credentials: {e}; put user:password "
                "in the URL (redis://user:password@host:port/0)"
            ) from None
        except (redis.exceptions.RedisError, OSError) as e:
            self.close()
            raise RedisUnavailable(
                f"cannot reach Redis at {self.url_for_humans}: {e}; start it, fix "
                "BUSAGENT_REDIS_URL, or unset it to use the embedded Redis"
            ) from None
        self.caller = f"{socket.gethostname()}:{os.getpid()}"
        self.sha: dict[str, str] = {}
        self.load_scripts()
        self.sender = Sender(self)

    @property
    def url_for_humans(self) -> str:
        """The URL without its password, for error messages."""
        from urllib.parse import urlsplit

        parts = urlsplit(self.url)
        if parts.password:
            return self.url.replace(f":{parts.password}@", ":***@")
        return self.url

    @contextlib.contextmanager
    def errors(self) -> Iterator[None]:
        """Translate redis-py's exceptions raised inside the block into busagent's (the one
        boundary where they are translated): a caller catches BusagentError, never redis's."""
        try:
            yield
        except redis.exceptions.RedisError as e:
            raise self.translate(e) from None
        except OSError as e:
            raise self.translate(e) from None

    def translate(self, e: BaseException) -> BusagentError:
        """The busagent error for a redis-py (or socket) error: RedisUnavailable when Redis
        cannot be reached or refuses us, BusError when it refused one command."""
        where = self.url_for_humans
        if isinstance(e, redis.exceptions.AuthenticationError):
            return RedisUnavailable(f"Redis at {where} refused the credentials: {e}; put "
                                    "user:password in the URL (redis://user:password@host:port/0)")
        if isinstance(e, redis.exceptions.NoPermissionError):
            return RedisUnavailable(f"Redis at {where} refused a command to this user: {e}; "
                                    "grant the ACL the README lists")
        if isinstance(e, (*_REDIS_ERRORS, OSError)):
            return RedisUnavailable(f"lost Redis at {where}: {e}; check that it is up and the "
                                    "URL (BUSAGENT_REDIS_URL)")
        return BusError(f"Redis at {where} refused a command: {e}")

    def load_scripts(self) -> None:
        self.sha = {n: str(self.redis.script_load(src)) for n, src in LUA.items()}

    def script(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """Run one of busagent's Lua scripts (reloading it if Redis restarted empty)."""
        try:
            return self.redis.evalsha(self.sha[name], len(keys), *keys, *args)
        except redis.exceptions.NoScriptError:
            self.load_scripts()
            return self.redis.evalsha(self.sha[name], len(keys), *keys, *args)

    # --- async client, one per event loop -------------------------------------------------

    def async_client(self) -> aredis.Redis:
        loop = asyncio.get_running_loop()
        client = self._async.get(id(loop))
        if client is None:
            client = aconnect(self.url, self.settings, max_connections=512)
            self._async[id(loop)] = client
        return client

    def set_aredis(self, client: aredis.Redis) -> None:
        self._async[id(asyncio.get_running_loop())] = client

    # --- sending ------------------------------------------------------------------------------

    def check_size(self, body: bytes, what: str) -> None:
        if len(body) > self.settings.max_message_bytes:
            raise MessageTooLarge(
                f"{what} is {len(body):,} bytes encoded, over max_message_bytes="
                f"{self.settings.max_message_bytes:,}; send a reference (a URL or a Redis key) "
                "instead, or raise BUSAGENT_MAX_MESSAGE_BYTES on callers and workers alike"
            )

    def route(self, agent_id: str, call_id: str, kind: str, body: bytes,
              on_error: Callable[[BaseException], None]) -> None:
        """Queue a call to an agent (routed by its registry record)."""
        self.route_many([call_id], [agent_id], kind, body, lambda _ids, e: on_error(e))

    def route_many(self, call_ids: Sequence[str], agent_ids: Sequence[str], kind: str,
                   body: bytes, on_error: Callable[[list[str], BaseException], None]) -> None:
        """Queue one call body to many agents (route.lua: a thousand calls a script call)."""
        keys, secret = self.keys, self.settings.secret
        for i in range(0, len(call_ids), SEND_BATCH):
            chunk = [[c, a, signature(secret, VERSION, c, a, kind, body)]
                     for c, a in zip(call_ids[i : i + SEND_BATCH], agent_ids[i : i + SEND_BATCH],
                                     strict=True)]
            packed = msgpack.packb(chunk, use_bin_type=False)  # Lua's cmsgpack: no bin type

            def add(pipe: Any, packed: bytes = packed) -> None:
                pipe.evalsha(self.sha["route"], 2, keys.agents, keys.servers,
                             keys.inbox_prefix, keys.reply_prefix, keys.sent_prefix,
                             self.settings.reply_ttl, VERSION, self.caller, kind, body, packed)

            ids = [c[0] for c in chunk]

            def failed(e: BaseException, ids: list[str] = ids) -> None:
                on_error(ids, e)

            self.sender.submit(Op(add, 1, failed, scripted=True))

    def send(self, add: Callable[[Any], None], ncmds: int,
             on_error: Callable[[BaseException], None]) -> None:
        self.sender.submit(Op(add, ncmds, on_error))

    def entry(self, call_id: str, agent_id: str, kind: str, body: bytes) -> dict[str, Any]:
        """The fields of a stream entry sent directly (not through the routing script)."""
        fields: dict[str, Any] = {"v": VERSION, "call": call_id, "agent": agent_id,
                                  "caller": self.caller, "kind": kind, "body": body}
        sig = signature(self.settings.secret, VERSION, call_id, agent_id, kind, body)
        if sig:
            fields["sig"] = sig
        return fields

    # --- resolving ----------------------------------------------------------------------------

    def _deadline(self, timeout: float | object | None) -> float | None:
        t = self.settings.call_timeout if timeout is _DEFAULT else timeout
        return None if t is None else time.monotonic() + float(t)  # type: ignore[arg-type]

    def fetch(self, call_ids: Sequence[str], timeout: float | object | None = None,
              errors: dict[str, BaseException] | None = None,
              take: bool = False) -> dict[str, bytes]:
        """Block until every call's reply is in Redis; return the raw replies. ``errors`` holds
        calls known to have failed before reaching Redis: they are skipped and reported by the
        caller. ``take``: delete each reply as it is read (the caller is its only reader)."""
        self.sender.flush()
        deadline = self._deadline(timeout)
        keys = self.keys
        out: dict[str, bytes] = {}
        pending = [c for c in dict.fromkeys(call_ids) if not (errors and c in errors)]
        outage = _Outage(self, deadline)
        while pending:
            try:
                if len(pending) > 1:  # one key: BLMOVE below returns at once if it is there
                    got = self._peek(pending, take)
                    out.update(got)
                    pending = [c for c in pending if c not in got]
                    if not pending:
                        break
                wait = self._slice(deadline, pending, out)
                # Wait on the newest: replies to a fan-out tend to arrive in order, so once it is
                # there most of the others are too, and one more peek collects them.
                last = pending[-1]
                key = keys.reply(last)
                # redis-py's hints say int; Redis takes fractional seconds since 6.0.
                data = (_popped(self.redis.blpop([key], wait)) if take
                        else self.redis.blmove(key, key, wait, "RIGHT", "LEFT"))  # type: ignore[arg-type]
                outage.over()
            except _REDIS_ERRORS as e:
                time.sleep(outage.backoff(e))
                continue
            if data is not None:
                out[last] = cast(bytes, data)
                pending = pending[:-1]
        return out

    def release(self, call_ids: Sequence[str]) -> None:
        """Delete replies nobody needs any more, before their ``reply_ttl``."""
        for i in range(0, len(call_ids), SEND_BATCH):
            self.redis.unlink(*[self.keys.reply(c) for c in call_ids[i : i + SEND_BATCH]])

    def _peek(self, call_ids: list[str], take: bool = False) -> dict[str, bytes]:
        got: dict[str, bytes] = {}
        for i in range(0, len(call_ids), PEEK_BATCH):
            chunk = call_ids[i : i + PEEK_BATCH]
            values = self.script("collect", [], [self.keys.reply_prefix, int(take), *chunk])
            got.update((c, v) for c, v in zip(chunk, values, strict=True) if v)
        return got

    async def _apeek(self, client: aredis.Redis, call_ids: list[str], take: bool
                     ) -> dict[str, bytes]:
        got: dict[str, bytes] = {}
        for i in range(0, len(call_ids), PEEK_BATCH):
            chunk = call_ids[i : i + PEEK_BATCH]
            args: list[Any] = [self.keys.reply_prefix, int(take), *chunk]
            try:
                values = await client.evalsha(self.sha["collect"], 0, *args)
            except redis.exceptions.NoScriptError:
                self.load_scripts()
                values = await client.evalsha(self.sha["collect"], 0, *args)
            got.update((c, v) for c, v in zip(chunk, values, strict=True) if v)
        return got

    def _slice(self, deadline: float | None, pending: list[str], done: dict[str, bytes]) -> float:
        wait = self.settings.block_slice
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise CallTimeout(
                    f"{len(pending)} of {len(pending) + len(done)} call(s) not answered in time "
                    f"(first: {pending[0]}); the agent may be busy or its worker down: see "
                    "`busagent servers`, or pass a longer timeout"
                )
            wait = min(wait, left)
        # BLMOVE takes a float timeout; 0 would mean forever.
        return max(wait, 0.001)

    async def afetch(self, call_ids: Sequence[str], timeout: float | object | None = None,
                     errors: dict[str, BaseException] | None = None,
                     take: bool = False) -> dict[str, bytes]:
        """:meth:`fetch` for asyncio code: the queue is flushed on the sender thread and the
        event loop is never blocked."""
        loop = asyncio.get_running_loop()
        if self.sender.queued():
            await loop.run_in_executor(None, self.sender.flush)
        client = self.async_client()
        deadline = self._deadline(timeout)
        keys = self.keys
        out: dict[str, bytes] = {}
        pending = [c for c in dict.fromkeys(call_ids) if not (errors and c in errors)]
        outage = _Outage(self, deadline)
        while pending:
            try:
                out.update(await self._apeek(client, pending, take))
                pending = [c for c in pending if c not in out]
                if not pending:
                    break
                wait = self._slice(deadline, pending, out)
                # Wait on the newest: replies to a fan-out tend to arrive in order, so once it is
                # there most of the others are too, and one more peek collects them.
                last = pending[-1]
                key = keys.reply(last)
                data = (_popped(await client.blpop([key], wait)) if take
                        else await client.blmove(key, key, wait, "RIGHT", "LEFT"))  # type: ignore[arg-type]
                outage.over()
            except _REDIS_ERRORS as e:
                await asyncio.sleep(outage.backoff(e))
                continue
            if data is not None:
                out[last] = cast(bytes, data)
                pending = pending[:-1]
        return out

    def close(self) -> None:
        sender = getattr(self, "sender", None)
        if sender is not None:
            sender.close()
        if self.children is not None:
            self.children.stop()
            self.children = None
        if hasattr(self, "redis"):
            self.redis.close()
        if self._embedded is not None:
            self._embedded.stop()
            self._embedded = None


_DEFAULT: Any = object()


class _Outage:
    """Waiting through a Redis outage: back off, keep trying until the caller's deadline, then
    say Redis was the problem (not the agent)."""

    def __init__(self, bus: Bus, deadline: float | None) -> None:
        self.bus = bus
        self.deadline = deadline
        self.delay = 0.05

    def over(self) -> None:
        self.delay = 0.05

    def backoff(self, e: BaseException) -> float:
        if self.deadline is not None and time.monotonic() + self.delay > self.deadline:
            raise RedisUnavailable(
                f"lost Redis at {self.bus.url_for_humans} while waiting for replies and it did "
                f"not come back before the deadline: {e}"
            ) from None
        d = self.delay
        self.delay = min(self.delay * 2, 1.0)
        return d


def _popped(got: Any) -> bytes | None:
    """The value of a BLPOP answer (``[key, value]`` or None)."""
    return None if got is None else cast(bytes, got[1])


def decode(data: bytes) -> Any:
    """A reply's value, or its error raised."""
    reply: Reply = unpack_reply(data)
    if reply.ok:
        return reply.value
    e = reply.error
    assert e is not None
    raise from_wire(e.type, e.message, e.traceback, e.server)


# --- the process-wide bus ------------------------------------------------------------------------

_bus: Bus | None = None
_lock = threading.Lock()


def init(redis_url: str | None = None, **settings: Any) -> Bus:
    """Connect this process to the bus: ``redis_url`` (or ``BUSAGENT_REDIS_URL``), else the
    shared embedded Redis that ``busagent redis`` started, else a private embedded Redis.
    Calling it again with other settings reconnects."""
    global _bus
    if loading_script:
        raise SkipStatement("busagent.init() while a worker loads a script")
    s = Settings.load(redis_url=redis_url, **settings)
    with _lock:
        if _bus is not None:
            if _bus.settings == s or (redis_url is None and not settings):
                return _bus
            _bus.close()
        _bus = Bus(s)
        return _bus


def current() -> Bus:
    """The process-wide bus, connecting with defaults on first use."""
    if _bus is not None:
        return _bus
    return init()


def install(bus: Bus) -> None:
    """Make ``bus`` the process-wide one (a worker does this with its own)."""
    global _bus
    with _lock:
        _bus = bus


def shutdown() -> None:
    """Flush pending sends, stop child workers and the private embedded Redis."""
    global _bus
    with _lock:
        if _bus is not None:
            _bus.close()
            _bus = None


atexit.register(shutdown)


__all__ = ["Bus", "ConfigError", "current", "decode", "init", "install", "new_id", "shutdown"]
