"""Fault injection with real processes: workers killed (-9), frozen (SIGSTOP), stopped; Redis
killed and restarted; FLUSHALL; poison calls. Each checks that every call is answered exactly
once (its reply list holds one element) and nothing is left pending."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import redis

import busagent
from busagent import DistConf, Msg, Placeholder, ServerClient, embedded
from busagent.errors import CallTimeout, ProtocolError, UnknownAgent
from tests.agents import Adder, Killer, Recorder, Sleeper

from ..conftest import FAST, Workers, wait_for


def answered_once(b: busagent.bus.Bus, ps: list[Placeholder]) -> None:
    counts = [b.redis.llen(b.keys.reply(p.call_id)) for p in ps]
    assert counts == [1] * len(ps), f"reply counts: {sorted(set(counts))}"


def nothing_pending(b: busagent.bus.Bus, *servers: str) -> None:
    for s in servers:
        inbox = b.keys.inbox(s)
        if b.redis.exists(inbox):
            wait_for(lambda inbox=inbox: b.redis.xpending(inbox, "workers")["pending"] == 0,
                     what=f"no pending entries on {s}")


@pytest.mark.parametrize("inflight", [1, 10, 100])
def test_kill9_moves_agents_with_memory_and_answers_every_call_once(
        workers: Workers, inflight: int) -> None:
    p1 = workers.start("w1")
    workers.start("w2")
    workers.start("w3")
    b = busagent.bus.current()
    recs = [Recorder(f"r{i}", hold=0.3, to_dist=DistConf(server="w1")) for i in range(5)]
    # Memory before the crash, which must survive it.
    busagent.gather([r(Msg("before", i)) for i, r in enumerate(recs)])
    ps = [recs[i % 5](Msg("during", i)) for i in range(inflight)]
    b.sender.flush()
    # Entries stay in the inbox until answered: these calls are in flight on w1.
    assert b.redis.xlen(b.keys.inbox("w1")) > 0
    p1.send_signal(signal.SIGKILL)
    p1.wait()
    out = busagent.gather(ps, timeout=60)
    assert len(out) == inflight
    answered_once(b, ps)
    for i, r in enumerate(recs):
        info = busagent.admin.agent_info(r.agent_id)
        assert info.server in {"w2", "w3"}
        mem = [(m.name, m.content) for m in r.memory.get()]
        mine = [("during", j) for j in range(inflight) if j % 5 == i]
        assert mem == [("before", i), *mine], mem
    # The moved agents keep serving, in order, with their memory.
    assert recs[0](Msg("after", 0)).content == len(recs[0].memory.get())
    nothing_pending(b, "w2", "w3")
    assert not b.redis.exists(b.keys.inbox("w1"))
    wait_for(lambda: not ServerClient("w1").is_alive(), what="w1 shown dead")


def test_frozen_worker_cannot_answer_twice(workers: Workers) -> None:
    p1 = workers.start("w1")
    workers.start("w2")
    b = busagent.bus.current()
    s = Sleeper("s", 2.0, to_dist=DistConf(server="w1")).ready()
    p = s(Msg("user", "x"))
    wait_for(lambda: ServerClient("w1").get_server_info()["inflight"] == 1, what="call running")
    p1.send_signal(signal.SIGSTOP)  # frozen mid-call: presumed dead, its call moved to w2
    try:
        assert p.result(timeout=30).content == "s(x)"
        assert busagent.admin.agent_info(s.agent_id).server == "w2"
    finally:
        p1.send_signal(signal.SIGCONT)
    # w1 wakes, finishes the call, is refused at commit and stops at its next heartbeat.
    assert p1.wait(30) == 0
    answered_once(b, [p])
    assert s(Msg("user", "y")).content == "s(y)"


def test_many_reclaimers_one_owner(workers: Workers) -> None:
    p1 = workers.start("w1")
    for n in ("w2", "w3", "w4"):
        workers.start(n)
    b = busagent.bus.current()
    recs = [Recorder(f"r{i}", to_dist=DistConf(server="w1")) for i in range(20)]
    ps = [recs[i % 20](Msg("m", i)) for i in range(200)]
    p1.send_signal(signal.SIGKILL)
    busagent.gather(ps, timeout=60)
    answered_once(b, ps)
    for i, r in enumerate(recs):
        assert [m.content for m in r.memory.get()] == list(range(i, 200, 20))


def test_restart_under_same_name_rebuilds_agents(workers: Workers) -> None:
    p1 = workers.start("w1")
    b = busagent.bus.current()
    r = Recorder("r", to_dist=DistConf(server="w1"))
    busagent.gather([r(Msg("m", i)) for i in range(5)])
    p1.send_signal(signal.SIGKILL)
    p1.wait()
    ps = [r(Msg("m", i)) for i in range(5, 10)]  # queued while nobody serves w1
    workers.start("w1")
    busagent.gather(ps, timeout=30)
    answered_once(b, ps)
    assert [m.content for m in r.memory.get()] == list(range(10))


def test_sigterm_finishes_what_it_read_and_answers_the_rest(workers: Workers) -> None:
    p1 = workers.start("w1", extra=["--grace", "10"])
    b = busagent.bus.current()
    s = Sleeper("s", 0.3, to_dist=DistConf(server="w1")).ready()
    ps = [s(Msg("user", i)) for i in range(8)]
    b.sender.flush()
    wait_for(lambda: b.redis.xpending(b.keys.inbox("w1"), "workers")["pending"] > 0,
             what="calls read by w1")
    p1.send_signal(signal.SIGTERM)
    assert p1.wait(30) == 0
    out = busagent.gather(ps, timeout=10, return_exceptions=True)
    ok = [x for x in out if not isinstance(x, BaseException)]
    errors = [x for x in out if isinstance(x, BaseException)]
    assert ok, "the call running at the signal finished"
    assert all(isinstance(e, UnknownAgent) and "stopped" in str(e) for e in errors), errors
    answered_once(b, ps)


def test_drain_with_nowhere_to_go_keeps_the_agents_for_the_next_worker(
        workers: Workers) -> None:
    p1 = workers.start("w1")
    b = busagent.bus.current()
    a = Adder("a", to_dist=DistConf(server="w1"))
    assert a(Msg("user", 1)).content == 2
    assert ServerClient("w1").stop(drain=True)
    assert p1.wait(30) == 0
    # No other worker: nothing was deleted, memory included.
    assert busagent.admin.agent_info(a.agent_id).server == "w1"
    assert [m.content for m in a.memory.get()] == [1]
    p = a(Msg("user", 10))  # waits in the stopped server's inbox
    workers.start("w2")
    wait_for(lambda: busagent.admin.agent_info(a.agent_id).server == "w2", timeout=20,
             what="the next worker took the stranded agent")
    assert p.result(timeout=20).content == 11
    assert [m.content for m in a.memory.get()] == [1, 10]
    nothing_pending(b, "w2")


def test_drain_moves_agents_and_waiting_calls(workers: Workers) -> None:
    p1 = workers.start("w1")
    workers.start("w2")
    b = busagent.bus.current()
    recs = [Recorder(f"r{i}", hold=0.05, to_dist=DistConf(server="w1")) for i in range(3)]
    ps = [recs[i % 3](Msg("m", i)) for i in range(30)]
    b.sender.flush()
    assert b.redis.xlen(b.keys.inbox("w1")) > 0
    assert ServerClient("w1").stop(drain=True)
    assert p1.wait(30) == 0
    busagent.gather(ps, timeout=30)
    answered_once(b, ps)
    for i, r in enumerate(recs):
        assert busagent.admin.agent_info(r.agent_id).server == "w2"
        assert [m.content for m in r.memory.get()] == list(range(i, 30, 3))
    nothing_pending(b, "w2")


def test_poison_call_is_dead_lettered(workers: Workers) -> None:
    env = {"BUSAGENT_MAX_DELIVERIES": "2"}
    procs = [workers.start(n, env=env) for n in ("w1", "w2", "w3")]
    k = Killer("k", to_dist=DistConf(server="w1")).ready()
    p = k(Msg("user", "die"))
    with pytest.raises(busagent.DeadLettered, match="delivered 2 times"):
        p.result(timeout=60)
    dead = busagent.admin.deadletters()
    assert [d["call"] for d in dead] == [p.call_id]
    assert "each worker died" in dead[0]["reason"]
    assert sum(x.poll() is not None for x in procs) == 2  # two deaths, then it stopped
    a = Adder("a", to_dist=True)
    assert a(None).content == 1  # the survivor still serves


def test_signed_bus_refuses_unsigned_calls(workers: Workers, redis_url: str,
                                            prefix: str) -> None:
    workers.start("w1", env={"BUSAGENT_SECRET": "s3cret"})
    busagent.init(redis_url, prefix=prefix, secret="s3cret")
    a = Adder("a", to_dist=DistConf(server="w1"))
    assert a(Msg("user", 1)).content == 2
    busagent.init(redis_url, prefix=prefix, secret="wrong")
    with pytest.raises(ProtocolError, match="not signed"):
        a(Msg("user", 1)).result(timeout=10)
    busagent.init(redis_url, prefix=prefix)
    with pytest.raises(ProtocolError, match="not signed"):
        a(Msg("user", 1)).result(timeout=10)


# --- Redis itself failing ------------------------------------------------------------------------


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[dict[str, object]]:
    """A redis-server of this test's own, with an append-only file fsynced on every write."""
    state: dict[str, object] = {"dir": str(tmp_path)}
    state["server"] = embedded.start(appendonly=True, fsync="always", directory=str(tmp_path))
    yield state
    server = state["server"]
    assert isinstance(server, embedded.Server)
    server.stop()


