"""The connection to the bus from any process: settings, Redis clients, and the process-wide bus.

A :class:`Bus` holds the connection and its typed collaborators: ``scripts`` (the Lua scripts,
:mod:`busagent.scripts`) and ``sender`` (the group-commit send queue, :mod:`busagent.sender`).
Replies are read through :mod:`busagent.replies`; what travels is :mod:`busagent.protocol`.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import logging
import os
import signal
import socket
import sys
import sysconfig
import threading
import traceback
import warnings
import weakref
from collections.abc import AsyncGenerator, Callable, Iterator
from contextvars import ContextVar
from types import TracebackType
from typing import TYPE_CHECKING, Any

import redis
import redis.asyncio as aredis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from . import embedded, records, tracing
from .config import Settings
from .errors import BusagentError, BusError, ConfigError, RedisUnavailable, SkipStatement
from .ids import new_id
from .keys import Keys
from .placement import Placement  # a leaf: it imports bus.py only for type checking
from .programs import Owner  # imports bus.py only for type checking
from .scripts import Scripts
from .sender import REDIS_DOWN, Sender

if TYPE_CHECKING:
    from .spawn import Children  # spawn imports bus.py at run time

#: set by a program in the environment of the child workers it starts (busagent.spawn): the
#: program id they are private to.
PRIVATE_TO = "BUSAGENT_PRIVATE_TO"

#: set while a worker loads a user's script (see :func:`busagent.worker.load.load_script`): a
#: context variable, so it holds for the loading thread only, never for the worker's others.
loading_script: ContextVar[bool] = ContextVar("busagent_loading_script", default=False)


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


class Bus:
    """One process's connection to the bus. ``busagent.init()`` makes the process-wide one."""

    def __init__(self, settings: Settings, max_connections: int | None = None) -> None:
        """``max_connections``: of the blocking client's pool (redis-py's default, 100, for a
        calling program; a worker needs one per thread that may block)."""
        self.settings = settings
        self.keys = Keys(settings.prefix)
        tracing.configure(settings.tracing)
        self._embedded: embedded.Server | None = None
        #: child worker processes this program started (busagent.spawn), made on first need.
        self.children: Children | None = None
        #: the snapshot of live servers that placing new agents reads (busagent.placement).
        self.placement: Placement = Placement()
        #: every server record, for long waits asking whether their agents can still run
        #: (busagent.replies); shared so that many waits read the servers hash once.
        self.server_snapshot = records.Snapshot()
        #: the worker this process serves as, set by the worker: its own model config
        #: overrides come first (busagent.models.get); None in a calling program.
        self.server_name: str | None = None
        #: set by a worker: entered around a blocking wait for replies made on one of its
        #: threads (a nested call's ``.content``), so the pool lends the thread's place to
        #: another (busagent.worker.process); None in a calling program.
        self.blocking: Callable[[], contextlib.AbstractContextManager[None]] | None = None
        #: id(loop) -> (the loop, weakly; its client and the generator that closes the client
        #: when the loop shuts down, or None when those are held by the loop itself (_ON_LOOP)).
        self._async: dict[int, tuple[weakref.ref[asyncio.AbstractEventLoop], _Held | None]] = {}
        url = settings.redis_url or embedded.shared_url()
        if url is None:
            self._embedded = embedded.start()
            url = self._embedded.url
            _announce_private(url)
        self.url = url
        try:
            extra = {} if max_connections is None else {"max_connections": max_connections}
            self.redis = connect(url, settings, **extra)
        except ValueError as e:  # redis-py's URL parser
            self.close()
            raise ConfigError(f"bad Redis URL {self.url_for_humans!r}: {e}") from None
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
        self._own_program()
        try:
            #: Redis's maxmemory-policy ("" if it does not say): see :meth:`eviction_problem`.
            self.eviction_policy = ""
            with contextlib.suppress(redis.exceptions.ResponseError):  # INFO not allowed: trust
                self.eviction_policy = str(
                    self.redis.info("memory").get("maxmemory_policy", ""))
            self.scripts = Scripts(self.redis)
        except (redis.exceptions.RedisError, OSError) as e:  # e.g. an ACL without SCRIPT LOAD
            self.close()
            raise self.translate(e) from None
        self.sender = Sender(self)

    def eviction_problem(self) -> str | None:
        """What is wrong with Redis's eviction policy for busagent, or None if nothing is.

        Only ``noeviction`` is safe: any other policy lets Redis drop keys silently when it is
        full: ``allkeys-*`` the registry, specs, inboxes and memories (every call then says the
        agent is unknown), ``volatile-*`` replies before they are read and recovery locks. A
        full Redis under ``noeviction`` refuses writes instead, which busagent reports (and
        survives). One INFO at connect; a Redis that does not report its policy is trusted."""
        policy = self.eviction_policy
        if policy in ("", "noeviction"):
            return None
        return (f"Redis at {self.url_for_humans} has maxmemory-policy {policy}: when full it "
                "silently evicts busagent's data (registry, inboxes, replies, memories); set "
                "`maxmemory-policy noeviction` (CONFIG SET maxmemory-policy noeviction, and in "
                "redis.conf); see the README's 'Redis settings'")

    def _own_program(self) -> None:
        #: this program's id: it owns the agents it creates (busagent.programs).
        self.program = new_id()
        #: names, listings and deletion are scoped by it; anonymous: this program's own.
        self.namespace = self.settings.namespace or f"anon-{self.program}"
        #: which private child workers this process may place agents on: its own, or, in a
        #: child worker, its program's (so agents creating agents stay in that program).
        self.private_to = os.environ.get(PRIVATE_TO) or self.program
        self.owner = Owner(self)

    @property
    def private(self) -> bool:
        """Whether this bus is on a private Redis this process started (and stops at exit)."""
        return self._embedded is not None

    def where(self) -> str:
        """For errors about a server or worker that cannot be found: "" on a reachable Redis,
        else why no worker started elsewhere can be there."""
        if not self.private:
            return ""
        return (" (this program is on a private Redis it started itself, which workers in "
                "other shells cannot see: run `busagent redis` first, or set "
                "BUSAGENT_REDIS_URL)")

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
        except BusagentError:
            raise  # already ours (CallTimeout and RedisUnavailable are OSErrors too)
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
        # Inside a Lua script Redis wraps a refusal ("ERR Error running script ... -OOM ..."),
        # so redis-py sees a plain ResponseError: look at the text too.
        text = str(e)
        if isinstance(e, redis.exceptions.NoPermissionError) or "NOPERM" in text:
            return RedisUnavailable(f"Redis at {where} refused a command to this user (ACL): "
                                    f"{e}; grant the ACL the README lists (Access control)")
        if isinstance(e, redis.exceptions.OutOfMemoryError) or "OOM command not allowed" in text:
            return BusError(f"Redis at {where} is out of memory and refuses writes (maxmemory "
                            f"reached under maxmemory-policy noeviction): {e}; raise maxmemory or "
                            "free memory (a shorter reply_ttl, gather(release=True), deleting "
                            "agents); replies already written can still be read")
        if isinstance(e, redis.exceptions.ReadOnlyError):
            return BusError(f"Redis at {where} is a read-only replica: {e}; point "
                            "BUSAGENT_REDIS_URL at the primary")
        if isinstance(e, redis.exceptions.ResponseError) and "MISCONF" in text:
            return BusError(f"Redis at {where} refuses writes because it cannot save to disk: "
                            f"{e}; fix its disk or persistence settings")
        if isinstance(e, (*REDIS_DOWN, OSError)):
            return RedisUnavailable(f"lost Redis at {where}: {e}; check that it is up and the "
                                    "URL (BUSAGENT_REDIS_URL)")
        return BusError(f"Redis at {where} refused a command: {e}")

    # --- async clients, one per live event loop --------------------------------------------

    def async_client(self) -> aredis.Redis:
        """This event loop's client. A client belongs to its loop, so each loop gets one; it is
        closed while its loop shuts down (``asyncio.run`` closes async generators before it closes
        the loop: a parked generator's ``finally`` closes the client there), and a loop closed
        without that (``loop.close()`` alone) is forgotten at the next call. The client is held
        by its loop, this bus keeps only a weak reference: a loop dropped without being closed
        (``del loop``) is collected with its client and connections. So a process that runs
        thousands of loops holds one client per loop still alive, not one per loop ever made."""
        loop = asyncio.get_running_loop()
        held = self._held(loop)
        if held is not None:
            return held[0]
        self._forget_closed_loops()
        client = aconnect(self.url, self.settings, max_connections=512)
        self._adopt(loop, client)
        return client

    def set_aredis(self, client: aredis.Redis) -> None:
        self._forget_closed_loops()
        self._adopt(asyncio.get_running_loop(), client)

    def async_clients(self) -> int:
        """How many event loops' clients this bus holds (for tests and diagnosis)."""
        self._forget_closed_loops()
        return len(self._async)

    def _held(self, loop: asyncio.AbstractEventLoop) -> _Held | None:
        entry = self._async.get(id(loop))
        if entry is None or entry[0]() is not loop:
            return None
        if entry[1] is not None:
            return entry[1]
        on_loop: dict[int, _Held] = getattr(loop, _ON_LOOP, {})
        return on_loop.get(id(self))

    def _adopt(self, loop: asyncio.AbstractEventLoop, client: aredis.Redis) -> None:
        key = id(loop)
        ref = weakref.ref(loop)

        async def closer() -> AsyncGenerator[None, None]:
            try:
                yield
            finally:
                entry = self._async.get(key)
                if entry is not None and entry[0] is ref:
                    del self._async[key]
                with contextlib.suppress(Exception):
                    await client.aclose()

        gen = closer()
        # Start it by hand up to its yield (no await before it, so this step completes at once):
        # the running loop's first-iteration hook registers it for shutdown_asyncgens().
        step: Any = gen.__anext__()
        with contextlib.suppress(StopIteration):
            step.send(None)
        held: _Held = (client, gen)
        try:
            # On the loop, not here: the client's connections reference their loop, so a strong
            # reference from this bus would keep every loop ever made alive (and connected).
            # Held by the loop, loop and client form a cycle the collector frees together.
            on_loop = loop.__dict__.setdefault(_ON_LOOP, {})
            on_loop[id(self)] = held
            self._async[key] = (ref, None)
        except AttributeError:  # a loop without a __dict__ (uvloop): held here, as before
            self._async[key] = (ref, held)

    def _forget_closed_loops(self) -> None:
        for key, (ref, _) in list(self._async.items()):
            loop = ref()
            if loop is None or loop.is_closed():
                self._async.pop(key, None)

    def after_fork(self) -> None:
        """In a forked child: keep the connection settings, own nothing of the parent's. The
        child workers and the private Redis stay the parent's (a child's exit must not stop
        them), the parent's event loops do not run here, and sends go out before each call
        returns (:meth:`Sender.after_fork`). redis-py's pool opens new connections by itself."""
        self.children = None
        self._embedded = None
        # A program of its own (its exit must not end the parent's agents), in the parent's
        # namespace and placing on the parent's child workers, like the rest of the parent.
        self.program = new_id()
        self.owner = Owner(self)
        # The parent's loops' clients are not used here; kept referenced (never collected), so
        # their closing generators are not finalized here through the parent's loops.
        self._forked_from = [(r(), held) for r, held in self._async.values()]
        self._async = {}
        self.sender.after_fork()

    def close(self) -> None:
        sender = getattr(self, "sender", None)
        if sender is not None:
            sender.close()
        owner = getattr(self, "owner", None)
        if owner is not None and hasattr(self, "redis"):
            owner.end()  # before the child workers stop: their agents are ours too
        if self.children is not None:
            # Before the Redis they use, and waited for: none may outlive it and print.
            self.children.stop(announce=not _told_interrupt)
            self.children = None
            if owner is not None:
                owner.tidy()
        if hasattr(self, "redis"):
            self.redis.close()
        if self._embedded is not None:
            self._embedded.stop()
            self._embedded = None


