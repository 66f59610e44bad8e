"""The registry: which servers are alive, what they host, and where a new agent goes."""

from __future__ import annotations

import time
from typing import Any

from . import bus as _bus
from . import records, replies
from .bus import Bus
from .errors import BusagentError, PlacementError, UnknownAgent
from .memory import from_json
from .placeholder import Placeholder
from .protocol import ControlBody, ControlOp, Entry, describe
from .records import AgentInfo, ServerInfo, pick
from .tuning import PLACEMENT_SNAPSHOT


def read_servers(b: Bus) -> list[ServerInfo]:
    return records.read_servers(b.redis, b.keys.servers)


def alive(b: Bus, s: ServerInfo, now: float | None = None) -> bool:
    return s.alive(b.settings.dead_after, now)


class _Snapshot:
    def __init__(self) -> None:
        self.at = 0.0
        self.servers: list[ServerInfo] = []


def _live(b: Bus, fresh: bool = False) -> list[ServerInfo]:
    snap: _Snapshot | None = b.placement
    if snap is None:
        snap = b.placement = _Snapshot()
    now = time.monotonic()
    if fresh or now - snap.at > PLACEMENT_SNAPSHOT:
        t = time.time()
        snap.servers = [s for s in read_servers(b) if alive(b, s, t)]
        snap.at = now
    return snap.servers


def place(b: Bus, module: str, load: str, server: str | None, count: int = 1) -> str:
    """The server a new agent of ``module`` goes to: the named one (which must be alive and have
    loaded the module), else the least loaded live server that loaded it, else worker processes
    started for this program."""
    if server is not None:
        for s in _live(b, fresh=True):
            if s.name == server:
                if module not in s.modules:
                    raise PlacementError(
                        f"server {server!r} did not load module {module!r} (it loaded "
                        f"{s.modules}); restart it with `busagent worker --name {server} "
                        f"--agents {load}`"
                    )
                if s.agents + count > s.capacity:
                    raise PlacementError(f"server {server!r} is full ({s.capacity} agents)")
                s.agents += count
                return server
        raise PlacementError(
            f"no live server named {server!r}; start it with `busagent worker --name {server} "
            f"--agents {load}` against the same Redis, or see `busagent servers`"
        )
    for fresh in (False, True):
        best = pick(_live(b, fresh), module, count)
        if best is not None:
            return best.name
    from .spawn import ensure_children

    names = ensure_children(b, load)
    best = pick([s for s in _live(b, fresh=True) if s.name in names], module, count)
    if best is None:
        raise PlacementError(
            f"worker processes for {load} started but none can take {count} more agent(s): "
            "they are full or not registered; raise their capacity (BUSAGENT_CAPACITY, "
            "`busagent worker --capacity`) or child_workers")
    return best.name


def servers(include_dead: bool = True) -> list[dict[str, Any]]:
    """Every server in the registry, with ``alive``."""
    b = _bus.current()
    now = time.time()
    out = []
    for s in read_servers(b):
        a = alive(b, s, now)
        if a or include_dead:
            out.append({**s.model_dump(), "alive": a, "age": round(now - s.heartbeat, 1)})
    return out


def agents(server: str | None = None) -> list[dict[str, Any]]:
    """Every registered agent (``HGETALL {prefix}:agents``), optionally of one server."""
    b = _bus.current()
    out = []
    for raw in b.redis.hvals(b.keys.agents):
        info = AgentInfo.model_validate_json(raw)
        if server is None or info.server == server:
            out.append(info.model_dump())
    return sorted(out, key=lambda a: (a["server"], a["name"]))


def agent_info(agent_id: str) -> AgentInfo:
    b = _bus.current()
    raw = b.redis.hget(b.keys.agents, agent_id)
    if raw is None:
        raise UnknownAgent(f"agent {agent_id!r} is not registered; see `busagent agents`")
    return AgentInfo.model_validate_json(raw)


def agent_memory(agent_id: str) -> list[Any]:
    b = _bus.current()
    return [from_json(x) for x in b.redis.lrange(b.keys.memory(agent_id), 0, -1)]


