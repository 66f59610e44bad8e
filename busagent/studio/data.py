"""What the studio, ``busagent status``, ``top``, ``logs`` and ``/metrics`` read from Redis.

Every function reads the process-wide bus (:func:`busagent.bus.current`) and returns plain
JSON-able values; a Redis failure raises RedisUnavailable or BusError (``Bus.errors()``).
Nothing here reads a whole registry that can be large: agents are read a page at a time with
HSCAN (:func:`agents_page`), memory a slice at a time, hubs with a bounded SCAN.
"""

from __future__ import annotations

import json
import time
from typing import Any

from busagent import admin
from busagent import bus as _bus
from busagent.errors import BusagentError, PlacementError, UnknownAgent, UsageError
from busagent.protocol import CreateBody, unpack
from busagent.records import LATENCY_BOUNDS, LIVE, AgentInfo, read_servers

#: agent records one agents page may look at while searching (count): bounds the time a search
#: for a rare name takes per request; the page then returns a cursor to go on from.
SCAN_BUDGET = 20_000
#: the most agents one page returns (count).
PAGE_MAX = 500
#: keys one hub listing may look at (count), with SCAN.
HUB_SCAN_BUDGET = 100_000


def jsonable(obj: Any) -> Any:
    """``obj`` as plain JSON values: pydantic models (Msg included) as their dumps, bytes and
    anything else unknown as their repr."""
    return json.loads(json.dumps(obj, default=_default))


def _default(o: Any) -> Any:
    dump = getattr(o, "model_dump", None)
    if callable(dump):
        return dump(mode="json")
    return repr(o)


def quantile(buckets: list[int], q: float) -> float | None:
    """The upper bound (seconds) of the latency bucket holding quantile ``q`` of ``buckets``
    (:data:`LATENCY_BOUNDS`; the last, unbounded bucket reports the largest bound); None when
    nothing was counted."""
    total = sum(buckets)
    if not total:
        return None
    rank, seen = q * total, 0
    for i, n in enumerate(buckets):
        seen += n
        if seen >= rank:
            return LATENCY_BOUNDS[min(i, len(LATENCY_BOUNDS) - 1)]
    return LATENCY_BOUNDS[-1]


def servers() -> list[dict[str, Any]]:
    """Every server record with ``state``, ``alive``, ``age`` (s), ``uptime`` (s) and
    ``p50``/``p99`` (s, from its latency histogram, None before any call)."""
    b = _bus.current()
    with b.errors():
        found = read_servers(b.redis, b.keys.servers)
    out = []
    for s in found:
        state = s.state(b.settings.dead_after)  # by the Redis clock (ServerInfo.age)
        out.append({**s.model_dump(), "state": state, "alive": state in LIVE,
                    "age": round(s.age(), 1), "uptime": round(s.uptime(), 1),
                    "p50": quantile(s.latency, 0.5), "p99": quantile(s.latency, 0.99)})
    return out


