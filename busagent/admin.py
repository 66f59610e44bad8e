"""Looking at and managing a running bus: servers, agents, their memory, dead letters.

What the CLI and an operator's script use (``busagent servers``, ``agents``, ``memory``,
``info``, ``stop``, ``delete``, ``deadletter``). Every function reads the process-wide bus
(:func:`busagent.bus.current`); a Redis failure raises RedisUnavailable or BusError, never a
redis-py exception.
"""

from __future__ import annotations

import time
from typing import Any

from . import bus as _bus
from . import records, replies
from .errors import BusagentError, PlacementError, UnknownAgent, UsageError
from .memory import from_json
from .placeholder import Placeholder
from .protocol import ControlBody, ControlOp, Entry, describe
from .records import AgentInfo, ServerInfo


def servers(include_dead: bool = True) -> list[dict[str, Any]]:
    """Every server in the registry: its record's fields plus ``state`` (``up``, ``late``,
    ``stopping`` or ``dead``: :meth:`ServerInfo.state`), ``alive`` (takes new agents: ``up``
    or ``late``) and ``age`` (seconds since its last heartbeat by the Redis clock, one decimal).
    Sorted by name."""
    b = _bus.current()
    with b.errors():
        found = records.read_servers(b.redis, b.keys.servers)
    out = []
    for s in found:
        state = s.state(b.settings.dead_after)
        alive = state in records.LIVE
        if alive or include_dead:
            out.append({**s.model_dump(), "state": state, "alive": alive,
                        "age": round(s.age(), 1)})
    return out


def agents(server: str | None = None) -> list[dict[str, Any]]:
    """Every registered agent (``HGETALL {prefix}:agents``) as ``{id, name, cls, server,
    created}``, optionally only ``server``'s, sorted by server then name."""
    b = _bus.current()
    with b.errors():
        raw = b.redis.hvals(b.keys.agents)
    out = []
    for item in raw:
        info = AgentInfo.model_validate_json(item)
        if server is None or info.server == server:
            out.append(info.model_dump())
    return sorted(out, key=lambda a: (a["server"], a["name"]))


def agent_info(agent_id: str) -> AgentInfo:
    """The agent's registry record. Raises UnknownAgent if it is not registered."""
    b = _bus.current()
    with b.errors():
        raw = b.redis.hget(b.keys.agents, agent_id)
    if raw is None:
        raise UnknownAgent(f"agent {agent_id!r} is not registered; see `busagent agents`")
    return AgentInfo.model_validate_json(raw)


def agent_memory(agent_id: str) -> list[Any]:
    """The agent's memory as of its last completed call, oldest first ([] if it has none)."""
    b = _bus.current()
    with b.errors():
        items: Any = b.redis.lrange(b.keys.memory(agent_id), 0, -1)
    return [from_json(x) for x in items]


class ServerClient:
    """Manage one server by name (AgentScope's ``RpcAgentClient``, addressed by name)."""

    def __init__(self, server: str) -> None:
        self.server = server

    def _info(self) -> ServerInfo | None:
        b = _bus.current()
        with b.errors():
            return records.read_server(b.redis, b.keys.servers, self.server)

    def _known(self) -> ServerInfo:
        info = self._info()
        if info is None:
            raise PlacementError(f"no server named {self.server!r}; see `busagent servers`")
        return info

    def is_alive(self) -> bool:
        """Whether the server takes new agents (``up`` or ``late``; False if unknown)."""
        info = self._info()
        return info is not None and info.alive(_bus.current().settings.dead_after)

    def get_server_info(self) -> dict[str, Any]:
        """``{name, host, pid, cpu, mem (MiB), agents, inflight, capacity, modules, state,
        alive, ...}`` from the last heartbeat (no waiting on a fresh CPU sample). Raises
        PlacementError if no server has this name."""
        info = self._known()
        state = info.state(_bus.current().settings.dead_after)
        return {**info.model_dump(), "state": state, "alive": state in records.LIVE}

    def set_model_configs(self, configs: Any) -> list[str]:
        """Model configs for this server only (a JSON file, a dict or a list of dicts); they
        override the global ones of the same name. Returns the config names."""
        self._known()
        from .models import load_model_configs

        return load_model_configs(configs, server=self.server)

    def _control(self, op: ControlOp, agent: str | None = None,
                 timeout: float | None = 30.0) -> Any:
        b = _bus.current()
        self._known()
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
    """The newest ``count`` dead-lettered calls, newest first: ``{id, call, agent, kind,
    caller, reason, tries, server}`` (fields the entry lacks are left out)."""
    b = _bus.current()
    with b.errors():
        raw: Any = b.redis.xrevrange(b.keys.deadletter, count=count)
    out = []
    for entry_id, fields in raw:
        out.append({"id": entry_id.decode(), **describe(fields)})
    return out


def replay(entry_id: str) -> str:
    """Send a dead-lettered call again, to its agent's current server, under its call id (the
    error reply it got is removed first so its reader sees the new one). Returns the call id.
    Raises UnknownAgent if there is no such entry, the routing error if it cannot be sent."""
    b = _bus.current()
    with b.errors():
        raw: Any = b.redis.xrange(b.keys.deadletter, entry_id, entry_id)
    if not raw:
        raise UnknownAgent(f"no dead-letter entry {entry_id}; see `busagent deadletter`")
    try:
        e = Entry.from_fields(raw[0][1])
    except BusagentError as err:
        raise UsageError(f"dead-letter entry {entry_id} cannot be replayed: {err}") from None
    call, agent = e.call, e.agent
    if not call or not agent:
        raise UsageError(f"dead-letter entry {entry_id} has no call or agent to replay")
    replies.release(b, [call])
    p = Placeholder(call, agent)
    b.sender.route(agent, call, e.kind, e.body, p._fail)
    b.sender.flush()
    if p._error is not None:
        raise p._error
    with b.errors():
        b.redis.xdel(b.keys.deadletter, entry_id)
    return call


__all__ = ["ServerClient", "agent_info", "agent_memory", "agents", "deadletters", "replay",
           "servers"]
