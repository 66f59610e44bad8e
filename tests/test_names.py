"""Issue 11, namespaces, names and lifetimes: real programs (subprocesses) and real workers on a
real redis-server.

* two programs on one Redis: each gets its own private child workers; the first exits, the
  second keeps working;
* owned agents are deleted (record, spec, memory, the hosting worker's instance) after their
  program exits normally and after it is killed with SIGKILL; detached ones stay;
* named agents: one winner among many racing processes, ``get_agent``, ``get_if_exists``,
  ``NameTaken``, names surviving a drain and a kill -9 recovery; listing and deleting by
  namespace.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest
import redis

import busagent
from busagent import DistConf, Msg, NameTaken, ServerClient, UnknownAgent
from busagent.errors import ConfigError
from busagent.tuning import PROGRAM_TTL_BEATS
from tests.agents import Adder
from tests.conftest import FAST, ROOT, Workers, wait_for

HEADER = """
import sys, time
import busagent
from busagent import DistConf, Msg
from tests.agents import Adder


def M(v):
    return Msg("user", v)
"""


class Program:
    """A separate Python program on the bus, driven line by line over stdin/stdout."""

    def __init__(self, tmp: Path, name: str, code: str, url: str, prefix: str,
                 env: dict[str, str] | None = None) -> None:
        path = tmp / f"{name}.py"
        path.write_text(HEADER + textwrap.dedent(code))
        e = {**os.environ, **FAST, "BUSAGENT_REDIS_URL": url, "BUSAGENT_PREFIX": prefix,
             "PYTHONPATH": str(ROOT), **(env or {})}
        e.pop("BUSAGENT_PARENT_BUS", None)
        self.p = subprocess.Popen([sys.executable, str(path)], cwd=ROOT, env=e, text=True,
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def read(self) -> Any:
        """The next line the program printed, as JSON (fails if it exited first)."""
        out: IO[str] = self.p.stdout  # type: ignore[assignment]
        line = out.readline()
        if not line:
            raise AssertionError(f"program exited with {self.p.wait()} before printing")
        return json.loads(line)

    def send(self, line: str) -> None:
        inp: IO[str] = self.p.stdin  # type: ignore[assignment]
        inp.write(line + "\n")
        inp.flush()

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
        self.p.wait()
        for f in (self.p.stdin, self.p.stdout):
            if f is not None:
                f.close()


@pytest.fixture
def programs(tmp_path: Path, redis_url: str, prefix: str) -> Iterator[Any]:
    made: list[Program] = []

    def start(name: str, code: str, env: dict[str, str] | None = None) -> Program:
        prog = Program(tmp_path, name, code, redis_url, prefix, env)
        made.append(prog)
        return prog

    yield start
    for prog in made:
        prog.stop()


def M(v: Any) -> Msg:
    return Msg("user", v)


def _agent_keys(raw: redis.Redis, prefix: str, agent_id: str) -> dict[str, Any]:
    return {"record": raw.hget(f"{prefix}:agents", agent_id),
            "spec": raw.hexists(f"{prefix}:specs", agent_id),
            "memory": raw.exists(f"{prefix}:memory:{agent_id}")}


def _gone(raw: redis.Redis, prefix: str, agent_id: str) -> bool:
    k = _agent_keys(raw, prefix, agent_id)
    return k["record"] is None and not k["spec"] and not k["memory"]


# --- private child workers: two programs on one Redis ------------------------------------------


TWO_PROGRAMS = """
busagent.init()
a = Adder("a", inc=1, to_dist=True)
print(json.dumps({"server": a.server, "namespace": busagent.bus.current().namespace,
                  "value": a(M(1)).content}), flush=True)
sys.stdin.readline()          # the test says when to go on
try:
    print(json.dumps({"value": a(M(10)).content}), flush=True)
except Exception as e:
    print(json.dumps({"error": f"{type(e).__name__}: {e}"}), flush=True)
