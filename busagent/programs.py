"""Programs, namespaces and names: who owns an agent, and finding an agent by its name.

A program (any process with a :class:`~busagent.bus.Bus`: a script, a worker whose agents create
agents) owns the agents it creates unless they are ``lifetime="detached"`` (Ray's rule). From
its first owned agent on it heart-beats: ``{p}:program:{id}`` is renewed every ``heartbeat``
seconds with a TTL of ``PROGRAM_TTL_BEATS`` heartbeats, so Redis's own clock decides when a
program that stopped renewing is gone (no host's clock is compared). It is listed in
``{p}:programs``, and its agents' ids are kept in ``{p}:owned:{id}``. A normal exit deletes the
key at once; a killed program's key expires. Either way the workers' sweep
(:mod:`busagent.worker.owners`) then deletes the owned agents, memory and keys included.

Names (``DistConf(name=...)``) live in ``{p}:names:{namespace}`` and are reserved in the same
atomic step that creates the agent (``name.lua``). A name whose agent is gone is free again.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import TYPE_CHECKING

from .errors import UnknownAgent
from .records import AgentInfo, ProgramInfo
from .tuning import PROGRAM_TTL_BEATS, SWEEP_BATCH

if TYPE_CHECKING:
    from .bus import Bus
    from .proxy import RemoteAgent

log = logging.getLogger("busagent")


class Owner:
    """One program's ownership record and the thread that renews it (started on first need)."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        #: set by end(): the program had owned agents and has ended.
        self._ended = False

    @property
    def ttl_ms(self) -> int:
        return int(self.bus.settings.heartbeat * PROGRAM_TTL_BEATS * 1000)

    def ensure(self) -> str:
        """This program's id, heart-beating from now on (the first call writes the record and
        its liveness key before returning, so no sweep can find an owned agent of a program
        that has not announced itself). One round trip, once per program."""
        if self._thread is not None:
            return self.bus.program
        with self._lock:
            if self._thread is None:
                b = self.bus
                info = ProgramInfo(id=b.program, namespace=b.namespace,
                                   host=socket.gethostname(), pid=os.getpid(),
                                   started=time.time())
                with b.errors():
                    pipe = b.redis.pipeline(transaction=True)
                    pipe.hset(b.keys.programs, b.program, info.model_dump_json())
                    pipe.set(b.keys.program(b.program), "1", px=self.ttl_ms)
                    pipe.execute()
                t = threading.Thread(target=self._beat, name="busagent-program", daemon=True)
                t.start()
                self._thread = t
        return self.bus.program

    def _beat(self) -> None:
        b = self.bus
        key = b.keys.program(b.program)
        while not self._stop.wait(b.settings.heartbeat):
            try:
                # XX: should the key have expired (Redis away longer than the TTL, the process
                # frozen), the owned agents are being swept; say so once rather than pretend.
                if not b.redis.set(key, "1", px=self.ttl_ms, xx=True):
                    log.warning("busagent: this program's liveness expired; workers delete the "
                                "agents it owned (create detached agents to keep them)")
                    b.redis.set(key, "1", px=self.ttl_ms)
            except Exception as e:  # noqa: BLE001 - Redis away: retried at the next beat
                log.debug("program heartbeat failed: %s", e)

    def end(self) -> None:
        """The program exits: stop renewing and drop the key at once, so the workers' next
        sweep deletes its agents (not a TTL later)."""
        t = self._thread
        if t is None:
            return
        self._ended = True
        self._stop.set()
        t.join(timeout=2)
        self._thread = None
        try:
            self.bus.redis.delete(self.bus.keys.program(self.bus.program))
        except Exception as e:  # noqa: BLE001 - Redis away: the key expires by itself
            log.debug("could not end program record: %s", e)


    def tidy(self) -> None:
        """After the program's own child workers stopped (deleting the agents they hosted):
        when nothing it owned is left, remove its entry and owned set now, as nobody else may
        sweep them (a program alone on a Redis with its child workers). Otherwise the
        workers' sweep does it. At most two round trips, at exit only."""
        b = self.bus
        if not self._ended:
            return
        owned = b.keys.owned(b.program)
        try:
            ids = b.redis.srandmember(owned, SWEEP_BATCH) or []
            if b.redis.scard(owned) > len(ids):
                return
            if ids and any(r is not None for r in b.redis.hmget(b.keys.agents, ids)):
                return
            pipe = b.redis.pipeline(transaction=True)
            pipe.hdel(b.keys.programs, b.program)
            pipe.delete(owned)
            pipe.execute()
        except Exception as e:  # noqa: BLE001 - Redis away: the workers' sweep does it
            log.debug("could not tidy program record: %s", e)


def named(b: Bus, namespace: str, name: str) -> AgentInfo | None:
    """The record of the agent registered as ``name`` in ``namespace``, or None. Two round
    trips (the name, then the record; a name whose agent is gone counts as absent)."""
    with b.errors():
        agent_id = b.redis.hget(b.keys.names(namespace), name)
        if agent_id is None:
            return None
        raw = b.redis.hget(b.keys.agents, agent_id)
    return None if raw is None else AgentInfo.model_validate_json(raw)


def get_agent(name: str, namespace: str | None = None) -> RemoteAgent:
    """The distributed agent registered as ``name`` (``DistConf(name=...)``) in ``namespace``
    (default: this program's, ``busagent.init(namespace=...)``), from any process: Ray's
    ``ray.get_actor``. Its class need not be imported here for ``agent(x)`` and
    ``agent.observe(x)``; ``@remote`` methods need it. Raises UnknownAgent if no live agent has
    that name there, ConfigError for a name that is not a string."""
    from . import bus as _bus
    from .errors import ConfigError
    from .proxy import RemoteAgent

    if not isinstance(name, str) or not name:
        raise ConfigError(f"get_agent: a name is a non-empty string, not {name!r}")
    b = _bus.current()
    ns = namespace if namespace is not None else b.namespace
    info = named(b, ns, name)
    if info is None:
        raise UnknownAgent(f"no agent named {name!r} in namespace {ns!r}; see `busagent agents "
                           f"--namespace {ns}`{b.where()}")
    return RemoteAgent.from_wire(info.id, info.name, info.cls, info.server)


__all__ = ["Owner", "get_agent", "named"]