#: (a loop's client, the generator that closes it when the loop shuts down)
_Held = tuple[aredis.Redis, AsyncGenerator[None, None]]
#: the attribute of an event loop that holds its clients: {id(bus): _Held}
_ON_LOOP = "_busagent_clients"


# --- the process-wide bus ------------------------------------------------------------------------

_bus: Bus | None = None
#: the settings of the last init(), kept when connecting failed: a later call reconnects with
#: them (and fails the same way) instead of quietly using another Redis.
_wanted: Settings | None = None
_lock = threading.Lock()


def init(redis_url: str | None = None, **settings: Any) -> Bus:
    """Connect this process to the bus: ``redis_url`` (or ``BUSAGENT_REDIS_URL``), else the
    shared embedded Redis that ``busagent redis`` started, else a private embedded Redis.
    Calling it again with other settings reconnects."""
    if loading_script.get():
        raise SkipStatement("busagent.init() while a worker loads a script")
    s = Settings.load(redis_url=redis_url, **settings)
    parent = _inherited()
    if parent is not None:
        if s.redis_url is None and not settings:
            s = parent
        elif s.namespace is None:
            # A multiprocessing child of a program is that program's, whatever URL it names:
            # it shares the parent's namespace (an anonymous one included) unless given one.
            s = s.model_copy(update={"namespace": parent.namespace})
    with _lock:
        if _bus is not None and (_bus.settings == s or (redis_url is None and not settings)):
            return _bus
        return _connect(s)