sys.stdin.readline()
"""


def test_two_programs_each_use_their_own_child_workers(programs: Any, bus: Any,
                                                       raw: redis.Redis, prefix: str) -> None:
    """No worker is running: the first program starts child workers; the second must not place
    its agent there (they stop when the first exits) but start its own. The first exits; the
    second's agent still answers."""
    first = programs("first", "import json\n" + TWO_PROGRAMS)
    one = first.read()
    assert one["value"] == 2
    second = programs("second", "import json\n" + TWO_PROGRAMS)
    two = second.read()
    assert two["value"] == 2
    assert two["server"] != one["server"]
    records = {s.name: s for s in busagent.records.read_servers(raw, f"{prefix}:servers")}
    assert records[one["server"]].private_to != records[two["server"]].private_to
    # Anonymous namespaces by default: one each.
    assert one["namespace"] != two["namespace"]

    first.send("go")
    assert first.read() == {"value": 11}
    first.send("exit")
    assert first.p.wait(timeout=30) == 0
    wait_for(lambda: raw.hget(f"{prefix}:servers", one["server"]) is None, 20,
             "the first program's child workers to deregister")
    second.send("go")
    assert second.read() == {"value": 11}
    second.send("exit")
    assert second.p.wait(timeout=30) == 0
    # No worker outlives them to sweep: each program tidied its own ownership records at exit.
    assert raw.hlen(f"{prefix}:programs") == 0
    assert not list(raw.scan_iter(f"{prefix}:owned:*"))


def test_a_program_never_places_on_another_programs_child_worker(
        workers: Workers, bus: Any, programs: Any) -> None:
    """Naming another program's child worker is refused with a one-line PlacementError."""
    first = programs("first", "import json\n" + TWO_PROGRAMS)
    one = first.read()
    with pytest.raises(busagent.PlacementError, match="private to another program"):
        Adder("x", to_dist=DistConf(server=one["server"]))
    first.send("go")
    first.read()
    first.send("exit")
    first.p.wait(timeout=30)


# --- lifetimes -----------------------------------------------------------------------------------


OWNER = """
import json
busagent.init(namespace="life")
owned = Adder("owned", inc=1, to_dist=True)
many = busagent.create_many(Adder, [f"m{i}" for i in range(20)])
kept = Adder("kept", inc=5, to_dist=DistConf(name="kept", lifetime="detached"))
assert owned(M(1)).content == 2 and kept(M(1)).content == 6
busagent.gather([m(M(1)) for m in many])
print(json.dumps({"owned": [owned.agent_id] + [m.agent_id for m in many],
                  "kept": kept.agent_id, "program": busagent.bus.current().program}), flush=True)
sys.stdin.readline()
"""


def _check_swept(raw: redis.Redis, prefix: str, got: dict[str, Any]) -> None:
    for agent_id in got["owned"]:
        wait_for(lambda a=agent_id: _gone(raw, prefix, a), 20,
                 f"owned agent {agent_id} to be deleted with its memory")
    wait_for(lambda: not raw.hexists(f"{prefix}:programs", got["program"])
             and not raw.exists(f"{prefix}:owned:{got['program']}"), 20,
             "the program's record and owned set to go")
    # The hosting worker dropped the instances too, not only the keys.
    hosted = {a["agent_id"] for a in ServerClient("w1").get_agent_list()}
    assert not hosted & set(got["owned"])
    # The detached agent stays, memory included, and is found by name from another program.
    assert _agent_keys(raw, prefix, got["kept"])["memory"]
    kept = busagent.get_agent("kept", namespace="life")
    assert kept.agent_id == got["kept"] and kept(M(2)).content == 7
    assert got["kept"] in hosted


def test_owned_agents_are_deleted_after_a_normal_exit(workers: Workers, bus: Any,
                                                      raw: redis.Redis, prefix: str,
                                                      programs: Any) -> None:
    workers.start("w1")
    prog = programs("owner", OWNER)
    got = prog.read()
    for agent_id in got["owned"]:
        assert not _gone(raw, prefix, agent_id)
    prog.send("exit")
    assert prog.p.wait(timeout=30) == 0
    _check_swept(raw, prefix, got)


def test_owned_agents_are_deleted_after_kill_9(workers: Workers, bus: Any, raw: redis.Redis,
                                               prefix: str, programs: Any) -> None:
    workers.start("w1")
    prog = programs("owner", OWNER)
    got = prog.read()
    prog.p.send_signal(signal.SIGKILL)
    prog.p.wait()
    _check_swept(raw, prefix, got)


def test_owned_agents_are_swept_whatever_worker_hosts_them(workers: Workers, bus: Any,
                                                          raw: redis.Redis, prefix: str,
                                                          programs: Any) -> None:
    """Agents on a worker that loaded only their module are deleted by the sweep of another
    worker too (here the hosting worker is the only one that loaded the class; the other
    worker, sweeping as well, sends it the deletes)."""
    workers.start("w1")
    workers.start("w2", "tests.other_agents")
    prog = programs("owner", OWNER)
    got = prog.read()
    prog.p.send_signal(signal.SIGKILL)
    prog.p.wait()
    _check_swept(raw, prefix, got)


