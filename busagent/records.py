"""The registry's records as Redis holds them, and the one rule for "is this server alive?".

``{p}:servers`` maps a server name to a JSON :class:`ServerInfo`, ``{p}:agents`` an agent id to a
JSON :class:`AgentInfo` (``redis-cli HGETALL`` shows both). Workers write them; callers, the CLI
and other workers read them. This module imports nothing that starts processes, so the worker
can use it without the caller's placement code.

Liveness, everywhere, is :meth:`ServerInfo.state`. The Lua scripts apply the parts of it that
must be atomic with what they write, and say so here so the rules cannot drift apart:

* ``heartbeat.lua``: a record whose status is ``dead`` is not overwritten (the worker was fenced:
  others moved its agents). That is the ``dead`` state below, by status.
* ``route.lua``: any record counts as a server to queue calls for, whatever its state: calls
  queued for a ``late`` or ``dead`` server are moved with its agents by recovery, in order.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel

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
    #: epoch seconds.
    started: float
    #: epoch seconds of the last heartbeat, from the worker's clock.
    heartbeat: float
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

    def state(self, dead_after: float, now: float | None = None) -> State:
        """``dead``: fenced by recovery, or silent for ``dead_after`` seconds or more; ``late``:
        silent for over two heartbeats' worth of ``dead_after`` but not yet dead (callers still
        queue calls for it); ``stopping``: finishing a graceful stop; ``up``: serving."""
        age = (time.time() if now is None else now) - self.heartbeat
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


def parse_server(raw: bytes | str) -> ServerInfo | None:
    """A server record, or None for a foreign or older one (shown by nobody, swept by workers)."""
    try:
        return ServerInfo.model_validate_json(raw)
    except ValueError:
        return None


def read_servers(r: Any, key: str) -> list[ServerInfo]:
    """Every server record in the hash ``key``, by name."""
    out = [s for raw in r.hvals(key) if (s := parse_server(raw)) is not None]
    return sorted(out, key=lambda s: s.name)


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
    so by recovery, or silent for twice ``dead_after``: a worker whose heartbeat is merely late
    under load must not fail its callers) and no live server in ``servers`` (a
    :class:`Snapshot`) loaded the agent's module with room for it, so recovery has nowhere to
    move it. A caller waiting on such a call asks this now and then instead of waiting out its
    whole deadline. No round trip while no server is dead; else one (the agents' records).
    An agent whose server's record vanished (FLUSHALL) is not detected."""
    now = time.time()
    dead = {s.name for s in servers
            if s.status == "dead" or now - s.heartbeat >= 2 * dead_after}
    ids = list(dict.fromkeys(a for a in agent_ids if a))
    if not dead or not ids:
        return None
    live = [s for s in servers if s.alive(dead_after, now)]
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
                f"is dead (silent for {now - home.heartbeat:.0f} s) and there is {why}. The "
                f"call stays queued and runs when such a worker starts (`busagent worker "
                f"--agents {module}`); see `busagent deadletter` for calls that killed their "
                "workers")
    return None
