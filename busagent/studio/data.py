"""What the studio, ``busagent status``, ``top``, ``logs`` and ``/metrics`` read from Redis.

Every function reads the process-wide bus (:func:`busagent.bus.current`) and returns plain
JSON-able values; a Redis failure raises RedisUnavailable or BusError (``Bus.errors()``).
Nothing here reads a whole registry that can be large: agents are read a page at a time with
HSCAN (:func:`agents_page`), memory a slice at a time, hubs with a bounded SCAN.
"""

from __future__ import annotations

import json
import re
import time
from typing import Any

from busagent import admin
from busagent import bus as _bus
from busagent.errors import (
    BusagentError,
    PlacementError,
    UnknownAgent,
    UnknownName,
    UsageError,
)
from busagent.memory import is_msg
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
        # A dead server ran until its last heartbeat; a live one until the Redis "now" it was
        # read at (ServerInfo.uptime: all by the Redis clock).
        out.append({**s.model_dump(), "state": state, "alive": state in LIVE,
                    "age": round(s.age(), 1),
                    "uptime": round(s.uptime(s.heartbeat if state == "dead" else None), 1),
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


def page_size(count: int, most: int = PAGE_MAX, what: str = "count") -> int:
    """``count`` as a page size: at most ``most`` (a larger one is lowered to it, as GitHub's
    ``per_page`` is). Raises UsageError for one below 1: "no items" is not a page."""
    if count < 1:
        raise UsageError(f"{what} must be a positive number of items (got {count})")
    return min(count, most)


_STREAM_ID = re.compile(r"(\d{1,20})(?:-(\d{1,20}))?")
_CURSOR = re.compile(r"(\d{1,20})(?:\.(.+))?", re.DOTALL)


def stream_id(raw: str, what: str = "after") -> str:
    """``raw`` if it is a Redis stream id (``1764561234567-0`` or ``1764561234567``), else
    UsageError: an id Redis would refuse is the caller's mistake, not a Redis failure."""
    m = _STREAM_ID.fullmatch(raw)
    if m is None or any(int(x) >= 2**64 for x in m.groups() if x is not None):
        raise UsageError(f"{what} must be a stream id such as 1764561234567-0 (got {raw!r})")
    return raw


def _parse_cursor(raw: str) -> tuple[int, bytes | None]:
    m = _CURSOR.fullmatch(raw)
    if m is None or int(m.group(1)) >= 2**64:
        raise UsageError(f"cursor must be one that /api/agents answered, or 0 to start "
                         f"(got {raw!r})")
    return int(m.group(1)), (m.group(2).encode() if m.group(2) else None)


def agents_page(cursor: str = "0", count: int = 50, q: str = "", server: str = "",
                cls: str = "", namespace: str = "") -> dict[str, Any]:
    """One page of the registry: ``{items, cursor, scanned}``, at most ``count`` items (1 to
    ``PAGE_MAX``; more is lowered to ``PAGE_MAX``, fewer raises UsageError). ``cursor``: "0" (or
    "") to start, else the ``cursor`` of the previous answer, which goes on exactly after that
    page's last item; "0" in the answer means the end. ``q`` matches a substring of the name or
    id, ``server`` the server exactly, ``cls`` a substring of the class, ``namespace`` the
    namespace exactly (the studio's views are scoped by it). A page stops at
    ``count`` matches or after about ``SCAN_BUDGET`` records looked at, whichever is first, so
    a rare match costs several pages, never one unbounded request. Order is HSCAN's (the
    hash's), not sorted: sorting would need the whole registry.

    The cursor is an opaque string: HSCAN's cursor, then (when a page ended inside the batch
    HSCAN returned) ``.`` and the last agent id looked at. Going on re-reads that batch and
    skips up to that id, so nothing is repeated or skipped; if that agent was deleted
    meanwhile, the batch is read from its start (repeats, never gaps: HSCAN's own guarantee).
    Raises UsageError for a malformed cursor or count."""
    b = _bus.current()
    count = page_size(count)
    scan_at, skip_to = _parse_cursor(cursor or "0")
    items: list[dict[str, Any]] = []
    scanned = 0
    needles = [x.encode() for x in (q, server, cls, namespace) if x]
    # COUNT is a hint: about `count` records a batch without a filter, bigger steps while
    # searching. Each page re-reads its batch with the same step, so one given the same
    # query gets the same batch back.
    step = 1000 if needles else count
    with b.errors():
        while True:
            page: Any = b.redis.hscan(b.keys.agents, scan_at, count=step)
            next_at, got = page
            batch = list(got.items())
            first = 0
            if skip_to is not None:
                keys = [k for k, _ in batch]
                first = keys.index(skip_to) + 1 if skip_to in keys else 0
                skip_to = None
            for i in range(first, len(batch)):
                k, raw = batch[i]
                scanned += 1
                if (_matches(raw, k, needles, q, server, cls, namespace, items)
                        and len(items) == count):
                    if i + 1 < len(batch):
                        return {"items": items, "cursor": f"{scan_at}.{k.decode()}",
                                "scanned": scanned}
                    return {"items": items, "cursor": str(int(next_at)), "scanned": scanned}
            scan_at = int(next_at)
            if scan_at == 0 or scanned >= SCAN_BUDGET:
                return {"items": items, "cursor": str(scan_at), "scanned": scanned}


def _matches(raw: bytes, key: bytes, needles: list[bytes], q: str, server: str, cls: str,
             namespace: str, into: list[dict[str, Any]]) -> bool:
    """Whether record ``raw`` matches the search; appends it to ``into`` if so."""
    # A cheap bytes test first: a search over a million records parses only hits.
    if needles and not all(n in raw or n in key for n in needles):
        return False
    try:
        a = AgentInfo.model_validate_json(raw)
    except ValueError:
        return False
    if ((q and q not in a.name and q not in a.id)
            or (server and a.server != server) or (cls and cls not in a.cls)
            or (namespace and a.namespace != namespace)):
        return False
    into.append(a.model_dump())
    return True


def agent(agent_id: str, mem_start: int = 0, mem_count: int = 50) -> dict[str, Any]:
    """One agent: its record, constructor ``args``/``kwargs`` (or ``args_error``), ``memory``
    ``{items, start, total}`` (a slice of ``mem_count`` from ``mem_start``; negative counts from
    the end) and ``running`` (its calls running now). Raises UnknownAgent."""
    b = _bus.current()
    mem_count = page_size(mem_count, what="mem_count")
    info = admin.agent_info(agent_id)
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
    # As stored (exact, and no class of the user's is needed); an item that is not a Msg is
    # shown as the content of a row, never dropped.
    items = [json.loads(x) for x in raw]
    out["memory"] = {"items": [m if is_msg(m) else {"content": m} for m in items],
                     "start": mem_start, "total": total}
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


def hub_exists(name: str) -> None:
    """Raises UnknownName unless hub ``name`` has messages or members (a hub nobody joined and
    nobody spoke in leaves nothing in Redis, and is not listed by :func:`hubs` either)."""
    b = _bus.current()
    with b.errors():
        found = b.redis.exists(b.keys.hub(name), b.keys.members(name))
    if not found:
        raise UnknownName(f"no hub named {name!r} (no messages, no members); see GET /api/hubs")


def hub_members(name: str) -> list[dict[str, Any]]:
    """The hub's members in the order they joined: ``{id, name, role, watcher, since, joined,
    until}``. Raises UnknownName for a hub that does not exist."""
    from busagent.hub import Hub

    hub_exists(name)
    return [m.model_dump() for m in Hub(name).members()]


def hub_messages(name: str, after: str = "", count: int = 100) -> list[dict[str, Any]]:
    """Up to ``count`` messages after seq ``after`` (exclusive; "": the newest ``count``), in
    order: ``{seq, sent_from, send_to, name, role, content}``. Raises UsageError for a malformed
    ``after`` or ``count``, UnknownName for a hub that does not exist."""
    b = _bus.current()
    key = b.keys.hub(name)
    count = page_size(count)
    if after:
        stream_id(after)
    hub_exists(name)
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
    oldest first: ``{id, t (epoch s), level, logger, msg}``. Raises UsageError for a malformed
    ``after`` or ``count`` (at most 5000), UnknownName for a server with neither a record nor
    log lines."""
    b = _bus.current()
    key = b.keys.logs(server)
    count = page_size(count, 5000)
    if after:
        stream_id(after)
    with b.errors():
        pipe = b.redis.pipeline(transaction=False)
        pipe.exists(key)
        pipe.hexists(b.keys.servers, server)
        if not any(pipe.execute()):
            raise UnknownName(f"no server named {server!r} and no log lines for it; see "
                              "GET /api/servers")
        if after:
            got: Any = b.redis.xrange(key, f"({after}", "+", count=count)
        else:
            newest: Any = b.redis.xrevrange(key, "+", "-", count=count)
            got = list(reversed(newest))
    return [{"id": i.decode(), "t": float(f.get(b"t", b"0")),
             **{k: f.get(k.encode(), b"").decode(errors="replace")
                for k in ("level", "logger", "msg")}} for i, f in got]


def models() -> list[dict[str, Any]]:
    """The global model configs, every secret masked at any depth
    (:func:`busagent.models.masked`: api keys, tokens, passwords, authorization headers,
    passwords inside URLs)."""
    from busagent import models as _models

    return [_models.masked(jsonable(c.model_dump()))
            for c in _models.list_model_configs().values()]