def _connect(s: Settings) -> Bus:
    """Replace the process-wide bus by one on ``s`` (called with ``_lock`` held). Raises
    RedisUnavailable or ConfigError, leaving no bus (never the previous one, closed)."""
    global _bus, _wanted
    if _bus is not None:
        _bus.close()
        _bus = None
    _wanted = s
    _bus = Bus(s)
    os.environ[_INHERIT] = json.dumps({
        "pid": os.getpid(),
        "settings": s.model_copy(update={"redis_url": _bus.url, "namespace": _bus.namespace}
                                 ).model_dump(mode="json")})
    # A calling program's Ctrl-C gets one line (workers handle SIGINT themselves and call
    # install(), not this). Only over Python's own hook: IPython's or the user's stay.
    if sys.excepthook is sys.__excepthook__:
        sys.excepthook = _excepthook
    problem = _bus.eviction_problem()
    if problem:
        # A caller warns (loudly, once) and goes on: it may only read, and refusing would stop
        # dashboards too. Workers, which hold the data, refuse to start (worker/process.py).
        logging.getLogger("busagent").warning("%s", problem)
        warnings.warn(problem, RuntimeWarning, stacklevel=3)
    return _bus


def current() -> Bus:
    """The process-wide bus: connecting on first use with the settings of the last
    :func:`init` (even one that failed: RedisUnavailable again rather than another Redis), or
    with the defaults if it was never called."""
    if _bus is not None:
        return _bus
    if _wanted is None:
        return init()
    with _lock:
        return _bus if _bus is not None else _connect(_wanted)


