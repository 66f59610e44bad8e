"""The registry's records as Redis holds them, and the one rule for "is this server alive?".

``{p}:servers`` maps a server name to a JSON :class:`ServerInfo`, ``{p}:agents`` an agent id to a
JSON :class:`AgentInfo` (``redis-cli HGETALL`` shows both). Workers write them; callers, the CLI
and other workers read them. This module imports nothing that starts processes, so the worker
can use it without the caller's placement code.

Liveness, everywhere, is :meth:`ServerInfo.state`. The Lua scripts apply the parts of it that
must be atomic with what they write, and say so here so the rules cannot drift apart:

* ``heartbeat.lua``: a record whose status is ``dead`` is not overwritten (the worker was fenced:
  others moved its agents). That is the ``dead`` state below, by status. The script stamps the
  record's ``heartbeat`` with Redis's own ``TIME``.

Clocks: a heartbeat's time and the "now" it is compared with both come from the one Redis
server's clock (``TIME``), never from two hosts' clocks, so a worker whose clock is minutes off
is judged like any other. Records are read with the Redis time in the same round trip
(:func:`read_servers`, :func:`read_server`), and :meth:`ServerInfo.state` compares with that.
* ``route.lua``: any record counts as a server to queue calls for, whatever its state: calls
  queued for a ``late`` or ``dead`` server are moved with its agents by recovery, in order.
"""

from __future__ import annotations

import time
from typing import Any, Literal

import redis
from pydantic import BaseModel, PrivateAttr

from .protocol import VERSION

State = Literal["up", "stopping", "late", "dead"]
#: the states of a server that takes new agents (and is a target for recovered ones).
LIVE: frozenset[State] = frozenset({"up", "late"})
#: upper bounds (seconds) of the buckets of a worker's call latency histogram; the last bucket,
#: one more than these, counts the slower calls (Prometheus' ``+Inf``).
LATENCY_BOUNDS: tuple[float, ...] = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                                     1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class AgentInfo(BaseModel):
    """The registry's record of one agent (``HGET {prefix}:agents <id>``)."""

    id: str
    name: str
    cls: str
    server: str
    #: epoch seconds, from the creating process's clock.
    created: float
    #: the namespace its registered name (if any) lives in, and the creator's namespace.
    namespace: str = ""
    #: the name it is registered under (``DistConf(name=...)``), unique in ``namespace``.
    registered: str | None = None
    #: the program that owns it (deleted when that program is gone); None: detached.
    owner: str | None = None


class RunningCall(BaseModel):
    """A call a worker is running now, as its heartbeat lists it."""

    call: str
    agent: str
    kind: str
    #: epoch seconds it started running, from the worker's clock.
    since: float


