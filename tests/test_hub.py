"""Hubs, routing policies, the task center, streaming and humans, with real workers."""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import pytest

import busagent
from busagent import (
    Direct,
    DistConf,
    Function,
    Hub,
    Human,
    Msg,
    Random,
    RemoteError,
    RoundRobin,
    TaskCenter,
)
from busagent.errors import ConfigError

from .agents import Adder, Member, Streamer, SyncStreamer
from .conftest import Workers, wait_for


def heard(agent: Any) -> list[list[str]]:
    if isinstance(agent, busagent.RemoteAgent):
        return list(agent.heard().result(timeout=10))
    return list(agent.heard())


def test_every_member_sees_one_order_across_workers(workers: Workers) -> None:
    workers.start("w1")
    workers.start("w2")
    members = [Member(f"m{i}", to_dist=DistConf(server=f"w{i % 2 + 1}")) for i in range(4)]
    hub = Hub("order")
    for m in members:
        hub.join(m.ready())
    local = Member("local")
    hub.join(local)

    def publish(who: str) -> None:  # two publishers at once, interleaving
        for i in range(40):
            hub.publish(Msg(who, f"{who}-{i}"))

    ts = [threading.Thread(target=publish, args=(w,)) for w in ("alice", "bob")]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    order = [[h.seq, str(h.msg.content)] for h in hub.history()]
    assert len(order) == 80
    for m in members:
        wait_for(lambda m=m: len(heard(m)) == 80, 20, f"{m.name} heard everything")
        assert heard(m) == order
    assert heard(local) == order
    # publishing did not wait for receivers: the notices are calls, never awaited


def test_late_join_catch_up_and_restart(workers: Workers) -> None:
    w1 = workers.start("w1")
    workers.start("w2")
    hub = Hub("late")
    early = Member("early", to_dist=DistConf(server="w1")).ready()
    hub.join(early)
    for i in range(5):
        hub.publish(Msg("user", f"before-{i}"))
    late = Member("late", to_dist=DistConf(server="w2")).ready()
    fresh = Member("fresh", to_dist=DistConf(server="w2")).ready()
    hub.join(late, history=True)
    hub.join(fresh, history=False)
    wait_for(lambda: len(heard(late)) == 5, 10, "the late member caught up")
    assert heard(fresh) == []
    hub.publish(Msg("user", "after"))
    wait_for(lambda: len(heard(fresh)) == 1, 10, "the fresh member got the new message")
    wait_for(lambda: len(heard(early)) == 6, 10, "early heard all six")

    # early's worker dies; early is rebuilt on w2 with its memory and resumes where it was
    w1.kill()
    w1.wait()
    wait_for(lambda: busagent.admin.agent_info(early.agent_id).server == "w2", 20,
             "early moved to w2")
    hub.publish(Msg("user", "after-restart"))
    wait_for(lambda: len(heard(early)) == 7, 20, "early heard the message after its restart")
    contents = [c for _, c in heard(early)]
    assert contents == [f"before-{i}" for i in range(5)] + ["after", "after-restart"]


def test_routing_policies_local_and_remote(workers: Workers) -> None:
    workers.start("w1")
    hub = Hub("routes")
    rs = [Member(f"r{i}") for i in range(3)]
    for m in rs:
        hub.join(m, role="reviewer")
    boss = Member("boss", to_dist=DistConf(server="w1")).ready()
    hub.join(boss, role="boss")
    log = Member("log", to_dist=DistConf(server="w1")).ready()
    hub.join(log, watcher=True)

    hub.publish(Msg("user", "to all"))                                     # broadcast
    hub.publish(Msg("user", "to boss"), send_to="boss")                    # a role
    hub.publish(Msg("user", "to r1"), routing=Direct(rs[1]))               # direct, an agent
    for i in range(6):
        hub.publish(Msg("user", f"rr{i}"), routing=RoundRobin(role="reviewer"))
    picked = hub.publish(Msg("user", "one at random"), routing=Random(k=1, role="reviewer"))
    hub.publish(Msg("user", "by function"),
                routing=Function(lambda msg, ms: [m for m in ms if m.name.endswith("2")]))

    got = {m.name: [c for _, c in heard(m)] for m in rs}
    rr = {m.name: [c for c in got[m.name] if c.startswith("rr")] for m in rs}
    assert rr == {"r0": ["rr0", "rr3"], "r1": ["rr1", "rr4"], "r2": ["rr2", "rr5"]}
    assert all("to all" in got[n] for n in got)
    assert [n for n in got if "to r1" in got[n]] == ["r1"]
    to = hub.history(picked, 1)[0].send_to
    assert len(to) == 1
    assert [n for n in got if "one at random" in got[n]] == [
        next(m.name for m in rs if m.agent_id == to[0])]
    assert [n for n in got if "by function" in got[n]] == ["r2"]
    assert not any("to boss" in got[n] for n in got)
    wait_for(lambda: [c for _, c in heard(boss)] == ["to all", "to boss"], 10, "boss's two")
    # the watcher sees everything, in order, and may not publish
    wait_for(lambda: len(heard(log)) == len(hub.history()), 10, "the watcher saw all")
    with pytest.raises(ConfigError, match="watcher"):
        hub.publish(Msg("log", "hi"), sent_from=log)
    with pytest.raises(ConfigError, match="no member"):
        hub.publish(Msg("user", "x"), send_to="nobody")
    # every message records who sent it and to whom
    h = hub.history()[1]
    assert h.sent_from == "user" and h.send_to == ["role:boss"]


