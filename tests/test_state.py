"""Declared state (issue 11): saved with every committed call in commit.lua's atomic step,
restored after kill -9 recovery, drain, a restart under the same name and ``to_dist()``;
undeclared attributes come from the constructor. Real workers, a real redis-server."""

from __future__ import annotations

import json
import signal
from typing import Any

import pytest
import redis

import busagent
from busagent import DistConf, Msg, ServerClient
from busagent.errors import NotSerializable
from tests.state_agents import Counter, Custom, Registered

from .conftest import Workers, wait_for

MODULE = "tests.state_agents"


def change_counter(c: Any) -> dict[str, Any]:
    """State changed by a reply, a remote method and an async remote method; what to expect."""
    busagent.gather([c(Msg("u", 1)), c(Msg("u", "two")), c.set_inc(10), c.aset_inc(11)])
    return {"inc": 11, "seen": [1, "two"], "scratch": "from the constructor"}


def change_registered(r: Any) -> dict[str, Any]:
    busagent.gather([r(Msg("u", 1)), r(Msg("u", "x"))])
    # ``last`` was a Msg; the tuple, set and bytes come back as themselves.
    return {"notes": repr((1, "x")), "last": "x", "tags": repr(["t1", "t2"]),
            "types": ["tuple", "set", "bytes"], "raw": b"\x00\x00"}


def change_custom(c: Any) -> dict[str, Any]:
    busagent.gather([c(Msg("u", 5)), c(Msg("u", 7))])
    return {"total": 12, "built_with": "load_state_dict"}


CASES = [(Counter, change_counter), (Registered, change_registered), (Custom, change_custom)]


def check(agent: Any, want: dict[str, Any], old_pid: int) -> None:
    got = agent.peek().result(timeout=30)
    assert got["pid"] != old_pid  # rebuilt by another process
    assert {k: got[k] for k in want} == want


@pytest.mark.parametrize(("cls", "change"), CASES, ids=[c.__name__ for c, _ in CASES])
def test_declared_state_survives_kill9_recovery(workers: Workers, cls: type, change: Any
                                                ) -> None:
    p1 = workers.start("w1", MODULE)
    workers.start("w2", MODULE)
    a = cls("a", to_dist=DistConf(server="w1")).ready()
    want = change(a)
    pid = a.peek().result(timeout=30)["pid"]
    p1.send_signal(signal.SIGKILL)
    p1.wait()
    wait_for(lambda: busagent.admin.agent_info(a.agent_id).server == "w2", 30,
             "the agent moved to w2")
    check(a, want, pid)


@pytest.mark.parametrize(("cls", "change"), CASES, ids=[c.__name__ for c, _ in CASES])
def test_declared_state_survives_drain(workers: Workers, cls: type, change: Any) -> None:
    p1 = workers.start("w1", MODULE)
    workers.start("w2", MODULE)
    a = cls("a", to_dist=DistConf(server="w1")).ready()
    want = change(a)
    pid = a.peek().result(timeout=30)["pid"]
    assert ServerClient("w1").stop(drain=True)
    assert p1.wait(30) == 0
    assert busagent.admin.agent_info(a.agent_id).server == "w2"
    check(a, want, pid)


def test_declared_state_survives_a_restart_under_the_same_name(workers: Workers) -> None:
    p1 = workers.start("w1", MODULE)
    c = Counter("c", to_dist=DistConf(server="w1")).ready()
    want = change_counter(c)
    pid = c.peek().result(timeout=30)["pid"]
    p1.send_signal(signal.SIGKILL)
    p1.wait()
    workers.start("w1", MODULE)
    check(c, want, pid)


def test_to_dist_carries_declared_state(workers: Workers) -> None:
    workers.start("w1", MODULE)
    local = Counter("c", inc=3)
    local(Msg("u", "here"))
    local.set_inc(8)
    local.scratch = "set locally"
    c = local.to_dist(server="w1")
    got = c.peek().result(timeout=30)
    assert (got["inc"], got["seen"], got["scratch"]) == (8, ["here"], "from the constructor")
    # Saved with the create's reply: a crash right after still restores it.
    b = busagent.bus.current()
    stored = json.loads(b.redis.get(b.keys.state(c.agent_id)))
    assert stored == {"$dict": {"inc": 8, "seen": ["here"]}}


def test_state_is_readable_and_written_only_when_changed(workers: Workers,
                                                         raw: redis.Redis) -> None:
    workers.start("w1", MODULE)
    c = Counter("c", to_dist=DistConf(server="w1")).ready()
    b = busagent.bus.current()
    key = b.keys.state(c.agent_id)
    assert json.loads(raw.get(key)) == {"$dict": {"inc": 2, "seen": []}}  # the constructor's
    c.set_inc(5).result(timeout=30)
    assert json.loads(raw.get(key)) == {"$dict": {"inc": 5, "seen": []}}
    c.delete()
    wait_for(lambda: not raw.exists(key), what="the state key removed with the agent")


def test_unstorable_state_fails_the_call_and_does_not_wedge_the_agent(workers: Workers) -> None:
    workers.start("w1", MODULE)
    c = Counter("c", to_dist=DistConf(server="w1")).ready()
    c.set_inc(4).result(timeout=30)
    with pytest.raises(NotSerializable, match="inc"):
        c.set_bad().result(timeout=30)
    # The agent went back to its saved state, and keeps serving.
    assert c.peek().result(timeout=30)["inc"] == 4
    assert c.set_inc(6).result(timeout=30) == 4


def test_a_fenced_commit_does_not_write_state(workers: Workers) -> None:
    """A worker frozen mid-call is presumed dead; its call re-runs on w2 and later calls change
    the state there. When w1 wakes, its stale commit is refused whole: the state stays w2's."""
    p1 = workers.start("w1", MODULE)
    workers.start("w2", MODULE)
    c = Counter("c", to_dist=DistConf(server="w1")).ready()
    p = c.hold(2.0)
    wait_for(lambda: ServerClient("w1").get_server_info()["inflight"] == 1, what="call running")
    p1.send_signal(signal.SIGSTOP)
    try:
        assert p.result(timeout=30) == 3  # run again on w2 from the saved inc=2
        assert c.set_inc(100).result(timeout=30) == 3
    finally:
        p1.send_signal(signal.SIGCONT)
    assert p1.wait(30) == 0  # finished its copy, was refused at commit, stopped
    b = busagent.bus.current()
    assert json.loads(b.redis.get(b.keys.state(c.agent_id)))["$dict"]["inc"] == 100
    assert c.peek().result(timeout=30)["inc"] == 100