class ServerInfo(BaseModel):
    """The registry's record of one server (``HGET {prefix}:servers <name>``)."""

    name: str
    host: str
    pid: int
    #: epoch seconds by the Redis server's clock (the worker measures it with ``TIME`` when it
    #: registers, and counts its uptime before that on its monotonic clock), so that its age,
    #: :meth:`uptime`, never depends on two hosts' clocks agreeing.
    started: float
    #: epoch seconds of the last heartbeat by the Redis server's clock (``heartbeat.lua`` stamps
    #: it with ``TIME``), never the worker's own clock.
    heartbeat: float = 0.0
    #: percent of one core.
    cpu: float = 0.0
    #: resident memory in MiB.
    mem: float = 0.0
    agents: int = 0
    #: calls read and not yet answered.
    inflight: int = 0
    capacity: int
    modules: list[str] = []
    #: "up" while serving, "stopping" during a graceful stop, "dead" once recovery fenced it.
    status: str = "up"
    version: int = VERSION
    #: calls (call, observe, method, deliver) answered since the worker started, and how many
    #: of those answers were errors.
    calls: int = 0
    errors: int = 0
    #: answered calls per latency bucket (:data:`LATENCY_BOUNDS`, then slower), run to commit,
    #: and their total seconds.
    latency: list[int] = []
    latency_sum: float = 0.0
    #: calls answered per second over the last heartbeat interval.
    rate: float = 0.0
    #: the oldest calls running now (up to ``tuning.RUNNING_SHOWN``).
    running: list[RunningCall] = []
    #: a child worker private to this program id (only it places agents here); None: shared.
    private_to: str | None = None

    def serves(self, program: str | None) -> bool:
        """Whether ``program`` may place agents here: a shared server, or its own child."""
        return self.private_to is None or self.private_to == program

    #: the Redis server's time when this record was read (epoch seconds), or None for a record
    #: not read through :func:`read_servers` / :func:`read_server`.
    _seen: float | None = PrivateAttr(default=None)

    def age(self, now: float | None = None) -> float:
        """Seconds since the last heartbeat, by the Redis clock: ``now`` if given (a Redis
        time), else the Redis time at which the record was read. A record built in this process
        and never read from Redis falls back to the local clock."""
        if now is None:
            now = self._seen if self._seen is not None else time.time()
        return now - self.heartbeat

    def uptime(self, now: float | None = None) -> float:
        """Seconds since the worker started, by the Redis clock (``now`` as for :meth:`age`);
        never negative."""
        return max(self.age(now) + self.heartbeat - self.started, 0.0)

    def state(self, dead_after: float, now: float | None = None) -> State:
        """``dead``: fenced by recovery, or silent for ``dead_after`` seconds or more; ``late``:
        silent for over two heartbeats' worth of ``dead_after`` but not yet dead (callers still
        queue calls for it); ``stopping``: finishing a graceful stop; ``up``: serving. Ages are
        by the Redis clock (:meth:`age`)."""
        age = self.age(now)
        if self.status == "dead" or age >= dead_after:
            return "dead"
        if self.status == "stopping":
            return "stopping"
        return "late" if age > dead_after / 2 else "up"

    def alive(self, dead_after: float, now: float | None = None) -> bool:
        """Takes new agents: ``up`` or ``late``."""
        return self.state(dead_after, now) in LIVE


class ProgramInfo(BaseModel):
    """A program that owns agents (``HGET {prefix}:programs <id>``). It is alive while its key
    ``{p}:program:{id}`` exists (a Redis TTL it renews every heartbeat)."""

    id: str
    namespace: str
    host: str
    pid: int
    #: epoch seconds, from the program's clock (shown, never compared).
    started: float


def redis_uptime(r: Any) -> float:
    """Seconds the Redis server has been up (``INFO server``); infinite when it does not say (a
    proxy, a restricted INFO, an error): then callers judge by their other rules alone."""
    try:
        return float(r.info("server").get("uptime_in_seconds", float("inf")))
    except (redis.exceptions.RedisError, ValueError, TypeError):
        return float("inf")


def redis_time(reply: Any) -> float:
    """Epoch seconds from the answer of Redis ``TIME`` (redis-py's ``(seconds, microseconds)``)."""
    sec, usec = reply
    return int(sec) + int(usec) / 1e6


def parse_server(raw: bytes | str, seen: float | None = None) -> ServerInfo | None:
    """A server record, or None for a foreign or older one (shown by nobody, swept by workers).
    ``seen``: the Redis time it was read at."""
    try:
        info = ServerInfo.model_validate_json(raw)
    except ValueError:
        return None
    info._seen = seen
    return info


def read_servers(r: Any, key: str) -> list[ServerInfo]:
    """Every server record in the hash ``key``, by name, each knowing the Redis time it was read
    at (``TIME`` in the same round trip). Grows with servers, not agents."""
    pipe = r.pipeline(transaction=False)
    pipe.time()
    pipe.hvals(key)
    t, raws = pipe.execute()
    now = redis_time(t)
    out = [s for raw in raws if (s := parse_server(raw, now)) is not None]
    return sorted(out, key=lambda s: s.name)


def read_server(r: Any, key: str, name: str) -> ServerInfo | None:
    """One server's record (None if absent or unreadable), with the Redis time it was read at."""
    pipe = r.pipeline(transaction=False)
    pipe.time()
    pipe.hget(key, name)
    t, raw = pipe.execute()
    return None if raw is None else parse_server(raw, redis_time(t))