def test_watch_sees_everything_as_it_comes(bus: busagent.bus.Bus) -> None:
    hub = Hub("watched")
    a = Member("a")
    hub.join(a)
    seen: list[str] = []
    started = threading.Event()

    def watch() -> None:
        started.set()
        for m in hub.watch(start="0", timeout=2, block_ms=100):
            seen.append(str(m.msg.content))
            if len(seen) == 3:
                return

    t = threading.Thread(target=watch)
    t.start()
    started.wait()
    for c in ("one", "two", "three"):
        hub.publish(Msg("user", c), send_to=a)
    t.join(10)
    assert seen == ["one", "two", "three"]


def test_stream_followed_by_two_readers(workers: Workers) -> None:
    workers.start("w1")
    s = Streamer("s", to_dist=True)
    p = s(Msg("user", "one two three four five"))
    results: list[list[Any]] = [[], []]

    def read(i: int) -> None:
        results[i] = list(p.stream(timeout=20))

    ts = [threading.Thread(target=read, args=(i,)) for i in range(2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert results[0] == results[1]
    types = [e.type for e in results[0]]
    assert types == ["start"] + ["chunk"] * 5 + ["end"]
    assert [e.seq for e in results[0]] == list(range(7))
    assert "".join(e.data for e in results[0] if e.type == "chunk") == "one two three four five"
    assert p.result(timeout=10) == "one two three four five"
    # a third reader, after the end, still gets the whole stream from its start
    assert [e.type for e in busagent.Placeholder.from_id(p.call_id).stream(timeout=5)] == types

    # a plain generator that fails halfway: three chunks, then an error event, and the error
    ss = SyncStreamer("ss", to_dist=True)
    bad = ss(Msg("user", "fail"))
    evs = list(bad.stream(timeout=10))
    assert [e.type for e in evs] == ["start", "chunk", "chunk", "chunk", "error"]
    assert evs[-1].data["type"] == "ValueError"
    with pytest.raises(RemoteError, match="broke after three parts"):
        bad.result(timeout=10)
    # a reply that does not stream, called with .stream(): one chunk holding the value
    a = Adder("a", to_dist=True)
    evs = list(a.stream(Msg("user", 1)).stream(timeout=10))
    assert [e.type for e in evs] == ["start", "chunk", "end"] and evs[1].data.content == 2


def test_human_timeout_is_skipped_not_a_hang(workers: Workers) -> None:
    workers.start("w1")
    center = TaskCenter("with-human", deadline=10)
    bot = Member("bot", to_dist=True).ready()
    human = Human("alice", mode="chatbot", timeout=0.3)
    center.add_agents([bot, human], roles=["bot", "user"])
    center.send_task_request("say something", send_to="all", send_from="moderator")
    t = time.monotonic()
    events = list(center.step())
    assert time.monotonic() - t < 5
    by = {(e.role, e.type) for e in events}
    assert ("user", "skipped") in by and ("bot", "end") in by
    # chatbot mode: the UI's answer is published for the others
    center.send_task_request("and now?", send_to="user", send_from="moderator")
    events = list(center.step(user_response="I am here"))
    end = [e for e in events if e.type == "end"]
    assert [(e.role, e.data) for e in end] == [("user", "I am here")]
    assert center.hub.history()[-1].sent_from == "alice"

    # terminal mode reads a line from its terminal, or times out
    r, w = os.pipe()
    with os.fdopen(r) as rf, os.fdopen(w, "w") as wf, open(os.devnull, "w") as null:
        h = Human("bob", mode="terminal", timeout=0.2, stdin=rf, stdout=null)
        assert h.reply() is None
        wf.write("hello\n")
        wf.flush()
        assert h.reply() == "hello"


def test_three_roles_over_two_workers(workers: Workers) -> None:
    workers.start("w1")
    workers.start("w2")
    writer = Streamer("writer", to_dist=DistConf(server="w1")).ready()
    critic = Member("critic", to_dist=DistConf(server="w2")).ready()
    editor = Member("editor", delay=0.2, to_dist=DistConf(server="w1")).ready()
    center = TaskCenter("room", deadline=20)
    center.add_agents([writer, critic, editor], roles=["writer", "critic", "editor"])
    center.send_task_request("write a line", send_to="writer")
    events = list(center.step(round=3))
    spoke = {}
    for e in events:
        if e.type == "end":
            spoke.setdefault(e.round, set()).add(e.role)
    # the writer was asked; its line went to everyone, so the other two spoke (in parallel);
    # then each of the three had heard something new since its turn
    assert spoke == {1: {"writer"}, 2: {"critic", "editor"}, 3: {"writer", "critic", "editor"}}
    assert [e.type for e in events if e.role == "writer" and e.round == 1][:2] == [
        "start", "chunk"]
    history = center.hub.history()
    assert history[0].sent_from == "user_requirement"  # ModelScope's task sender
    assert len(history) == 1 + 1 + 2 + 3
    assert {h.sent_from for h in history} == {"user_requirement", "writer", "critic", "editor"}
    # the task was for the writer only; the critic's first message is the writer's line
    assert heard(critic)[0][1] == "writer says hello to everyone"
    # code picks the speaker
    ev = [e for e in center.step(speakers=["critic"]) if e.type == "end"]
    assert [e.role for e in ev] == ["critic"]


def test_delivery_is_a_worker_builtin_and_by_id_reads_the_record(workers: Workers) -> None:
    import gc

    from busagent import UnknownAgent, UnknownClass
    from busagent.hub import Cursor, _cursors

    # The base agent knows neither hubs nor proxies: no hub methods to call remotely.
    assert not hasattr(busagent.Agent, "catch_up") and not hasattr(busagent.Agent, "speak")
    workers.start("w1")
    m = Member("m", to_dist=DistConf(server="w1")).ready()
    again = busagent.RemoteAgent.by_id(m.agent_id)
    assert (again.name, again.cls, again.server) == ("m", Member, "w1")
    with pytest.raises(UnknownAgent):
        busagent.RemoteAgent.by_id("no-such-agent")
    hub = Hub("builtin")
    hub.join(again)
    hub.publish(Msg("user", "one"))
    wait_for(lambda: [c for _, c in heard(m)] == ["one"], 10, "delivered on the worker")
    # A turn on the worker: catch up, reply from memory, streamed; the count is of hub messages
    p = busagent.proxy.deliver([m.agent_id], "builtin", speak=True)[0]
    assert [e.type for e in p.stream(timeout=10)] == ["start", "chunk", "end"]
    assert p.result(timeout=10) == "m heard 1"

    # A local member's cursor lives beside the agent, not in it, and goes with it.
    local = Member("local")
    hub.join(local)
    assert "_hub_cursors" not in vars(local) and "_hub_lock" not in vars(local)
    assert Cursor.of(local).at["builtin"] == hub.last_seq()
    agent_id = local.agent_id
    hub.leave(local)  # the hub held the last other reference
    del local
    gc.collect()
    assert agent_id not in _cursors
    # by_id never imports a class named in Redis
    b = busagent.bus.current()
    b.redis.hset(b.keys.agents, "ghost", busagent.records.AgentInfo(
        id="ghost", name="g", cls="not.imported:X", server="w1", created=0).model_dump_json())
    with pytest.raises(UnknownClass, match=r"import not\.imported"):
        busagent.RemoteAgent.by_id("ghost")
