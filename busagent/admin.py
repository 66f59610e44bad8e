"""Looking at and managing a running bus: servers, agents, their memory, dead letters.

What the CLI and an operator's script use (``busagent servers``, ``agents``, ``memory``,
``info``, ``stop``, ``delete``, ``deadletter``). Every function reads the process-wide bus
(:func:`busagent.bus.current`); a Redis failure raises RedisUnavailable or BusError, never a
redis-py exception.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from collections.abc import Callable, Iterator
from typing import Any, cast

from . import bus as _bus
from . import records, replies
from .errors import BusagentError, CallTimeout, PlacementError, UnknownAgent, UsageError
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


#: registry records read per HSCAN step when listing (a hint to Redis: about this many).
PAGE = 1000


def agent_page(cursor: int = 0, count: int = PAGE, server: str | None = None,
               namespace: str | None = None) -> tuple[int, list[dict[str, Any]]]:
    """One page of the registry: ``(next cursor, rows)``, rows as ``{id, name, cls, server,
    created, namespace, registered, owner}`` (only ``server``'s and ``namespace``'s if given, so
    a page may hold fewer than ``count`` or none).
    Start at cursor 0; a next cursor of 0 means the listing is complete. One ``HSCAN`` of about
    ``count`` records: Redis's work per call is bounded whatever the registry's size, so listing
    a million agents never stalls other clients. HSCAN's guarantee: a record present for the
    whole listing is returned (rarely twice, if the hash is resized meanwhile); one added or
    removed meanwhile may or may not be."""
    b = _bus.current()
    with b.errors():
        nxt, raw = b.redis.hscan(b.keys.agents, cursor, count=count)
    # json.loads, not the pydantic model: a tenth of the cost per row, which at a million rows
    # is most of the listing's time. The records are busagent's own (written as AgentInfo).
    rows = []
    for item in cast("dict[bytes, bytes]", raw).values():
        rec = json.loads(item)
        if isinstance(rec, dict) and (server is None or rec.get("server") == server) and (
                namespace is None or rec.get("namespace") == namespace):
            rows.append(rec)
    return int(nxt), rows


def iter_agents(server: str | None = None, count: int = PAGE,
                namespace: str | None = None) -> Iterator[dict[str, Any]]:
    """Every registered agent (only ``server``'s and ``namespace``'s if given), page by page as
    :func:`agent_page` reads them, in Redis's scan order: for streaming a large registry."""
    cursor = 0
    while True:
        cursor, rows = agent_page(cursor, count, server, namespace)
        yield from rows
        if cursor == 0:
            return


def agents(server: str | None = None, namespace: str | None = None) -> list[dict[str, Any]]:
    """Every registered agent as ``{id, name, cls, server, created, namespace, registered,
    owner}``, optionally only ``server``'s and only those of ``namespace``, sorted by server
    then name. Read in pages (:func:`iter_agents`), never in
    one command; the list itself is held here, so stream large registries with
    :func:`iter_agents` instead."""
    return sorted(iter_agents(server, namespace=namespace),
                  key=lambda a: (a["server"], a["name"]))


def delete_namespace(namespace: str, timeout: float | None = 30.0) -> dict[str, int]:
    """Delete every agent of ``namespace`` on the live servers, each after the calls already
    sent to it (a ``delete`` control entry per agent, all sent at once, then waited for).
    Agents on dead servers are counted in ``left``: they move with recovery, or ``busagent
    stop SERVER`` removes them. Returns ``{"deleted": n, "left": m}``."""
    b = _bus.current()
    live = {s["name"] for s in servers(include_dead=False)}
    found = agents(namespace=namespace)
    ps: list[Placeholder] = []
    left = 0
    for a in found:
        if a["server"] not in live:
            left += 1
            continue
        call_id = _bus.new_id()
        fields = b.sender.entry("control", ControlBody(op="delete", agent=a["id"]).pack(),
                                call=call_id, agent=a["id"]).fields()
        p = Placeholder(call_id, a["id"])
        b.sender.send(_xadd(b.keys.inbox(a["server"]), fields), 1, p._fail)
        ps.append(p)
    deleted = 0
    for p in ps:
        with contextlib.suppress(UnknownAgent):  # deleted meanwhile
            deleted += bool(p.result(timeout))
    return {"deleted": deleted, "left": left}


def _xadd(key: str, fields: dict[Any, Any]) -> Callable[[Any], None]:
    return lambda pipe: pipe.xadd(key, fields)


def agent_info(agent_id: str) -> AgentInfo:
    """The agent's registry record. Raises UnknownAgent if it is not registered."""
    b = _bus.current()
    with b.errors():
        raw = b.redis.hget(b.keys.agents, agent_id)
    if raw is None:
        raise UnknownAgent(f"agent {agent_id!r} is not registered; see `busagent agents`")
    return AgentInfo.model_validate_json(raw)