def test_a_program_alive_keeps_its_agents(workers: Workers, bus: Any, raw: redis.Redis,
                                          prefix: str, programs: Any) -> None:
    """A live program's heartbeat renews its liveness key (a Redis TTL) for longer than the
    TTL itself, while the workers sweep, and its owned agents stay."""
    workers.start("w1")
    prog = programs("owner", OWNER)
    got = prog.read()
    key = f"{prefix}:program:{got['program']}"
    seen = [raw.pttl(key)]
    assert seen[0] > 0

    def renewed() -> bool:
        t = raw.pttl(key)
        assert t > 0, "the program's liveness key expired while it lives"
        up, seen[0] = t > seen[0], t
        return up

    # Twice the TTL's worth of renewals: without them the key would have expired twice over.
    for _ in range(2 * PROGRAM_TTL_BEATS):
        wait_for(renewed, 10, "the program's liveness key to be renewed")
    assert all(not _gone(raw, prefix, a) for a in got["owned"])
    prog.send("exit")
    prog.p.wait(timeout=30)


# --- names ---------------------------------------------------------------------------------------


RACER = """
import json, redis, os
busagent.init(namespace="race")
r = redis.Redis.from_url(os.environ["BUSAGENT_REDIS_URL"])
r.blpop([os.environ["GO_KEY"]], timeout=60)
try:
    a = Adder("solo", to_dist=DistConf(name="solo", lifetime="detached",
                                       get_if_exists=os.environ["ATTACH"] == "1"))
    print(json.dumps({"id": a.agent_id, "value": a(M(1)).content}), flush=True)
except busagent.NameTaken as e:
    print(json.dumps({"taken": str(e)}), flush=True)
"""


@pytest.mark.parametrize("attach", [False, True])
def test_many_processes_racing_for_one_name_make_one_agent(
        workers: Workers, bus: Any, raw: redis.Redis, prefix: str, programs: Any,
        attach: bool) -> None:
    workers.start("w1")
    n = 8
    go = f"{prefix}:test:go"
    racers = [programs(f"racer{i}", RACER, env={"GO_KEY": go, "ATTACH": "1" if attach else "0"})
              for i in range(n)]
    raw.rpush(go, *["1"] * n)
    outs = [r.read() for r in racers]
    made = [a for a in busagent.agents(namespace="race") if a["registered"] == "solo"]
    assert len(made) == 1
    winner = made[0]["id"]
    if attach:
        assert {o["id"] for o in outs} == {winner}
        assert all(o["value"] == 2 for o in outs)
    else:
        won = [o for o in outs if "id" in o]
        assert [o["id"] for o in won] == [winner]
        assert all("is taken in namespace 'race'" in o["taken"] for o in outs if "taken" in o)
    assert raw.hget(f"{prefix}:names:race", "solo") == winner
    assert len(busagent.agents(namespace="race")) == 1


def test_get_agent_get_if_exists_and_name_taken(workers: Workers, bus: Any) -> None:
    workers.start("w1")
    p = Adder("planner", inc=3, to_dist=DistConf(name="planner", namespace="shop"))
    q = busagent.get_agent("planner", namespace="shop")
    assert q.agent_id == p.agent_id and q(M(1)).content == 4
    with pytest.raises(UnknownAgent, match="no agent named 'planner' in namespace 'other'"):
        busagent.get_agent("planner", namespace="other")
    with pytest.raises(UnknownAgent):
        busagent.get_agent("planner")  # this program's own (anonymous) namespace
    with pytest.raises(NameTaken, match="taken in namespace 'shop'"):
        Adder("planner", to_dist=DistConf(name="planner", namespace="shop"))
    again = Adder("planner", to_dist=DistConf(name="planner", namespace="shop",
                                              get_if_exists=True))
    assert again.agent_id == p.agent_id and again.set_inc(10).result(30) == 3
    # The same name in another namespace is another agent.
    other = Adder("planner", to_dist=DistConf(name="planner", namespace="shop2"))
    assert other.agent_id != p.agent_id
    # A deleted agent's name is free again.
    assert p.delete()
    with pytest.raises(UnknownAgent):
        busagent.get_agent("planner", namespace="shop")
    fresh = Adder("planner", to_dist=DistConf(name="planner", namespace="shop"))
    assert fresh.agent_id != p.agent_id and fresh(M(1)).content == 2


