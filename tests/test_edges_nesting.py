"""Issue 10, items 5, 6 and 12, with real worker processes and a real redis-server: nested
blocking calls of any depth on one worker, call cycles refused with the cycle named, and a
delete racing with a running call."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

import busagent
from busagent import DistConf, Msg, Placeholder, ServerClient
from busagent.errors import CallCycle
from busagent.protocol import CallBody
from busagent.worker.mailboxes import Mailboxes, Turn
from tests.nesting_agents import AsyncRelay, Caller, Gate, Relay

from .conftest import Workers, wait_for

MOD = "tests.nesting_agents"


def _chains(width: int, depth: int, server: str, hold: float) -> list[busagent.RemoteAgent]:
    """``width`` chains of ``depth`` Relays each on ``server``; the tops, in order."""
    on = DistConf(server=server)
    level = busagent.create_many(Relay, [((f"leaf{i}",), {"hold": hold}) for i in range(width)],
                                 to_dist=on)
    for d in range(1, depth):
        level = busagent.create_many(
            Relay, [((f"r{d}-{i}", a.agent_id), {}) for i, a in enumerate(level)], to_dist=on)
    for a in level:
        a.ready()
    return level


@pytest.mark.parametrize(("width", "depth"), [(300, 2), (100, 4)])
def test_hundreds_of_nested_blocking_calls_on_one_worker_finish(
        workers: Workers, width: int, depth: int) -> None:
    # Eight threads and hundreds of replies that each block on a helper hosted on the same
    # worker: without lending the blocked thread's place, every thread blocks in `.content`
    # and nothing is left to run the helpers (CallTimeout).
    workers.start("w1", MOD, extra=["--threads", "8"])
    tops = _chains(width, depth, "w1", hold=0.2)
    got = busagent.gather([a(Msg("user", 0)) for a in tops], timeout=90)
    assert [m.content for m in got] == [depth] * width
    state = ServerClient("w1").state()
    assert state["blocked"] == 0
    # The lent threads retire once the blocked ones are back and there is nothing to do.
    wait_for(lambda: ServerClient("w1").state()["runners"] == 8, what="surplus runners retire")


def _cycle(names: list[str], servers: list[str], cls: type = Relay) -> list[busagent.RemoteAgent]:
    agents = [cls(n, to_dist=DistConf(server=s)).ready()
              for n, s in zip(names, servers, strict=True)]
    for a, b in zip(agents, agents[1:] + agents[:1], strict=True):
        a.point_to(b.agent_id).result(timeout=10)
    return agents


def test_an_agent_that_calls_itself_is_refused_at_once(workers: Workers) -> None:
    workers.start("w1", MOD)
    (a,) = _cycle(["a"], ["w1"])
    # Without the chain the call waits for itself until the deadline (CallTimeout here).
    with pytest.raises(CallCycle, match=r"call cycle refused: a -> a"):
        a(Msg("user", 0)).result(timeout=20)
    a.point_to("").result(timeout=10)
    assert a(Msg("user", 0)).content == 1  # not wedged


def test_a_cycle_across_workers_is_refused_naming_it(workers: Workers) -> None:
    workers.start("w1", MOD)
    workers.start("w2", MOD)
    a, b, c = _cycle(["a", "b", "c"], ["w1", "w2", "w1"])
    with pytest.raises(CallCycle, match=r"a -> b -> c -> a"):
        a(Msg("user", 0)).result(timeout=20)
    # Started elsewhere in the loop, the cycle is named from there.
    with pytest.raises(CallCycle, match=r"b -> c -> a -> b"):
        b(Msg("user", 0)).result(timeout=20)
    c.point_to("").result(timeout=10)  # break the loop: a -> b -> c is a plain chain
    assert a(Msg("user", 0)).content == 3


def test_an_async_cycle_is_refused(workers: Workers) -> None:
    workers.start("w1", MOD)
    a, _ = _cycle(["x", "y"], ["w1", "w1"], AsyncRelay)
    with pytest.raises(CallCycle, match=r"x -> y -> x"):
        a(Msg("user", 0)).result(timeout=20)


def test_a_diamond_is_not_a_cycle(workers: Workers) -> None:
    # The chain is per path: two calls reaching one agent by different paths are fine.
    workers.start("w1", MOD)
    d = Relay("d", to_dist=DistConf(server="w1")).ready()
    b = Relay("b", d.agent_id, to_dist=DistConf(server="w1")).ready()
    c = Relay("c", d.agent_id, to_dist=DistConf(server="w1")).ready()
    assert [m.content for m in busagent.gather([b(Msg("user", 0)), c(Msg("user", 5))],
                                               timeout=20)] == [2, 7]


def test_delete_all_while_a_call_runs_leaves_no_key_behind(
        workers: Workers, tmp_path: Path) -> None:
    workers.start("w1", MOD)
    b = busagent.bus.current()
    started, go = tmp_path / "started", tmp_path / "go"
    g = Gate("g", str(started), str(go), to_dist=DistConf(server="w1")).ready()
    g(Msg("user", "warm up"))  # a first call that completes: the memory key exists
    go.touch()
    wait_for(lambda: b.redis.llen(b.keys.memory(g.agent_id)) == 2, what="first call's memory")
    go.unlink()
    started.unlink()
    p = g(Msg("user", "racing"))
    wait_for(started.exists, what="the call to start")
    assert ServerClient("w1").delete_all_agent() == 1
    assert not b.redis.exists(b.keys.memory(g.agent_id))
    go.touch()  # the running call finishes after the delete and commits
    assert p.content == "done"
    # The commit must not re-create the deleted agent's memory (or any record of it).
    assert not b.redis.exists(b.keys.memory(g.agent_id))
    assert not b.redis.hexists(b.keys.agents, g.agent_id)
    assert not b.redis.hexists(b.keys.specs, g.agent_id)
    leftover = [k for k in b.redis.scan_iter(f"{b.keys.prefix}:*")
                if g.agent_id.encode() in k]
    assert leftover == []
    time.sleep(0)  # nothing else in flight: the worker still serves
    assert ServerClient("w1").ping() > 0


def test_the_worker_refuses_a_cycle_a_sender_did_not_check(workers: Workers) -> None:
    # A hand-made call whose chain already holds its agent (another version's sender, a
    # replayed entry): the worker refuses it too, before running anything.
    workers.start("w1", MOD)
    a = Relay("a", to_dist=DistConf(server="w1")).ready()
    b = busagent.bus.current()
    body = CallBody(args=[Msg("user", 0)], chain=[("f00d", "outer"), (a.agent_id, "a")]).pack()
    p = Placeholder(busagent.bus.new_id(), a.agent_id)
    b.sender.route(a.agent_id, p.call_id, "call", body, p._fail)
    with pytest.raises(CallCycle, match=r"a -> outer -> a|a -> a"):
        p.result(timeout=20)
    assert a(Msg("user", 0)).content == 1


def test_lent_threads_are_counted_and_retire() -> None:
    # The pool's arithmetic without processes: a blocked runner asks for one more while fewer
    # than `threads` are free, and the surplus retires once it is back.
    mb = Mailboxes(threads=2)
    assert mb.block() is True and mb.runners == 3
    assert mb.block() is True and mb.runners == 4
    mb.unblock()
    assert mb.claim() is Turn.EXIT and mb.runners == 3  # surplus and idle: retire
    mb.unblock()
    assert mb.claim() is Turn.EXIT and mb.runners == 2
    assert mb.claim() is Turn.READ  # back to the pool's own size: lead a read


@pytest.mark.parametrize("how", ["delete", "delete_all"])
def test_a_deleted_agent_leaves_no_hub_membership_behind(workers: Workers, how: str) -> None:
    """Item 12, hubs: an agent deleted (alone, or with all of its server's agents) while a member
    of hubs, with nothing in flight, leaves no member record, cursor or leave record in any hub;
    a publish that names its role is then refused, not accepted for nobody."""
    workers.start("w1", MOD)
    b = busagent.bus.current()
    r = Relay("r", to_dist=DistConf(server="w1")).ready()
    keep = Relay("keep", to_dist=DistConf(server="w1")).ready()
    hubs = [busagent.Hub(f"room{i}") for i in range(2)]
    for h in hubs:
        h.join(r, role="critic")
        h.join(keep, role="writer")
        h.publish(Msg("user", "hello"), send_to="critic")
    wait_for(lambda: all(b.redis.hexists(b.keys.members(h.name), f"~cursor:{r.agent_id}")
                         for h in hubs), what="the members' cursors")
    if how == "delete":
        assert r.delete() is True
    else:
        assert ServerClient("w1").delete_all_agent() == 2
    for h in hubs:
        fields = [f.decode() for f in b.redis.hkeys(b.keys.members(h.name))]
        assert not [f for f in fields if r.agent_id in f], fields
        with pytest.raises(busagent.errors.ConfigError, match="critic"):
            h.publish(Msg("user", "anyone?"), send_to="critic")
    leftover = [k for k in b.redis.scan_iter(f"{b.keys.prefix}:*") if r.agent_id.encode() in k]
    assert leftover == []


@pytest.mark.parametrize("servers", [("w1", "w1"), ("w1", "w2")])
def test_a_callback_to_an_agent_that_no_longer_waits_is_no_cycle(
        workers: Workers, tmp_path: Path, servers: tuple[str, str]) -> None:
    """Item 6, false cycles: A's reply calls B without waiting and returns; B's reply then
    calls A and waits. A is in B's chain but no longer busy with that call: B gets A's answer,
    on one worker or across two."""
    for s in sorted(set(servers)):
        workers.start(s, MOD)
    out = tmp_path / "b.out"
    a = Caller("a", wait=False, to_dist=DistConf(server=servers[0])).ready()
    b = Caller("b", a.agent_id, wait=True, out=str(out), to_dist=DistConf(server=servers[1]))
    b.ready()
    a.point_to(b.agent_id).result(timeout=20)
    assert a(Msg("user", "go")).result(timeout=20).content == "a returned"
    wait_for(out.exists, what="b's call to a to end")
    assert out.read_text() == "ok a called back"


@pytest.mark.parametrize("servers", [("w1", "w1"), ("w1", "w2")])
@pytest.mark.parametrize("how", [True, "thread"])
def test_a_cycle_is_refused_at_once_from_the_reply_or_a_thread_it_starts(
        workers: Workers, servers: tuple[str, str], how: bool | str) -> None:
    """Item 6, real cycles: A's reply waits for B (directly, or in a thread it starts with
    ThreadPoolExecutor), whose reply calls A and waits. Refused with CallCycle naming the cycle,
    not a CallTimeout at the deadline; on one worker or across two."""
    for s in sorted(set(servers)):
        workers.start(s, MOD)
    a = Caller("a", wait=how, to_dist=DistConf(server=servers[0])).ready()
    b = Caller("b", a.agent_id, wait=True, to_dist=DistConf(server=servers[1])).ready()
    a.point_to(b.agent_id).result(timeout=20)
    with pytest.raises(Exception, match="cycle") as got:
        a(Msg("user", "go")).result(timeout=40)
    assert "CallTimeout" not in type(got.value).__name__
    assert "a -> b -> a" in str(got.value)
