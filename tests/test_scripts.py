"""Each Lua script through its one Python function, on the test Redis without workers: the KEYS
and ARGV order that only busagent/scripts.py knows, exercised end to end."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest

import busagent
from busagent import replies, scripts
from busagent.errors import DeadLettered, UnknownAgent
from busagent.keys import GROUP
from busagent.protocol import VERSION, CallBody, Entry, Reply
from busagent.records import AgentInfo, ServerInfo
from busagent.tuning import SENT_MARK_TTL


def _server(b: busagent.bus.Bus, name: str) -> None:
    info = ServerInfo(name=name, host="h", pid=1, started=0.0, heartbeat=0.0, capacity=10)
    b.redis.hset(b.keys.servers, name, info.model_dump_json())
    b.redis.xgroup_create(b.keys.inbox(name), GROUP, id="0", mkstream=True)


def _agent(b: busagent.bus.Bus, agent: str, server: str) -> AgentInfo:
    info = AgentInfo(id=agent, name=agent, cls="m:C", server=server, created=0.0)
    b.redis.hset(b.keys.agents, agent, info.model_dump_json())
    return info


def _read(b: busagent.bus.Bus, server: str) -> list[tuple[bytes, Entry]]:
    got: Any = b.redis.xreadgroup(GROUP, server, {b.keys.inbox(server): ">"})
    return [(i, Entry.from_fields(f)) for _, es in got or [] for i, f in es]


def test_route_commit_and_collect(bus: busagent.bus.Bus) -> None:
    b, k = bus, bus.keys
    _server(b, "s1")
    _agent(b, "a1", "s1")
    body = CallBody(args=[1]).pack()
    add = scripts.route(b.scripts, k, [("c1", "a1", ""), ("c2", "nobody", "")], kind="call",
                        body=body, caller="me", version=VERSION, reply_ttl=60,
                        sent_ttl=SENT_MARK_TTL)
    add(b.redis)
    add(b.redis)  # resent after a broken connection: routed once
    [(entry_id, e)] = _read(b, "s1")
    assert (e.kind, e.call, e.agent, e.caller, e.body) == ("call", "c1", "a1", "me", body)
    assert 0 < int(b.redis.ttl(k.sent("c1"))) <= SENT_MARK_TTL
    with pytest.raises(UnknownAgent, match="nobody is not registered"):
        replies.decode(replies.peek(b, ["c2"])["c2"])

    done = SimpleNamespace(entry_id=entry_id, call_id="c1", reply=Reply.ok(2), agent_id="a1",
                           mem_cleared=False, mem_new=['"x"'], state='{"n": 1}', drop=False)
    assert scripts.commit(b.scripts, k, k.inbox("s1"), 60, [done]) == 0
    done.state = '{"n": 2}'
    assert scripts.commit(b.scripts, k, k.inbox("s1"), 60, [done]) == 1  # fenced: not pending
    assert b.redis.get(k.state("a1")) == b'{"n": 1}'  # the fenced commit wrote no state
    assert b.redis.lrange(k.memory("a1"), 0, -1) == [b'"x"'] and b.redis.xlen(k.inbox("s1")) == 0
    assert replies.decode(replies.fetch(b, ["c1"], timeout=5)["c1"]) == 2
    assert asyncio.run(replies.afetch(b, ["c1", "c2"], timeout=5)).keys() == {"c1", "c2"}
    assert replies.peek(b, ["c1", "c2", "c3"], take=True).keys() == {"c1", "c2"}
    assert replies.peek(b, ["c1", "c2"]) == {}


def test_heartbeat_is_fenced_and_scripts_reload(bus: busagent.bus.Bus) -> None:
    b, k = bus, bus.keys
    rec = ServerInfo(name="s1", host="h", pid=1, started=0.0, heartbeat=1.0, capacity=1)
    b.redis.script_flush()  # Redis restarted empty: NOSCRIPT, loaded again
    ok, now = scripts.heartbeat(b.scripts, k, "s1", rec.model_dump_json(exclude={"heartbeat"}))
    assert ok
    # stamped with Redis's clock, not the record's
    assert ServerInfo.model_validate_json(b.redis.hget(k.servers, "s1") or b"").heartbeat == now
    dead = rec.model_copy(update={"status": "dead"})
    b.redis.hset(k.servers, "s1", dead.model_dump_json())
    assert not scripts.heartbeat(b.scripts, k, "s1", rec.model_dump_json(exclude={"heartbeat"}))[0]


def test_move_restores_moves_and_deadletters(bus: busagent.bus.Bus) -> None:
    b, k, s = bus, bus.keys, bus.settings
    _server(b, "old")
    _server(b, "new")
    info = _agent(b, "a1", "old")
    fresh = Entry.new(None, "call", b"", call="c1", agent="a1").fields()
    tired = {**Entry.new(None, "call", b"", call="c2", agent="a1").fields(),
             "tries": s.max_deliveries - 1}
    ids = [b.redis.xadd(k.inbox("old"), f) for f in (fresh, tired)]  # type: ignore[arg-type]
    b.redis.xreadgroup(GROUP, "old", {k.inbox("old"): ">"})
    restore = Entry.new(None, "restore", b"", agent="a1", caller="recovery")
    record = info.model_copy(update={"server": "new"}).model_dump_json()
    move = scripts.Move("a1", "new", record, restore.fields(), ids[:1])  # c2: after the snapshot
    assert scripts.move(b.scripts, k, "old", ids[0], [move], reply_ttl=60,
                        max_deliveries=s.max_deliveries, deadletter_max=100) == (1, 1)
    assert [(e.kind, e.call, e.tries) for _, e in _read(b, "new")] == [("restore", "", 0),
                                                                        ("call", "c1", 1)]
    assert AgentInfo.model_validate_json(b.redis.hget(k.agents, "a1") or b"").server == "new"
    with pytest.raises(DeadLettered):
        replies.decode(replies.peek(b, ["c2"])["c2"])
    assert b.redis.xlen(k.inbox("old")) == 0 and b.redis.xlen(k.deadletter) == 1