def test_names_survive_drain_and_kill_9_recovery(workers: Workers, bus: Any,
                                                 raw: redis.Redis, prefix: str) -> None:
    w1 = workers.start("w1")
    p = Adder("planner", inc=2, to_dist=DistConf(name="planner", namespace="shop",
                                                 server="w1", lifetime="detached"))
    assert p(M(1)).content == 3
    workers.start("w2")
    assert ServerClient("w1").stop(drain=True)
    w1.wait(timeout=30)

    def where() -> str:
        return busagent.get_agent("planner", namespace="shop").server

    wait_for(lambda: where() == "w2", 20, "the drained agent to be on w2")
    q = busagent.get_agent("planner", namespace="shop")
    assert q.agent_id == p.agent_id and q(M(1)).content == 3
    workers.start("w3")
    workers.procs["w2"].send_signal(signal.SIGKILL)
    workers.procs["w2"].wait()
    wait_for(lambda: where() == "w3", 30, "the recovered agent to be on w3")
    q = busagent.get_agent("planner", namespace="shop")
    assert q.agent_id == p.agent_id and q(M(1)).content == 3
    assert len(q.memory.get()) == 3  # memory came along both times
    with pytest.raises(NameTaken):
        Adder("planner", to_dist=DistConf(name="planner", namespace="shop"))


def test_listing_and_deleting_by_namespace(workers: Workers, bus: Any, redis_url: str,
                                           prefix: str) -> None:
    workers.start("w1")
    shop = [Adder(f"s{i}", to_dist=DistConf(namespace="shop")) for i in range(3)]
    mine = Adder("mine", to_dist=True)
    for a in [*shop, mine]:
        a.ready()
    assert {a["id"] for a in busagent.agents(namespace="shop")} == {a.agent_id for a in shop}
    assert [a["id"] for a in busagent.agents(namespace=bus.namespace)] == [mine.agent_id]
    from busagent.studio import data  # the studio's Agents view, scoped the same way

    page = data.agents_page(namespace="shop", count=50)
    assert {a["id"] for a in page["items"]} == {a.agent_id for a in shop}
    base = [sys.executable, "-m", "busagent.cli"]
    opts = ["--redis", redis_url, "--prefix", prefix]
    out = subprocess.run([*base, "agents", "--namespace", "shop", "--json", *opts],
                         capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert {a["id"] for a in json.loads(out)} == {a.agent_id for a in shop}
    out = subprocess.run([*base, "delete", "--all", "--namespace", "shop", *opts],
                         capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert "deleted 3 agent(s) of namespace shop" in out
    assert busagent.agents(namespace="shop") == []
    assert mine(M(1)).content == 2


@pytest.mark.parametrize("conf", [
    {"name": ""}, {"name": 3}, {"namespace": "a b"}, {"namespace": "x*"},
    {"lifetime": "forever"}, {"get_if_exists": True}, {"get_if_exists": "yes", "name": "n"},
])
def test_bad_dist_conf_is_one_line_config_error(conf: dict[str, Any]) -> None:
    with pytest.raises(ConfigError) as e:
        DistConf(**conf)
    assert "\n" not in str(e.value)


def test_bad_namespace_setting_is_one_line_config_error(redis_url: str) -> None:
    with pytest.raises(ConfigError, match="namespace"):
        busagent.init(redis_url, namespace="has space")


SPAWNED = """
import json, multiprocessing


def child(q):
    busagent.init()  # BUSAGENT_REDIS_URL is set: the child still belongs to its parent
    try:
        q.put(["ok", busagent.get_agent("mpname")(M(1)).content])
    except Exception as e:
        q.put([type(e).__name__, str(e)])


if __name__ == "__main__":
    busagent.init()
    a = Adder("m", to_dist=DistConf(name="mpname"))
    a.ready()
    out = {}
    for method in ("fork", "spawn", "forkserver"):
        ctx = multiprocessing.get_context(method)
        q = ctx.Queue()
        p = ctx.Process(target=child, args=(q,))
        p.start()
        out[method] = q.get(timeout=60)
        p.join()
    print(json.dumps(out), flush=True)
"""


def test_multiprocessing_children_share_their_parents_anonymous_namespace(
        programs: Any, workers: Workers) -> None:
    """A child started with spawn or forkserver starts afresh; with BUSAGENT_REDIS_URL in its
    environment it connected on its own and made an anonymous namespace of its own, so the
    parent's named agent was unknown to it."""
    workers.start("w1", "tests.agents")
    got = programs("spawner", SPAWNED).read()
    assert got == {m: ["ok", 2] for m in ("fork", "spawn", "forkserver")}, got