def summary(rows: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The one-screen view of ``busagent status``: servers by state, agents, calls in flight,
    calls/s, errors, calls answered, Redis memory (bytes) and version, dead letters, and
    ``servers`` (the rows of :func:`servers`)."""
    b = _bus.current()
    rows = servers() if rows is None else rows
    with b.errors():
        pipe = b.redis.pipeline(transaction=False)
        pipe.hlen(b.keys.agents)
        pipe.xlen(b.keys.deadletter)
        pipe.info("memory")
        pipe.info("server")
        agents, dead, mem, srv = pipe.execute()
    by_state = {k: 0 for k in ("up", "late", "stopping", "dead")}
    for s in rows:
        by_state[s["state"]] += 1
    live = [s for s in rows if s["state"] != "dead"]
    return {
        "servers": by_state, "agents": agents,
        "inflight": sum(s["inflight"] for s in live),
        "rate": round(sum(s["rate"] for s in live), 2),
        "calls": sum(s["calls"] for s in rows), "errors": sum(s["errors"] for s in rows),
        "redis": {"used_memory": mem.get("used_memory"), "version": srv.get("redis_version")},
        "deadletters": dead, "rows": rows,
    }


def agents_page(cursor: int = 0, count: int = 50, q: str = "", server: str = "",
                cls: str = "") -> dict[str, Any]:
    """One page of the registry, read with HSCAN from ``cursor`` (0: the start): ``{items,
    cursor, scanned}``; ``cursor`` 0 in the answer means the end. A page holds about ``count``
    items (HSCAN's COUNT is a hint: a small hash comes whole). ``q`` matches a substring of
    the name or id, ``server`` the server exactly, ``cls`` a substring of the class. A page
    stops at ``count`` matches or after ``SCAN_BUDGET`` records looked at, whichever is first,
    so a rare match costs several pages, never one unbounded request. Order is HSCAN's (the
    hash's), not sorted: sorting would need the whole registry."""
    b = _bus.current()
    count = max(1, min(count, PAGE_MAX))
    items: list[dict[str, Any]] = []
    scanned = 0
    needles = [x.encode() for x in (q, server, cls) if x]
    with b.errors():
        while True:
            # COUNT is a hint: about `count` records without a filter (a small hash comes
            # whole), bigger steps while searching.
            page: Any = b.redis.hscan(b.keys.agents, cursor,
                                      count=1000 if needles else count)
            cursor, got = page
            for k, raw in got.items():
                scanned += 1
                # A cheap bytes test first: a search over a million records parses only hits.
                if needles and not all(n in raw or n in k for n in needles):
                    continue
                try:
                    a = AgentInfo.model_validate_json(raw)
                except ValueError:
                    continue
                if ((q and q not in a.name and q not in a.id)
                        or (server and a.server != server) or (cls and cls not in a.cls)):
                    continue
                items.append(a.model_dump())
            if cursor == 0 or len(items) >= count or scanned >= SCAN_BUDGET:
                break
    return {"items": items, "cursor": int(cursor), "scanned": scanned}


def agent(agent_id: str, mem_start: int = 0, mem_count: int = 50) -> dict[str, Any]:
    """One agent: its record, constructor ``args``/``kwargs`` (or ``args_error``), ``memory``
    ``{items, start, total}`` (a slice of ``mem_count`` from ``mem_start``; negative counts from
    the end) and ``running`` (its calls running now). Raises UnknownAgent."""
    b = _bus.current()
    info = admin.agent_info(agent_id)
    mem_count = max(1, min(mem_count, PAGE_MAX))
    with b.errors():
        pipe = b.redis.pipeline(transaction=False)
        pipe.hget(b.keys.specs, agent_id)
        pipe.llen(b.keys.memory(agent_id))
        spec, total = pipe.execute()
        if mem_start < 0:
            mem_start = max(0, total + mem_start)
        raw: Any = b.redis.lrange(b.keys.memory(agent_id), mem_start,
                                  mem_start + mem_count - 1)
    out: dict[str, Any] = {**info.model_dump(), "args": None, "kwargs": None}
    if spec is not None:
        try:
            body = CreateBody.unpack(spec)
            out["args"], out["kwargs"] = jsonable(body.args), jsonable(body.kwargs)
        except BusagentError as e:  # a model class this process has not imported
            out["args_error"] = str(e)
    out["memory"] = {"items": [json.loads(x) for x in raw], "start": mem_start, "total": total}
    out["running"] = [c for c in calls_now() if c["agent"] == agent_id]
    return out


def delete_agent(agent_id: str) -> None:
    """Delete on its server, after the calls already sent to it. Raises UnknownAgent."""
    info = admin.agent_info(agent_id)
    if not admin.ServerClient(info.server).delete_agent(agent_id):
        raise UnknownAgent(f"agent {agent_id!r} was not on {info.server}")


def forget_server(name: str) -> None:
    """Remove a dead server's record (and nothing else: agents still registered to it are
    recovered by the next worker that can host them). Raises UsageError for a server that is
    not dead, PlacementError for an unknown one."""
    b = _bus.current()
    row = next((s for s in servers() if s["name"] == name), None)
    if row is None:
        raise PlacementError(f"no server named {name!r}")
    if row["state"] != "dead":
        raise UsageError(f"server {name!r} is {row['state']}; only a dead server is forgotten "
                         "(stop it first)")
    with b.errors():
        b.redis.hdel(b.keys.servers, name)


def calls_now() -> list[dict[str, Any]]:
    """What every live worker is running now, oldest first: ``{server, call, agent, kind,
    since (epoch s), for (s)}`` (each worker lists its oldest ``RUNNING_SHOWN``)."""
    now = time.time()
    out = []
    for s in servers():
        if s["state"] == "dead":
            continue
        for c in s["running"]:
            out.append({"server": s["name"], **c, "for": round(now - c["since"], 2)})
    return sorted(out, key=lambda c: c["since"])


def hubs() -> list[str]:
    """Hub names, found with SCAN (at most ``HUB_SCAN_BUDGET`` keys looked at), sorted."""
    b = _bus.current()
    head = len(b.keys.hub(""))
    found: set[str] = set()
    with b.errors():
        for i, k in enumerate(b.redis.scan_iter(match=b.keys.hub_pattern, count=1000)):
            name = k.decode()[head:]
            if name.endswith(":members"):
                name = name[: -len(":members")]
            found.add(name)
            if i >= HUB_SCAN_BUDGET:
                break
    return sorted(found)


def hub_members(name: str) -> list[dict[str, Any]]:
    """The hub's members in the order they joined: ``{id, name, role, watcher, ...}``."""
    from busagent.hub import Hub

    return [m.model_dump() for m in Hub(name).members()]


def hub_messages(name: str, after: str = "", count: int = 100) -> list[dict[str, Any]]:
    """Up to ``count`` messages after seq ``after`` (exclusive; "": the newest ``count``), in
    order: ``{seq, sent_from, send_to, name, role, content}``."""
    b = _bus.current()
    key = b.keys.hub(name)
    count = max(1, min(count, PAGE_MAX))
    with b.errors():
        if after:
            got: Any = b.redis.xrange(key, f"({after}", "+", count=count)
        else:
            newest: Any = b.redis.xrevrange(key, "+", "-", count=count)
            got = list(reversed(newest))
    out = []
    for seq, f in got:
        row: dict[str, Any] = {"seq": seq.decode(),
                               "sent_from": f.get(b"from", b"").decode(errors="replace"),
                               "send_to": json.loads(f.get(b"to", b"[]") or b"[]")}
        try:
            msg = unpack(f[b"msg"])
            row.update(name=msg.name, role=msg.role, content=jsonable(msg.content))
        except (BusagentError, KeyError, AttributeError) as e:
            row.update(name="?", role="?", content=f"(cannot decode: {e})")
        out.append(row)
    return out


def logs(server: str, after: str = "", count: int = 200) -> list[dict[str, Any]]:
    """A worker's log lines: the newest ``count``, or those after id ``after`` (exclusive),
    oldest first: ``{id, t (epoch s), level, logger, msg}``."""
    b = _bus.current()
    key = b.keys.logs(server)
    count = max(1, min(count, 5000))
    with b.errors():
        if after:
            got: Any = b.redis.xrange(key, f"({after}", "+", count=count)
        else:
            newest: Any = b.redis.xrevrange(key, "+", "-", count=count)
            got = list(reversed(newest))
    return [{"id": i.decode(), "t": float(f.get(b"t", b"0")),
             **{k: f.get(k.encode(), b"").decode(errors="replace")
                for k in ("level", "logger", "msg")}} for i, f in got]


def models() -> list[dict[str, Any]]:
    """The global model configs, secrets masked (``api_key`` and anything in ``client_args``
    or ``generate_args`` whose name says key, token, secret or password)."""
    from busagent import models as _models

    out = []
    for c in _models.list_model_configs().values():
        d = c.model_dump()
        if d.get("api_key"):
            d["api_key"] = "***"
        for section in ("client_args", "generate_args"):
            sub = d.get(section)
            if isinstance(sub, dict):
                d[section] = {k: "***" if _secret(k) else v for k, v in sub.items()}
        out.append(jsonable(d))
    return out


def _secret(name: str) -> bool:
    n = name.lower()
    return any(w in n for w in ("key", "token", "secret", "password", "auth"))