def _restart(state: dict[str, object]) -> None:
    server = state["server"]
    assert isinstance(server, embedded.Server)
    server.kill()
    _start_again(state)


def _start_again(state: dict[str, object]) -> None:
    """A new redis-server on the killed one's folder: it reloads its append-only file."""
    state["server"] = embedded.start(appendonly=True, fsync="always", directory=str(state["dir"]))


def test_redis_restart_with_aof_loses_nothing(own_redis: dict[str, object], prefix: str,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from ..conftest import FAST

    for k_, v in FAST.items():
        monkeypatch.setenv(k_, v)
    server = own_redis["server"]
    assert isinstance(server, embedded.Server)
    b = busagent.init(server.url, prefix=prefix)
    w = Workers(server.url, prefix)
    try:
        w.start("w1")
        w.start("w2")
        recs = [Recorder(f"r{i}", hold=0.05, to_dist=True) for i in range(4)]
        ps = [recs[i % 4](Msg("m", i)) for i in range(40)]
        b.sender.flush()
        # Entries stay in their inbox until answered: calls are in flight when Redis dies.
        assert sum(b.redis.xlen(b.keys.inbox(n)) for n in ("w1", "w2")) > 0
        _restart(own_redis)
        busagent.gather(ps, timeout=60)
        answered_once(b, ps)
        for i, r in enumerate(recs):
            assert [m.content for m in r.memory.get()] == list(range(i, 40, 4))
        # Workers and callers go on with no operator action.
        assert recs[0](Msg("m", 99)).result(timeout=30).content == 11
        assert all(p.poll() is None for p in w.procs.values())
    finally:
        w.stop_all()
        busagent.shutdown()


def test_flushall_recovers_without_a_hot_loop(workers: Workers) -> None:
    p1 = workers.start("w1")
    b = busagent.bus.current()
    s = Sleeper("s", 1.0, to_dist=DistConf(server="w1")).ready()
    p = s(None)
    wait_for(lambda: ServerClient("w1").get_server_info()["inflight"] == 1, what="call running")
    b.redis.flushdb()
    with pytest.raises(CallTimeout):
        p.result(timeout=2.5)
    proc = psutil.Process(p1.pid)
    before = sum(proc.cpu_times()[:2])
    time.sleep(2.0)  # measuring CPU over an interval, not synchronising
    assert sum(proc.cpu_times()[:2]) - before < 0.5, "the worker spins after losing its group"
    # It re-registers at its next heartbeat and serves new agents.
    wait_for(lambda: ServerClient("w1").is_alive(), what="w1 registered again")
    a = Adder("a", to_dist=DistConf(server="w1"))
    assert a(Msg("user", 1)).result(timeout=10).content == 2
    assert p1.poll() is None


def test_caller_death_leaves_only_expiring_replies(workers: Workers, redis_url: str,
                                                   prefix: str) -> None:
    workers.start("w1")
    b = busagent.bus.current()
    a = Adder("a", to_dist=DistConf(server="w1")).ready()
    code = (
        "import busagent, sys\n"
        f"busagent.init({redis_url!r}, prefix={prefix!r})\n"
        f"a = busagent.RemoteAgent({a.agent_id!r}, 'a', object, 'w1')\n"
        "ps = [a(busagent.Msg('u', i)) for i in range(50)]\n"
        "busagent.bus.current().sender.flush()\n"
        "print(' '.join(p.call_id for p in ps), flush=True)\n"
        "import os; os._exit(0)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    out = subprocess.run(["python", "-c", code], capture_output=True, text=True, env=env,
                         timeout=60)
    ids = out.stdout.split()
    assert len(ids) == 50, out.stderr
    wait_for(lambda: all(b.redis.exists(b.keys.reply(c)) for c in ids), what="replies written")
    ttls = [b.redis.ttl(b.keys.reply(c)) for c in ids]
    assert all(0 < t <= b.settings.reply_ttl for t in ttls)
    nothing_pending(b, "w1")
    assert b.redis.xlen(b.keys.inbox("w1")) == 0


def test_unreachable_redis_is_a_clear_error() -> None:
    with pytest.raises(busagent.RedisUnavailable, match=r"cannot reach Redis at redis://127\.0\.0\.1:1/"):
        busagent.init("redis://127.0.0.1:1/0")


def test_restart_under_same_name_with_calls_in_flight(workers: Workers) -> None:
    p1 = workers.start("w1")
    b = busagent.bus.current()
    recs = [Recorder(f"r{i}", hold=0.1, to_dist=DistConf(server="w1")) for i in range(10)]
    ps = [recs[i % 10](Msg("m", i)) for i in range(100)]
    b.sender.flush()
    wait_for(lambda: b.redis.xpending(b.keys.inbox("w1"), "workers")["pending"] > 0,
             what="calls read by w1")
    p1.send_signal(signal.SIGKILL)
    p1.wait()
    workers.start("w1")
    busagent.gather(ps, timeout=30)
    answered_once(b, ps)
    for i, r in enumerate(recs):
        assert [m.content for m in r.memory.get()] == list(range(i, 100, 10))


def test_blocking_reads_recover_after_redis_stalls(workers: Workers) -> None:
    """R9: Redis stops answering for a while (DEBUG SLEEP): blocked readers and the worker's
    reader come back by themselves."""
    workers.start("w1")
    b = busagent.bus.current()
    a = Adder("a", to_dist=DistConf(server="w1"))
    assert a(None).content == 1
    try:
        b.redis.execute_command("DEBUG", "SLEEP", "0")
    except redis.exceptions.ResponseError:
        pytest.skip("this Redis refuses DEBUG (enable-debug-command no)")
    p = a(Msg("user", 1))
    b.sender.flush()
    stall = subprocess.Popen([sys.executable, "-c",
                              "import redis,sys; redis.Redis.from_url(sys.argv[1])"
                              ".execute_command('DEBUG', 'SLEEP', '3')", b.url])
    assert p.result(timeout=30).content == 2
    assert stall.wait(30) == 0
    assert a(Msg("user", 2)).result(timeout=30).content == 3


def test_a_graceful_stop_keeps_heartbeating_so_its_long_call_runs_once(
        workers: Workers) -> None:
    # The call outlives dead_after several times over: a worker that stopped heart-beating at
    # SIGTERM was taken for dead, its agent moved to w2 and the call run a second time there.
    p1 = workers.start("w1", extra=["--grace", "30"])
    workers.start("w2")
    b = busagent.bus.current()
    s = Sleeper("slow", 4 * float(FAST["BUSAGENT_DEAD_AFTER"]),
                to_dist=DistConf(server="w1")).ready()
    p = s(Msg("user", "once"))
    b.sender.flush()
    wait_for(lambda: any(c.get("call") == p.call_id
                         for c in ServerClient("w1").get_server_info()["running"]),
             what="the call running on w1")
    p1.send_signal(signal.SIGTERM)
    wait_for(lambda: ServerClient("w1").get_server_info()["state"] == "stopping",
             what="w1 recorded as stopping")
    assert p.result(timeout=60).content == "slow(once)"
    assert p1.wait(30) == 0
    with pytest.raises(UnknownAgent):  # deleted by its stop, not moved to w2
        busagent.admin.agent_info(s.agent_id)
    assert b.redis.llen(b.keys.reply(p.call_id)) == 1
    assert not [x for x in busagent.admin.deadletters()], "nothing dead-lettered"


def test_a_caller_waiting_through_a_redis_outage_is_not_told_no_worker_is_alive(
        own_redis: dict[str, object], prefix: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Redis down for longer than dead_after while a caller waits: when it is back every
    # heartbeat record is stale, though the worker is alive and beats again within a heartbeat
    # or two. A caller whose liveness check believed the first stale reading failed its call
    # with PlacementError ("no live worker at all"); the soak found it.
    import threading

    for k_, v in FAST.items():
        monkeypatch.setenv(k_, v)
    server = own_redis["server"]
    assert isinstance(server, embedded.Server)
    b = busagent.init(server.url, prefix=prefix)
    w = Workers(server.url, prefix)
    try:
        w.start("w1")
        dead_after = float(FAST["BUSAGENT_DEAD_AFTER"])
        s = Sleeper("s", 3 * dead_after, to_dist=DistConf(server="w1")).ready()
        p = s(Msg("user", "x"))
        b.sender.flush()
        got: list[object] = []

        def wait() -> None:
            try:
                got.append(p.result(timeout=60))
            except Exception as e:  # noqa: BLE001 - the assertion below shows it
                got.append(e)

        waiter = threading.Thread(target=wait, daemon=True)
        waiter.start()
        wait_for(lambda: any(c.get("call") == p.call_id
                             for c in ServerClient("w1").get_server_info()["running"]),
                 what="the call running on w1")
        server.kill()
        # Down for twice dead_after: an outage of a set length, not a sync point.
        deadline = time.monotonic() + 2 * dead_after
        while time.monotonic() < deadline:
            time.sleep(0.05)
        _start_again(own_redis)
        waiter.join(90)
        assert len(got) == 1 and isinstance(got[0], Msg), got
        assert got[0].content == "s(x)"
    finally:
        w.stop_all()
        busagent.shutdown()