def agent_memory(agent_id: str) -> list[Any]:
    """The agent's memory as of its last completed call, oldest first ([] if it has none).
    Raises ProtocolError if an item holds a pydantic model whose class this process has not
    imported (see :func:`stored_memory`)."""
    return [from_json(x) for x in _memory_texts(agent_id)]


def stored_memory(agent_id: str) -> list[Any]:
    """The agent's memory as stored, oldest first: each item's JSON (a Msg as its plain fields,
    anything else in memory's tagged encoding, :mod:`busagent.memory`), decoded as JSON only.
    For readers that may not have the agent's classes (the CLI, the studio): it never fails on
    a class this process lacks, and stays exact."""
    return [json.loads(x) for x in _memory_texts(agent_id)]


def _memory_texts(agent_id: str) -> list[bytes]:
    b = _bus.current()
    with b.errors():
        items: Any = b.redis.lrange(b.keys.memory(agent_id), 0, -1)
    return list(items)


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
            raise PlacementError(f"no server named {self.server!r}; see `busagent servers`"
                                 f"{_bus.current().where()}")
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
        return {**info.model_dump(), "state": state, "alive": state in records.LIVE,
                "age": round(info.age(), 1)}

    def set_model_configs(self, configs: Any) -> list[str]:
        """Model configs for this server only (a JSON file, a dict or a list of dicts); they
        override the global ones of the same name. Returns the config names."""
        self._known()
        from .models import load_model_configs

        return load_model_configs(configs, server=self.server)

    def _control(self, op: ControlOp, agent: str | None = None,
                 timeout: float | None = 30.0) -> Any:
        b = _bus.current()
        # A dead server reads nothing: say so now rather than wait out the timeout.
        self._refuse_dead(f"answer {op!r}")
        call_id = _bus.new_id()
        fields = b.sender.entry("control", ControlBody(op=op, agent=agent).pack(), call=call_id,
                                agent=agent or "").fields()
        p = Placeholder(call_id, agent or "")
        key = b.keys.inbox(self.server)
        b.sender.send(lambda pipe: pipe.xadd(key, fields), 1, p._fail)
        return self._answer(p, op, timeout)

    def _answer(self, p: Placeholder, op: str, timeout: float | None) -> Any:
        """The control call's answer, waited for one heartbeat interval at a time: between
        slices the server's record is read again, so a server that died after the call was
        sent (killed, its record not yet dead) is reported as soon as its heartbeat is older
        than a live worker's ever is, instead of after the whole ``timeout`` as a CallTimeout
        that blames a busy agent. Costs one HGET per heartbeat interval of waiting."""
        b = _bus.current()
        beat, dead_after = b.settings.heartbeat, b.settings.dead_after
        # A live worker beats every `beat` s; three missed beats (or the registry's own
        # "late", whichever comes first) means it is not coming back soon.
        silent = min(3 * beat, dead_after / 2)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else deadline - time.monotonic()
            try:
                return p.result(beat if left is None else max(min(beat, left), 0.01))
            except CallTimeout:
                if left is not None and left <= beat:
                    raise CallTimeout(
                        f"server {self.server} did not answer {op!r} within {timeout:g} s "
                        "though its heartbeat is fresh: it is busy (see `busagent info "
                        f"{self.server}`); pass a longer timeout") from None
            info = self._info()
            if info is None:
                raise PlacementError(f"server {self.server} left the registry without "
                                     f"answering {op!r} (it stopped)") from None
            age = info.age()
            if info.status == "dead" or age > silent:
                raise PlacementError(
                    f"server {self.server} did not answer {op!r}: its last heartbeat was "
                    f"{age:.0f} s ago (it beats every {beat:g} s), so it may have died; it "
                    f"will be recovered by a live worker or declared dead {dead_after:g} s "
                    f"after its last heartbeat, then `busagent stop {self.server}` "
                    "(ServerClient.forget()) removes it") from None

    def stop(self, timeout: float | None = 30.0, drain: bool = False) -> bool:
        """Ask the server to stop gracefully (in-flight calls finish); True once acknowledged.
        With ``drain`` its agents move to other live servers, memory and waiting calls included,
        instead of being deleted. Like every control op, raises PlacementError at once if the
        server is dead (nothing reads its inbox: :meth:`forget` removes it)."""
        return bool(self._control("drain" if drain else "stop", timeout=timeout))

    def _refuse_dead(self, what: str) -> None:
        info = self._known()
        b = _bus.current()
        if info.state(b.settings.dead_after) == "dead":
            raise PlacementError(
                f"server {self.server} is dead (last heartbeat {info.age():.0f}"
                f" s ago), so it cannot {what}; its agents move by themselves to the next live "
                f"worker that loads their modules, or `busagent stop {self.server}` (without "
                "--drain; ServerClient.forget()) removes it with its agents")

    def forget(self) -> dict[str, int]:
        """Remove a dead server (one no worker sweeps, e.g. when none is alive): its agents
        (records, specs, memory) and its record; the calls waiting in its inbox are answered
        UnknownAgent. What a graceful stop would have done, done for it. Returns ``{"agents":
        n, "calls": m}``. Raises PlacementError if it is not dead, or a live worker is
        recovering it right now (then try again).

        Fenced first (marked dead, as recovery does): should the worker only have been frozen,
        its next heartbeat finds that and it stops, instead of serving agents that are gone."""
        from .worker import hosting, recovery  # the worker's own steps, used on its behalf

        b = _bus.current()
        info = self._known()
        if info.state(b.settings.dead_after) != "dead":
            raise PlacementError(f"server {self.server} is {info.state(b.settings.dead_after)}"
                                 f"; stop it with `busagent stop {self.server}`")
        owner = f"forget:{b.caller}"
        with b.errors():
            if not recovery.lock(b, self.server, owner):
                raise PlacementError(f"server {self.server} is being recovered by a live worker"
                                     "; try again in a moment")
            try:
                recovery.mark_dead(b, self.server)
                inbox = b.keys.inbox(self.server)
                waiting = recovery.entries(b, inbox)
                recovery.answer(b, inbox, waiting, UnknownAgent(
                    f"server {self.server} died before running the call, and was removed"),
                    self.server)
                ids = [a.id for a in recovery.agents_of(b, self.server)]
                hubs = hosting.member_hashes(b.redis, b.keys)
                pipe = b.redis.pipeline(transaction=True)
                hosting.forget(pipe, b.keys, ids, hubs)
                # Its log lines and start-up flag too: nothing of a removed server stays.
                pipe.delete(inbox, b.keys.logs(self.server), b.keys.ready(self.server))
                pipe.hdel(b.keys.servers, self.server)
                pipe.execute()
            finally:
                recovery.unlock(b, self.server, owner)
        calls = sum(1 for _, f in waiting if Entry.reply_to(f))
        return {"agents": len(ids), "calls": calls}

    def get_agent_list(self, timeout: float | None = 30.0) -> list[dict[str, Any]]:
        """``[{agent_id, name, cls, memory_size}, ...]``: the agents the registry places on
        this server, with their memory's length. Read page by page from Redis (HSCAN, then one
        pipelined LLEN per agent of the page), never in one reply from the worker, so it works
        at any number of agents. ``timeout`` is kept for compatibility and unused. Raises
        PlacementError if no server has this name."""
        del timeout
        self._known()
        b = _bus.current()
        out: list[dict[str, Any]] = []
        cursor = 0
        while True:
            cursor, rows = agent_page(cursor, PAGE, self.server)
            if rows:
                with b.errors():
                    pipe = b.redis.pipeline(transaction=False)
                    for a in rows:
                        pipe.llen(b.keys.memory(a["id"]))
                    sizes = pipe.execute()
                out += [{"agent_id": a["id"], "name": a["name"], "cls": a["cls"],
                         "memory_size": n} for a, n in zip(rows, sizes, strict=True)]
            if cursor == 0:
                return out

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


