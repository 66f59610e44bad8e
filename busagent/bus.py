"""The connection to the bus from any process: settings, Redis clients, and the process-wide bus.

A :class:`Bus` holds the connection and its typed collaborators: ``scripts`` (the Lua scripts,
:mod:`busagent.scripts`) and ``sender`` (the group-commit send queue, :mod:`busagent.sender`).
Replies are read through :mod:`busagent.replies`; what travels is :mod:`busagent.protocol`.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import os
import socket
import threading
import warnings
from collections.abc import Iterator
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

import redis
import redis.asyncio as aredis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from . import embedded
from .config import Settings
from .errors import BusagentError, BusError, ConfigError, RedisUnavailable, SkipStatement
from .ids import new_id
from .keys import Keys
from .placement import Placement  # a leaf: it imports bus.py only for type checking
from .scripts import Scripts
from .sender import REDIS_DOWN, Sender

if TYPE_CHECKING:
    from .spawn import Children  # spawn imports bus.py at run time

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
        try:
            self.redis = connect(url, settings)
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
    with _lock:
        _wanted = None
        if _bus is not None:
            _bus.close()
            _bus = None


atexit.register(shutdown)


__all__ = ["Bus", "ConfigError", "current", "init", "install", "new_id", "shutdown"]