class RedisClock:
    """This process's estimate of the Redis server's clock: the local clock plus an offset
    measured from ``TIME`` (the worker re-measures it at every heartbeat). What a worker
    compares a call's relative deadline with, so that a host whose clock is minutes off still
    honours deadlines to within a round trip."""

    def __init__(self) -> None:
        #: Redis time minus local time (seconds); 0 until measured.
        self.offset = 0.0

    def update(self, redis_now: float, sent: float, received: float) -> None:
        """Record a ``TIME`` answer read between local times ``sent`` and ``received``."""
        self.offset = redis_now - (sent + received) / 2

    def now(self) -> float:
        """The Redis server's time now, estimated (epoch seconds)."""
        return time.time() + self.offset


def agents_of(r: Any, key: str, server: str) -> list[AgentInfo]:
    """The records in the agents hash ``key`` that name ``server`` (a full scan, paged)."""
    out = []
    for _, raw in r.hscan_iter(key, count=1000):
        info = AgentInfo.model_validate_json(raw)
        if info.server == server:
            out.append(info)
    return out


def _load(s: ServerInfo) -> float:
    """Agents hosted, weighted up by how busy the CPU is: spreads agents evenly over idle servers
    and steers new ones away from busy servers."""
    return (s.agents + 1) * (1 + s.cpu / 100)


def pick(candidates: list[ServerInfo], module: str, count: int = 1) -> ServerInfo | None:
    """The least loaded of ``candidates`` that loaded ``module`` and has room for ``count``
    more agents. The placement is counted on the record, so a burst of placements spreads
    before the next heartbeat reports the new numbers. Used for new agents and by recovery."""
    fits = [s for s in candidates if module in s.modules and s.agents + count <= s.capacity]
    if not fits:
        return None
    best = min(fits, key=_load)
    best.agents += count
    return best


class Snapshot:
    """One process's copy of every server record, re-read when older than ``max_age`` seconds:
    a thousand waits checking liveness at once cost one read of the servers hash, not a
    thousand. Not locked: two threads may both re-read (a round trip, not a wrong answer)."""

    def __init__(self) -> None:
        self.at = float("-inf")
        self.servers: list[ServerInfo] = []

    def get(self, r: Any, key: str, max_age: float) -> list[ServerInfo]:
        now = time.monotonic()
        if now - self.at > max_age:
            self.servers = read_servers(r, key)
            self.at = now
        return self.servers


def unhostable(r: Any, agents_key: str, servers: list[ServerInfo], agent_ids: list[str],
               dead_after: float) -> str | None:
    """Why a call to one of ``agent_ids`` cannot run now, or None: its server is dead (marked
    so by recovery, or silent for ``dead_after``: what recovery takes for dead too, so a caller
    learns it within a heartbeat of any worker; twice that made the caller of a call that killed
    every worker wait 2 x dead_after after the last death) and no live server in ``servers`` (a
    :class:`Snapshot`) loaded the agent's module with room for it, so recovery has nowhere to
    move it. A caller waiting on such a call asks this now and then instead of waiting out its
    whole deadline. No round trip while no server is dead; else one (the agents' records).
    An agent whose server's record vanished (FLUSHALL) is not detected."""
    # Ages by the Redis clock at which the snapshot was read (ServerInfo.age), never this
    # host's: heartbeats are stamped with Redis's TIME.
    dead = {s.name for s in servers if s.state(dead_after) == "dead"}
    ids = list(dict.fromkeys(a for a in agent_ids if a))
    if not dead or not ids:
        return None
    live = [s for s in servers if s.alive(dead_after)]
    by_name = {s.name: s for s in servers}
    for raw in r.hmget(agents_key, ids):
        if raw is None:
            continue  # deleted: its calls are answered UnknownAgent by whoever deleted it
        a = AgentInfo.model_validate_json(raw)
        if a.server not in dead:
            continue
        module = a.cls.split(":")[0]
        if pick([s.model_copy() for s in live], module) is not None:
            continue  # recovery moves it there within a heartbeat or two
        why = ("no live worker at all" if not live else
               f"no live worker loaded {module!r} with room for it")
        home = by_name[a.server]
        return (f"no live worker can host agent {a.name!r} ({a.id}): its server {a.server!r} "
                f"is dead (silent for {home.age():.0f} s) and there is {why}. The "
                f"call stays queued and runs when such a worker starts (`busagent worker "
                f"--agents {module}`); see `busagent deadletter` for calls that killed their "
                "workers")
    return None