class ServerClient:
    """Manage one server by name (AgentScope's ``RpcAgentClient``, addressed by name)."""

    def __init__(self, server: str) -> None:
        self.server = server

    def _info(self) -> ServerInfo | None:
        b = _bus.current()
        raw = b.redis.hget(b.keys.servers, self.server)
        return None if raw is None else ServerInfo.model_validate_json(raw)

    def is_alive(self) -> bool:
        info = self._info()
        return info is not None and alive(_bus.current(), info)

    def get_server_info(self) -> dict[str, Any]:
        """``{name, host, pid, cpu, mem (MiB), agents, inflight, capacity, modules, alive, ...}``
        from the last heartbeat (no waiting on a fresh CPU sample)."""
        info = self._info()
        if info is None:
            raise PlacementError(f"no server named {self.server!r}; see `busagent servers`")
        b = _bus.current()
        return {**info.model_dump(), "alive": alive(b, info)}

    def set_model_configs(self, configs: Any) -> list[str]:
        """Model configs for this server only (a JSON file, a dict or a list of dicts); they
        override the global ones of the same name. Returns the config names."""
        if self._info() is None:
            raise PlacementError(f"no server named {self.server!r}; see `busagent servers`")
        from .models import load_model_configs

        return load_model_configs(configs, server=self.server)

    def _control(self, op: ControlOp, agent: str | None = None,
                 timeout: float | None = 30.0) -> Any:
        b = _bus.current()
        if self._info() is None:
            raise PlacementError(f"no server named {self.server!r}; see `busagent servers`")
        call_id = _bus.new_id()
        fields = b.sender.entry("control", ControlBody(op=op, agent=agent).pack(), call=call_id,
                                agent=agent or "").fields()
        p = Placeholder(call_id, agent or "")
        key = b.keys.inbox(self.server)
        b.sender.send(lambda pipe: pipe.xadd(key, fields), 1, p._fail)
        return p.result(timeout)

    def stop(self, timeout: float | None = 30.0, drain: bool = False) -> bool:
        """Ask the server to stop gracefully (in-flight calls finish); True once acknowledged.
        With ``drain`` its agents move to other live servers, memory and waiting calls included,
        instead of being deleted."""
        return bool(self._control("drain" if drain else "stop", timeout=timeout))

    def get_agent_list(self, timeout: float | None = 30.0) -> list[dict[str, Any]]:
        """``[{agent_id, name, cls, memory_size}, ...]`` as the server sees them now."""
        return list(self._control("list", timeout=timeout))

    def get_agent_memory(self, agent_id: str) -> list[Any]:
        """The agent's memory as of its last completed call."""
        return agent_memory(agent_id)

    def delete_agent(self, agent_id: str, timeout: float | None = 30.0) -> bool:
        """Delete after the calls already sent to it are answered."""
        return bool(self._control("delete", agent=agent_id, timeout=timeout))

    def delete_all_agent(self, timeout: float | None = 30.0) -> int:
        """Delete every agent on the server now; returns how many."""
        return int(self._control("delete_all", timeout=timeout))

    def state(self, timeout: float | None = 10.0) -> dict[str, Any]:
        """The worker's scheduler state (mailboxes, busy agents, reader), for diagnosis."""
        return dict(self._control("state", timeout=timeout))

    def ping(self, timeout: float | None = 10.0) -> float:
        """Round trip through the server's inbox, in seconds."""
        t = time.perf_counter()
        self._control("ping", timeout=timeout)
        return time.perf_counter() - t

    def __repr__(self) -> str:
        return f"ServerClient({self.server!r})"


def deadletters(count: int = 100) -> list[dict[str, Any]]:
    """The newest dead-lettered calls: id, call, agent, kind, reason, tries, server."""
    b = _bus.current()
    out = []
    raw: Any = b.redis.xrevrange(b.keys.deadletter, count=count)
    for entry_id, fields in raw:
        out.append({"id": entry_id.decode(), **describe(fields)})
    return out


def replay(entry_id: str) -> str:
    """Send a dead-lettered call again, to its agent's current server, under its call id (the
    error reply it got is removed first so its reader sees the new one). Returns the call id."""
    b = _bus.current()
    raw: Any = b.redis.xrange(b.keys.deadletter, entry_id, entry_id)
    if not raw:
        raise UnknownAgent(f"no dead-letter entry {entry_id}; see `busagent deadletter`")
    try:
        e = Entry.from_fields(raw[0][1])
    except BusagentError as err:
        raise BusagentError(f"dead-letter entry {entry_id} cannot be replayed: {err}") from None
    call, agent = e.call, e.agent
    if not call or not agent:
        raise BusagentError(f"dead-letter entry {entry_id} has no call or agent to replay")
    replies.release(b, [call])
    p = Placeholder(call, agent)
    b.sender.route(agent, call, e.kind, e.body, p._fail)
    b.sender.flush()
    if p._error is not None:
        raise p._error
    b.redis.xdel(b.keys.deadletter, entry_id)
    return call


__all__ = ["ServerClient", "agents", "deadletters", "place", "replay", "servers"]
