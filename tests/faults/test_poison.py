"""Issue 10, item 11: a poison call that kills every worker it reaches. The caller learns within
a few heartbeats that its call is dead-lettered, or that no live worker can host its agent (not
a CallTimeout at its deadline); dead-letter entries carry the fields the README lists; and
deaths are counted across restarts under the same name too."""

from __future__ import annotations

import subprocess

import pytest

import busagent
from busagent import DistConf, Msg, records
from busagent.errors import DeadLettered, PlacementError
from tests.nesting_agents import Poison, Relay

from ..conftest import Workers, wait_for

MOD = "tests.nesting_agents"
FIELDS = {"id", "call", "agent", "kind", "caller", "reason", "tries", "server"}


def test_a_call_that_kills_every_worker_reaches_its_caller(workers: Workers) -> None:
    # max_deliveries 3 and three workers: each dies in turn and the last has nobody to move
    # the call to. Without the caller's liveness check it waits out its whole deadline.
    procs = [workers.start(n, MOD) for n in ("w1", "w2", "w3")]
    k = Poison("k", to_dist=DistConf(server="w1")).ready()
    p = k(Msg("user", "die"))
    with pytest.raises((DeadLettered, PlacementError)) as got:
        p.result(timeout=60)
    assert "no live worker" in str(got.value) or "delivered" in str(got.value)
    assert "'k'" in str(got.value) or "delivered" in str(got.value)
    assert all(x.wait(timeout=10) == 17 for x in procs)


def test_a_dead_letter_entry_has_the_fields_the_readme_lists(workers: Workers) -> None:
    env = {"BUSAGENT_MAX_DELIVERIES": "2"}
    for n in ("w1", "w2", "w3"):
        workers.start(n, MOD, env=env)
    k = Poison("k", to_dist=DistConf(server="w1")).ready()
    p = k(Msg("user", "die"))
    with pytest.raises(DeadLettered, match="delivered 2 times"):
        p.result(timeout=60)
    (dead,) = busagent.admin.deadletters()
    assert set(dead) == FIELDS
    assert dead["call"] == p.call_id and dead["agent"] == k.agent_id
    assert dead["tries"] == 2
    assert dead["server"] in {"w2", "w3"}  # the second to die holding it (w1 was the first)


def _start_dying(workers: Workers, name: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """Start a worker that may die of its pending poison call before it says it serves."""
    try:
        return workers.start(name, MOD, env=env)
    except AssertionError:
        return workers.procs[name]


def test_deliveries_are_counted_across_restarts_under_the_same_name(workers: Workers) -> None:
    # A supervisor restarts the worker under its name each time; before, each restart re-read
    # its pending poison call and died again, forever.
    env = {"BUSAGENT_MAX_DELIVERIES": "2"}
    b = busagent.bus.current()
    workers.start("w1", MOD, env=env)
    k = Poison("k", to_dist=DistConf(server="w1")).ready()
    p = k(Msg("user", "die"))
    assert workers.procs["w1"].wait(timeout=30) == 17  # delivery 1
    assert _start_dying(workers, "w1", env).wait(timeout=30) == 17  # delivery 2
    w = workers.start("w1", MOD, env=env)  # the third start gives up on it instead
    with pytest.raises(DeadLettered, match="delivered 2 times"):
        p.result(timeout=30)
    (dead,) = busagent.admin.deadletters()
    assert set(dead) == FIELDS and dead["tries"] == 2 and dead["server"] == "w1"
    assert w.poll() is None
    assert not b.redis.exists(b.keys.restarts("w1"))
    assert busagent.ServerClient("w1").ping() > 0


def test_restarts_and_moves_add_up(workers: Workers) -> None:
    # One death under w1, a restart under the name and a second death there: the worker that
    # then recovers w1 counts both, and dead-letters the call instead of dying of it.
    env = {"BUSAGENT_MAX_DELIVERIES": "2"}
    workers.start("w1", MOD, env=env)
    k = Poison("k", to_dist=DistConf(server="w1")).ready()
    p = k(Msg("user", "die"))
    assert workers.procs["w1"].wait(timeout=30) == 17
    assert _start_dying(workers, "w1", env).wait(timeout=30) == 17
    w2 = workers.start("w2", MOD, env=env)
    with pytest.raises(DeadLettered, match="delivered 2 times"):
        p.result(timeout=30)
    (dead,) = busagent.admin.deadletters()
    assert dead["tries"] == 2 and dead["server"] == "w1"
    assert w2.poll() is None
    b = busagent.bus.current()
    # Removed with the dead server's inbox, once recovery has moved everything off it.
    wait_for(lambda: not b.redis.exists(b.keys.restarts("w1")), what="w1's restart counts gone")


def test_no_live_worker_is_known_once_the_last_one_is_dead_by_dead_after(
        workers: Workers) -> None:
    """Item 11, timing: when the last worker dies, the caller's liveness check takes its
    server for dead as soon as recovery would (silent for dead_after), not after twice that:
    checked at the moment the record turns dead, the check already names the agent."""
    proc = workers.start("w1", MOD)
    k = Relay("k", to_dist=DistConf(server="w1")).ready()
    b = busagent.bus.current()
    proc.kill()  # SIGKILL: no deregistering, the record just goes silent
    proc.wait(timeout=10)

    def dead() -> bool:
        return all(s.state(b.settings.dead_after) == "dead"
                   for s in records.read_servers(b.redis, b.keys.servers) if s.name == "w1")

    wait_for(dead, what="w1's record to be dead by dead_after")
    servers = records.read_servers(b.redis, b.keys.servers)
    why = records.unhostable(b.redis, b.keys.agents, servers, [k.agent_id],
                             b.settings.dead_after)
    assert why is not None and "no live worker" in why and "'k'" in why
    with pytest.raises(PlacementError, match="no live worker"):
        k(Msg("user", 1)).result(timeout=30)