def install(bus: Bus) -> None:
    """Make ``bus`` the process-wide one (a worker does this with its own)."""
    global _bus
    with _lock:
        _bus = bus


def shutdown() -> None:
    """Flush pending sends, stop child workers and the private embedded Redis. A later call
    connects afresh, as on first use."""
    global _bus, _wanted
    with _uninterrupted(), _lock:
        _wanted = None
        with contextlib.suppress(ValueError, KeyError, TypeError, AttributeError):
            if json.loads(os.environ.get(_INHERIT, ""))["pid"] == os.getpid():
                del os.environ[_INHERIT]
        if _bus is not None:
            _bus.close()
            _bus = None


@contextlib.contextmanager
def _uninterrupted() -> Iterator[None]:
    """SIGINT ignored meanwhile (main thread only: signal handlers live there). A shutdown cut
    half-way by another Ctrl-C would leave child workers running on a Redis it then never
    stops (they print its loss after the prompt) and its folder behind; one that finishes
    takes a few seconds at most (CHILD_STOP_WAIT bounds it), so an impatient user's further
    presses change nothing, as in Celery's warm shutdown made cold only by SIGQUIT."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    try:
        old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:  # not the main interpreter
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


#: How a program's bus reaches its ``multiprocessing`` children started with ``spawn`` or
#: ``forkserver``: they start afresh (a forked child inherits the process-wide bus itself), and
#: without this would connect to whatever the defaults find (a private Redis of their own, where
#: the parent's agents are not). Holds the exporting process's pid: only that process's own
#: multiprocessing children take it, not other programs it runs or their children.
_INHERIT = "BUSAGENT_PARENT_BUS"


def _inherited() -> Settings | None:
    """The parent's settings, in a multiprocessing child of a program on the bus."""
    raw = os.environ.get(_INHERIT)
    if not raw:
        return None
    import multiprocessing  # only here: most programs never get this far

    parent = multiprocessing.parent_process()
    try:
        data = json.loads(raw)
        if parent is None or parent.pid != data["pid"]:
            return None
        return Settings.model_validate(data["settings"])
    except (ValueError, KeyError, TypeError):
        return None


