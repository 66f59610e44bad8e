"""The worker's registry record (``{p}:servers``): registering, heart-beating, fencing, sweeping
dead servers into recovery, and deregistering.

Fencing: once recovery declared this worker dead and moved its agents, ``heartbeat.lua`` refuses
its record; the worker must then stop and touch nothing of theirs (:attr:`Heartbeat.fenced`).

Clocks: the record's heartbeat is stamped with Redis's ``TIME`` by the script and judged against
Redis's time (:mod:`busagent.records`), so this host's clock plays no part in liveness. Each
beat also measures this host's offset from Redis's clock (:attr:`Heartbeat.clock`), which the
executor uses for the callers' relative deadlines.

Refused writes: while Redis refuses this worker's heartbeat (out of memory, a lost connection,
a restart) it refused its peers' too, so their records look stale through no fault of theirs.
The sweep therefore judges nobody until Redis has accepted this worker's own writes for a whole
``dead_after`` again (:meth:`Heartbeat.sweep`).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable, Sized
from typing import Any

import psutil
import redis

from busagent import records, scripts
from busagent.bus import Bus
from busagent.errors import BusError, ConfigError, UnknownAgent
from busagent.protocol import VERSION
from busagent.records import AgentInfo, RedisClock, ServerInfo
from busagent.tuning import RECOVERY_LOCK_MS

from . import recovery
from .hosting import forget, member_hashes

log = logging.getLogger("busagent.worker")


class Heartbeat:
    """The record of server ``server``: ``agents`` is the hosted agents (counted),
    ``inflight()`` the calls read and not answered, ``stopping`` set once a stop began,
    ``started`` epoch seconds, ``stats()`` the call counters' fields
    (:meth:`.stats.Stats.snapshot`)."""

    #: a child worker's program id (:data:`busagent.bus.PRIVATE_TO`): only it places here.
    private_to: str | None = None

    def __init__(self, bus: Bus, server: str, capacity: int, modules: list[str],
                 agents: Sized, inflight: Callable[[], int], stopping: threading.Event,
                 started: float, stats: Callable[[], dict[str, Any]] | None = None) -> None:
        self.bus = bus
        #: a child worker of a program: Redis gone at its stop is its parent stopping it
        self.quiet_gone = False
        self.r = bus.redis
        self.keys = bus.keys
        self.server = server
        self.capacity = capacity
        self.modules = modules
        self.agents = agents
        self.inflight = inflight
        self.stopping = stopping
        #: ``started`` is published by the Redis clock (:meth:`adopt` converts it); how long
        #: ago it was is counted on the monotonic clock, which no clock step changes.
        self.started = started
        self._started_mono = time.monotonic() - max(time.time() - started, 0.0)
        self.stats = stats
        #: others declared this worker dead and moved its agents: stop, touch nothing of theirs.
        self.fenced = False
        self.proc = psutil.Process()
        self.proc.cpu_percent(None)
        self._cpu_sampled = False
        #: this host's estimate of Redis's clock, re-measured at every beat.
        self.clock = RedisClock()
        #: monotonic time of the last heartbeat Redis refused (or could not take).
        self._refused_at = float("-inf")

    def info(self) -> ServerInfo:
        """This worker's record as of now."""
        # psutil's first sample covers start-up (imports, connecting): a spike that would
        # steer placement away from a worker that is in fact idle. Report it from the second.
        cpu = self.proc.cpu_percent(None)
        if not self._cpu_sampled:
            self._cpu_sampled, cpu = True, 0.0
        return ServerInfo(
            name=self.server, host=socket.gethostname(), pid=os.getpid(), started=self.started,
            cpu=cpu,
            mem=round(self.proc.memory_info().rss / 2**20, 1), agents=len(self.agents),
            inflight=self.inflight(), capacity=self.capacity, modules=list(self.modules),
            status="stopping" if self.stopping.is_set() else "up", version=VERSION,
            private_to=self.private_to, **(self.stats() if self.stats is not None else {}),
        )

    def adopt(self, rebuild: Callable[[Iterable[AgentInfo]], None]) -> None:
        """Take the name: BusagentError if a live worker has it. After a crash under this name,
        ``rebuild`` gets the agents still registered to it (before anything is read, so that
        its pending calls find them); then the record is written."""
        old = records.read_server(self.r, self.keys.servers, self.server)
        if old is not None:
            # On this host a dead pid is proof enough; elsewhere, trust the heartbeat's age.
            gone = old.host == socket.gethostname() and not psutil.pid_exists(old.pid)
            if old.alive(self.bus.settings.dead_after) and old.pid != os.getpid() and not gone:
                raise ConfigError(
                    f"a worker named {self.server!r} is already running (pid {old.pid} on "
                    f"{old.host}); pick another --name or stop it with `busagent stop "
                    f"{self.server}`"
                )
        deadline = time.monotonic() + RECOVERY_LOCK_MS / 1000
        while not recovery.lock(self.bus, self.server, self.server):
            if time.monotonic() > deadline:
                raise BusError(f"recovery of the previous {self.server!r} did not finish")
            time.sleep(0.2)  # another worker is moving our predecessor's agents: let it finish
        try:
            recovery.count_restart(self.bus, self.server)
            rebuild(recovery.agents_of(self.bus, self.server))
            self._stamp_started()
            self._write(adopt=True)
        finally:
            recovery.unlock(self.bus, self.server, self.server)

    def _stamp_started(self) -> None:
        """Restate ``started`` by the Redis clock (one ``TIME`` at registration), so that
        readers on any host compute the uptime by one clock (:meth:`ServerInfo.uptime`)."""
        sent = time.time()
        secs, micros = self.r.time()
        now = secs + micros / 1e6
        self.clock.update(now, sent, time.time())
        self.started = now - (time.monotonic() - self._started_mono)

    def announce(self) -> None:
        """Tell whoever started this worker that it serves (``{p}:ready:{server}``)."""
        self.r.rpush(self.keys.ready(self.server), "1")
        self.r.expire(self.keys.ready(self.server), 60)

    def _write(self, adopt: bool = False) -> bool:
        sent = time.time()
        ok, now = scripts.heartbeat(self.bus.scripts, self.keys, self.server,
                                    self.info().model_dump_json(exclude={"heartbeat"}), adopt)
        self.clock.update(now, sent, time.time())
        return ok

    def beat(self) -> bool:
        """Write the record; False once fenced (then it is never written again). Raises
        redis-py's error when Redis refused it (remembered: see :meth:`sweep`)."""
        if self.fenced:
            return False
        try:
            ok = self._write()
        except (redis.exceptions.RedisError, OSError):
            self._refused_at = time.monotonic()
            raise
        if not ok:
            log.error("worker %s was declared dead and its agents moved elsewhere; stopping",
                      self.server)
            self.fenced = True
        return bool(ok)

    def judging(self) -> bool:
        """Whether this worker may judge others' liveness (servers, programs): not within
        ``dead_after`` of a heartbeat of ours that Redis refused, since theirs were refused
        alike."""
        return time.monotonic() - self._refused_at >= self.bus.settings.dead_after

    def sweep(self) -> None:
        """Recover servers that stopped heart-beating; drop their records once empty and old.
        Judges nobody within ``dead_after`` of a heartbeat of ours that Redis refused: the
        others' heartbeats were refused alike, and a record's age then says nothing."""
        if not self.judging():
            return
        for info in records.read_servers(self.r, self.keys.servers):
            if info.name == self.server or self.stopping.is_set():
                continue
            if recovery.needs_recovery(self.bus, info):
                recovery.recover(self.bus, info.name, self.server)
            elif (info.status == "dead" and info.agents == 0
                  and info.age() > self.bus.settings.sweep_after):
                log.info("sweeping dead server %s", info.name)
                self.r.hdel(self.keys.servers, info.name)

    def deregister(self) -> None:
        """Remove this server, and the agents still registered to it (drained ones were moved
        and are no longer ours). Calls nobody read before the stop are answered UnknownAgent."""
        inbox = self.keys.inbox(self.server)
        try:
            recovery.answer(self.bus, inbox, recovery.entries(self.bus, inbox),
                            UnknownAgent(f"server {self.server} stopped before running the call "
                                         "(stop with --drain to move agents instead)"),
                            self.server)
            gone = [a.id for a in recovery.agents_of(self.bus, self.server)]
            hubs = member_hashes(self.r, self.keys) if gone else []
            pipe = self.r.pipeline(transaction=True)
            pipe.hdel(self.keys.servers, self.server)
            pipe.delete(self.keys.restarts(self.server))
            forget(pipe, self.keys, gone, hubs)
            pipe.execute()
        except redis.exceptions.RedisError as e:
            quiet = self.quiet_gone and isinstance(e, redis.exceptions.ConnectionError)
            log.log(logging.DEBUG if quiet else logging.WARNING,
                    "could not deregister %s: %s", self.server, e)