#: a Redis stream entry id: milliseconds, optionally ``-sequence``.
_STREAM_ID = re.compile(r"\d{1,20}(-\d{1,20})?")


def deadletters(count: int = 100) -> list[dict[str, Any]]:
    """The newest ``count`` dead-lettered calls, newest first: ``{id, call, agent, kind,
    caller, reason, tries (int), server}`` (fields the entry lacks are left out)."""
    b = _bus.current()
    with b.errors():
        raw: Any = b.redis.xrevrange(b.keys.deadletter, count=count)
    out = []
    for entry_id, fields in raw:
        row: dict[str, Any] = {"id": entry_id.decode(), **describe(fields)}
        if row.get("tries", "").isdigit():
            row["tries"] = int(row["tries"])
        out.append(row)
    return out


def replay(entry_id: str) -> str:
    """Send a dead-lettered call again, to its agent's current server, under its call id (the
    error reply it got is removed first so its reader sees the new one). Returns the call id.
    Raises UnknownAgent if there is no such entry, the routing error if it cannot be sent."""
    if not _STREAM_ID.fullmatch(entry_id):
        raise UsageError(f"{entry_id!r} is not a dead-letter entry id (they look like "
                         "1764561234567-0); see `busagent deadletter`")
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


__all__ = ["ServerClient", "agent_info", "agent_memory", "agent_page", "agents", "deadletters",
           "delete_namespace", "iter_agents", "replay", "servers", "stored_memory"]