_announced_private = False


def _announce_private(url: str) -> None:
    """Say once per process that it runs on a Redis of its own: a user who expected workers in
    another shell to see its agents learns why they do not, at the start."""
    global _announced_private
    if not _announced_private:
        _announced_private = True
        print(f"busagent: no BUSAGENT_REDIS_URL and no `busagent redis` running: started a "
              f"private Redis for this program ({url}), stopped when it exits", file=sys.stderr,
              flush=True)


#: set once the Ctrl-C line is printed, which already says what the exit waits for.
_told_interrupt = False


def _user_frame(tb: TracebackType | None) -> str:
    """``file:line`` of the innermost frame of ``tb`` in the user's code (not busagent's, the
    standard library's or an installed package's), else of the outermost frame."""
    skip = (os.path.dirname(__file__), *{sysconfig.get_paths()[k] for k in ("stdlib", "purelib",
                                                                              "platlib")})
    where = ""
    for frame, line in traceback.walk_tb(tb):
        name = frame.f_code.co_filename
        if not where or not name.startswith(skip):
            where = f"{os.path.basename(name)}:{line}"
    return where


def _excepthook(kind: type[BaseException], value: BaseException,
                tb: TracebackType | None) -> None:
    """Ctrl-C in a program on the bus: one line that says where it stopped and what the exit
    still does, instead of a traceback through busagent's wait loop."""
    global _told_interrupt
    if not issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, value, tb)
        return
    owned = []
    b = _bus
    if b is not None and b.children is not None and b.children.procs:
        owned.append(f"its {len(b.children.procs)} child worker(s)")
    if b is not None and b._embedded is not None:
        owned.append("its private Redis")
    then = f"; stopping {' and '.join(owned)}" if owned else ""
    print(f"busagent: interrupted (Ctrl-C) at {_user_frame(tb)}{then}", file=sys.stderr,
          flush=True)
    _told_interrupt = True
    if not hasattr(sys, "ps1") and not sys.flags.interactive:
        # The program is ending (an interactive session is not: it keeps its Ctrl-C): a second
        # press before the exit's shutdown starts would cut it, as one during it would.
        with contextlib.suppress(ValueError):
            signal.signal(signal.SIGINT, signal.SIG_IGN)


def _after_fork_in_child() -> None:
    global _lock
    # The lock may have been held, at the fork, by a thread that does not exist here.
    _lock = threading.Lock()
    if _bus is not None:
        _bus.after_fork()


atexit.register(shutdown)
os.register_at_fork(after_in_child=_after_fork_in_child)


__all__ = ["Bus", "ConfigError", "current", "init", "install", "new_id", "shutdown"]
