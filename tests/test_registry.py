"""What a user with only redis-cli sees, and liveness of servers."""

from __future__ import annotations

import json
import signal

import redis

import busagent
from busagent import DistConf, Msg, ServerClient
from busagent.protocol import VERSION
from tests.agents import Adder, Sleeper

from .conftest import Workers, wait_for


def test_registry_is_readable_with_plain_redis(workers: Workers, raw: redis.Redis,
                                                prefix: str) -> None:
    workers.start("w1")
    a = Adder("alice", inc=2, to_dist=DistConf(server="w1"))
    a(Msg("user", 40)).result()

    server = json.loads(raw.hget(f"{prefix}:servers", "w1"))
    for field in ("host", "pid", "started", "heartbeat", "cpu", "mem", "agents", "capacity",
                  "modules"):
        assert field in server, field
    assert server["modules"] == ["tests.agents"]
    wait_for(lambda: json.loads(raw.hget(f"{prefix}:servers", "w1"))["agents"] == 1,
             what="heartbeat with the agent count")

    b = busagent.bus.current()
    agent = json.loads(raw.hget(f"{prefix}:agents", a.agent_id))
    assert agent == {"id": a.agent_id, "name": "alice", "cls": "tests.agents:Adder",
                     "server": "w1", "created": agent["created"],
                     # issue 11: its namespace, registered name and owning program
                     "namespace": b.namespace, "registered": None, "owner": b.program}
    memory = [json.loads(x) for x in raw.lrange(f"{prefix}:memory:{a.agent_id}", 0, -1)]
    assert [(m["name"], m["content"]) for m in memory] == [("user", 40)]


def test_stream_headers_are_readable_in_xrange(workers: Workers, redis_url: str,
                                               prefix: str) -> None:
    workers.start("w1")
    r = redis.Redis.from_url(redis_url)  # the body is msgpack: bytes, as redis-cli shows it
    inbox = f"{prefix}:inbox:w1"
    s = Sleeper("s", 1.0, to_dist=DistConf(server="w1")).ready()
    ps = [s(None) for _ in range(3)]
    # While the first call sleeps the others wait in the inbox (read, not yet acknowledged).
    entries = wait_for(lambda: [f for _, f in r.xrange(inbox) if f.get(b"kind") == b"call"],
                       what="queued calls in the inbox")
    fields = {k.decode(): v for k, v in entries[-1].items()}
    assert fields["agent"].decode() == s.agent_id
    assert fields["call"].decode() in {p.call_id for p in ps}
    assert fields["v"] == str(VERSION).encode() and b":" in fields["caller"]
    busagent.gather(ps, timeout=20)
    # Answered calls are acknowledged and deleted: the stream holds only what is in flight.
    wait_for(lambda: r.xlen(inbox) == 0, what="an empty inbox")
    assert r.xpending(inbox, "workers")["pending"] == 0
    assert 0 < r.ttl(f"{prefix}:reply:{ps[0].call_id}") <= 3600
    r.close()


def test_killed_server_is_shown_dead(workers: Workers) -> None:
    p = workers.start("w1")
    assert ServerClient("w1").is_alive()
    p.send_signal(signal.SIGKILL)
    p.wait()
    wait_for(lambda: not ServerClient("w1").is_alive(), timeout=10, what="w1 shown dead")
    rows = {s["name"]: s for s in busagent.servers()}
    assert rows["w1"]["alive"] is False and rows["w1"]["state"] == "dead"
    # Placement no longer picks it.
    import pytest

    from busagent.errors import PlacementError

    with pytest.raises(PlacementError):
        Adder("x", to_dist=DistConf(server="w1"))


def test_sigterm_stops_gracefully_with_calls_in_flight(workers: Workers, prefix: str,
                                                       raw: redis.Redis) -> None:
    p = workers.start("w1")
    s = Sleeper("s", 1.0, to_dist=DistConf(server="w1")).ready()
    q = s(None)
    wait_for(lambda: json.loads(raw.hget(f"{prefix}:servers", "w1"))["inflight"] == 1,
             what="the call running (heartbeat shows it in flight)")
    p.send_signal(signal.SIGTERM)
    # The call already running finishes and is answered.
    assert q.result(timeout=10).content == "s()"
    assert p.wait(20) == 0
    assert raw.hget(f"{prefix}:servers", "w1") is None
