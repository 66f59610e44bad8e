"""Issue 10, values on the worker's way back (items 1-4) and AgentScope's expectations of values
(items 17-19), through real worker processes and a real redis-server."""

from __future__ import annotations

import json
import os
import pickle
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import redis
from pydantic import BaseModel

import busagent
from busagent import DistConf, Hub, Msg, Placeholder, RemoteAgent, RemoteError, TaskCenter
from busagent.errors import (
    ConfigError,
    NotSerializable,
    RedisUnavailable,
)
from tests.values_agents import (
    BAD_TEXT,
    Boom,
    Creator,
    Echo,
    Faulty,
    Helper,
    Holder,
    Keeper,
    Manager,
    Mirror,
    Streamer,
    exotic,
    placeholders_in,
    shape,
    tricky,
)

from .conftest import FAST, ROOT, Workers, wait_for

MODS = ("tests.values_agents",)
#: a deadline far beyond any answer "at once": a call that hangs until it fails the test.
WAIT = 30.0


# --- 1. a value that cannot be encoded never wedges an agent or loses other replies --------------


def test_an_error_whose_text_cannot_encode_reaches_the_caller_and_the_agent_serves_on(
        workers: Workers) -> None:
    workers.start("w1", *MODS)
    f = Faulty("f", to_dist=DistConf(server="w1"))
    with pytest.raises(RemoteError) as ei:
        f(Msg("user", "raise-bad-text")).result(timeout=WAIT)
    assert ei.value.type == "ValueError"
    assert "cannot open report-\\udcff.txt" in ei.value.message  # readable, not lost
    assert "raise ValueError(BAD_TEXT)" in ei.value.traceback
    # An exception whose str() itself raises: still an answer, with its type.
    with pytest.raises(RemoteError) as ei:
        f(Msg("user", "raise-bad-str")).result(timeout=WAIT)
    assert ei.value.type == "_BadStr"
    # The agent is not left busy: later calls are answered.
    assert f(Msg("user", "again")).result(timeout=WAIT).content == "ok:again"


def test_unencodable_reply_memory_and_error_in_one_batch_keep_the_other_replies(
        workers: Workers) -> None:
    workers.start("w1", *MODS)
    f = Faulty("f", to_dist=DistConf(server="w1")).ready()
    modes = ["a", "reply-bad-text", "b", "memory-object", "raise-bad-text", "reply-object",
             "memory-bad-text", "c"]
    # Sent together to one agent: read at once and committed in the same batches.
    ps = [f(Msg("user", m)) for m in modes]
    out = busagent.gather(ps, timeout=WAIT, return_exceptions=True)
    assert [o.content for o in (out[0], out[2], out[7])] == ["ok:a", "ok:b", "ok:c"]
    assert out[6].content == "stored"
    assert isinstance(out[1], NotSerializable)
    assert "at .content['file']" in str(out[1]) and "not valid Unicode" in str(out[1])
    assert isinstance(out[5], NotSerializable)
    assert "at .content['deep'][1]['thing']" in str(out[5]) and "object" in str(out[5])
    assert isinstance(out[3], NotSerializable)
    assert re.search(r"cannot store a object \(at memory item \d\.content\['handle'\]\)",
                     str(out[3])), out[3]
    assert isinstance(out[4], RemoteError) and out[4].type == "ValueError"
    # Memory holds what the successful calls stored, and the failed call's change was undone
    # in the agent too (it matches Redis): exactly, including the text JSON must escape.
    expected = ["a", "b", "kept", "BAD_TEXT", "c"]
    assert f.remembered().result(timeout=WAIT) == expected
    got = [m.content if isinstance(m, Msg) else m for m in f.memory.get()]
    assert got == ["a", "b", "kept", BAD_TEXT, "c"]


def test_a_streamed_chunk_that_cannot_encode_ends_the_stream_with_an_error(
        workers: Workers) -> None:
    workers.start("w1", *MODS)
    s = Streamer("s", to_dist=DistConf(server="w1"))
    p = s(Msg("user", "bad"))
    events = list(p.stream(timeout=WAIT))
    assert [e.type for e in events] == ["start", "chunk", "error"]
    assert "streamed chunk 2 cannot travel" in events[-1].data["message"]
    with pytest.raises(NotSerializable, match="streamed chunk 2"):
        p.result(timeout=WAIT)
    assert s(Msg("user", "good")).result(timeout=WAIT) == "fine done"


def test_a_hub_message_that_cannot_encode_is_refused_at_once_naming_where(
        bus: busagent.bus.Bus) -> None:
    hub = Hub("room")
    with pytest.raises(NotSerializable, match=r"at \.content\['f'\]"):
        hub.publish(Msg("user", {"f": BAD_TEXT}))
    with pytest.raises(NotSerializable, match=r"at \.metadata\['x'\]"):
        hub.publish(Msg("user", "hi", metadata={"x": object()}))
    assert hub.history() == []


class Says(busagent.Agent):
    def __init__(self, name: str, line: object) -> None:
        super().__init__(name)
        self.line = line

    def reply(self, x: object = None) -> object:
        return self.line


def test_a_speaker_whose_reply_cannot_be_published_is_an_error_and_others_are_published(
        bus: busagent.bus.Bus) -> None:
    center = TaskCenter("debate", deadline=WAIT)
    center.add_agents([Says("bad", {"file": BAD_TEXT}), Says("good", "fine")], ["a", "b"])
    center.send_task_request("go")
    events = {(e.name, e.type): e for e in center.step()}
    assert events[("good", "end")].data == "fine"
    assert events[("bad", "error")].data["type"] == "NotSerializable"
    assert "not valid Unicode" in events[("bad", "error")].data["message"]
    assert [h.msg.content for h in center.hub.history()] == ["go", "fine"]


class OnlyHere(BaseModel):
    """A model the workers never loaded (it lives in this test module)."""

    x: int


def test_a_hub_message_a_member_cannot_decode_does_not_stop_its_deliveries(
        workers: Workers) -> None:
    workers.start("w1", *MODS)
    member = Faulty("member", to_dist=DistConf(server="w1"))
    hub = Hub("room")
    hub.join(member)
    hub.publish(Msg("user", OnlyHere(x=1)))
    hub.publish(Msg("user", "after"))
    wait_for(lambda: "after" in member.remembered().result(timeout=WAIT), timeout=WAIT,
             what="the member observed the message after the one it cannot decode")


# --- 2 and 17. placeholders, agent handles and the user's models travel at any depth -------------


def test_placeholders_and_agent_handles_travel_at_any_depth_and_arrive_usable(
        workers: Workers) -> None:
    workers.start("w1", *MODS)
    workers.start("w2", *MODS)
    h1 = Helper("h1", to_dist=DistConf(server="w1"))
    h2 = Helper("h2", to_dist=DistConf(server="w2"))
    # A manager built with a team of distributed agents (AgentScope's shard and participants).
    m = Manager("m", team=[h1], to_dist=DistConf(server="w2"))
    out = m(Msg("user", {"team": [h2]})).result(timeout=WAIT)
    answers = out.content["answers"]
    assert all(isinstance(a, Placeholder) for a in answers)
    texts = [a.result(timeout=WAIT).content for a in answers]
    assert texts[0].startswith("h1<") and texts[1].startswith("h2<")
    team = out.content["team"]
    assert [type(t) for t in team] == [RemoteAgent, RemoteAgent]
    assert [t.agent_id for t in team] == [h1.agent_id, h2.agent_id]
    assert team[1](Msg("user", "direct")).result(timeout=WAIT).content == "h2<direct>"
    # Memory stores the value a placeholder stands for, never its repr.
    stored = m.memory.get()[-1]
    assert isinstance(stored, Msg) and stored.content.startswith("h1<")


def test_an_agent_that_creates_its_helper_returns_a_placeholder_and_stores_values(
        workers: Workers) -> None:
    workers.start("w1", *MODS)
    c = Creator("c", to_dist=DistConf(server="w1"))
    out = c(Msg("user", "q")).result(timeout=WAIT)
    ans = out.content["answer"]
    assert isinstance(ans, Placeholder) and ans.result(timeout=WAIT).content == "c-helper<q>"
    assert [m.content for m in c.memory.get()] == ["c-helper<q>"]


SCRIPT = '''
import sys

import busagent
from pydantic import BaseModel
from busagent import Agent, DistConf, Msg


class Point(BaseModel):
    x: int
    y: int


class Inner(BaseModel):
    where: Point
    tags: list[Point]


class Mover(Agent):
    def reply(self, x: Msg) -> Msg:
        p = x.content["p"]
        assert type(p) is Point, type(p)
        moved = Point(x=p.x + 1, y=p.y)
        self.memory.add(Msg(self.name, Inner(where=moved, tags=[p])))
        return Msg(self.name, {"moved": [Inner(where=moved, tags=[p, moved])]})


if __name__ == "__main__":
    busagent.init(sys.argv[1], prefix=sys.argv[2])
    m = Mover("m", to_dist=DistConf(server=sys.argv[3]))
    out = m(Msg("user", {"p": Point(x=1, y=2)})).result(timeout=30)
    got = out.content["moved"][0]
    assert type(got) is Inner and type(got.where) is Point, type(got)
    stored = m.memory.get()[0].content
    assert type(stored) is Inner and stored.where == Point(x=2, y=2), stored
    print("OK", got.where.x, got.tags[1].x)
'''


def test_pydantic_models_from_the_users_script_travel_both_ways(
        workers: Workers, redis_url: str, prefix: str, tmp_path: Path) -> None:
    script = tmp_path / "userflow.py"
    script.write_text(textwrap.dedent(SCRIPT))
    workers.start("w1", str(script))
    env = {**os.environ, **FAST, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, str(script), redis_url, prefix, "w1"],
                          capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["OK", "2", "2"]


# --- 3. memory comes back exactly as stored ------------------------------------------------------


def test_memory_comes_back_exactly_through_get_to_dist_and_recovery(
        workers: Workers, raw: redis.Redis, prefix: str) -> None:
    p1 = workers.start("w1", *MODS)
    k = Keeper("k", to_dist=DistConf(server="w1"))
    assert k(None).result(timeout=WAIT).content == len(tricky())
    assert k.memory.get() == tricky()
    # Readable in redis-cli: a Msg is its plain fields, text stays text.
    items = raw.lrange(f"{prefix}:memory:{k.agent_id}", 0, -1)
    assert json.loads(items[8])["name"] == "m" and '"é"' in items[9]
    # A local agent moved with to_dist carries its memory over exactly.
    local = Keeper("local")
    local.memory.add(tricky())
    moved = local.to_dist(server="w1")
    assert moved.exact().result(timeout=WAIT) is True
    assert moved.memory.get() == tricky()
    moved(None).result(timeout=WAIT)
    assert moved.memory.get() == tricky() + tricky()
    # After the worker is killed, the agent rebuilt elsewhere has its memory exactly.
    workers.start("w2", *MODS)
    p1.send_signal(signal.SIGKILL)
    p1.wait()
    wait_for(lambda: busagent.admin.agent_info(k.agent_id).server == "w2", timeout=WAIT,
             what="the agent moved to w2")
    assert k.exact().result(timeout=WAIT) is True
    assert k.memory.get() == tricky()


def test_memory_refuses_what_it_cannot_store_naming_where() -> None:
    from busagent.memory import Memory

    m = Memory()
    m.add(Msg("a", {"ok": 1}))
    m.take_changes()
    # Refused at add (F6), nothing of the list added.
    with pytest.raises(NotSerializable, match=r"memory item 2\.content\['f'\]\[1\]"):
        m.add([Msg("a", 2), Msg("b", {"f": [1, object()]})])
    assert [x.content for x in m.get()] == [{"ok": 1}]
    # Changed in place after add so that it no longer encodes: refused at the commit.
    changed = Msg("a", {"f": []})
    m.add(changed)
    changed.content["f"].append(object())
    with pytest.raises(NotSerializable, match=r"memory item 1\.content\['f'\]\[0\]"):
        m.take_changes()
    m.undo_changes()
    assert [x.content for x in m.get()] == [{"ok": 1}]
    m.clear()
    m.add(Msg("a", 3))
    m.get()[0].content = lambda: 1
    with pytest.raises(NotSerializable, match="memory item 0"):
        m.take_changes()
    m.undo_changes()  # a clear is undone too: memory is as last saved
    assert [x.content for x in m.get()] == [{"ok": 1}]


# --- 4. a failed input passed on reports the original failure ------------------------------------


def test_a_failed_input_passed_on_reports_the_original_error(workers: Workers) -> None:
    workers.start("w1", *MODS)
    workers.start("w2", *MODS)
    boom = Boom("boom", to_dist=DistConf(server="w1"))
    e = Echo("e", to_dist=DistConf(server="w2"))
    x = boom(Msg("user", "k1"))
    for p in (e(Msg("user", "first"), x),                      # an argument
              e(Msg("user", {"deep": [x]})),                   # inside a message
              e(Msg("user", "waits"), boom(Msg("user", "k1")))):  # not yet answered
        with pytest.raises(RemoteError) as ei:
            p.result(timeout=WAIT)
        err = ei.value
        assert err.type == "KeyError" and err.server == "w1"
        assert "an input placeholder" in err.message and "no such key 'k1'" in err.message
        assert "raise KeyError" in err.traceback
    with pytest.raises(RemoteError, match=r"passed as args\[1\]"):
        e(Msg("user", "first"), x).result(timeout=WAIT)
    with pytest.raises(RemoteError, match=r"passed as args\[0\]\.content\['deep'\]\[0\]"):
        e(Msg("user", {"deep": [x]})).result(timeout=WAIT)


# --- 18. a placeholder changed locally -----------------------------------------------------------


class LocalBump(busagent.Agent):
    """A local agent that changes the reply it was given (AgentScope's test does this)."""

    def reply(self, x: Placeholder) -> Placeholder:
        x.content += "!"
        return x


def test_a_resolved_placeholder_changed_locally_travels_with_the_change(
        workers: Workers) -> None:
    workers.start("w1", *MODS)
    e = Echo("e", to_dist=DistConf(server="w1"))
    h = Helper("h", to_dist=DistConf(server="w1"))
    changed = LocalBump("local")(h(Msg("user", "a")))
    assert e(changed).result(timeout=WAIT).content == ["h<a>!"]
    q = e(41)
    q.content.append("mine")                  # changed in place
    assert e(q).result(timeout=WAIT).content == [[41, "mine"]]
    r = e(1)
    r.content = [2]                          # set on the placeholder: set on its value
    assert e(r).result(timeout=WAIT).content == [[2]]
    # A pending placeholder still travels by reference: the receiver reads it from Redis.
    s = e(7)
    assert e(s).result(timeout=WAIT).content == [[7]] and not s.done()


# --- 19. identity and re-initialisation ------------------------------------------------------


def test_to_dist_keeps_the_agent_id(workers: Workers) -> None:
    workers.start("w1", *MODS)
    local = Helper("h")
    proxy = local.to_dist(server="w1").ready()
    assert proxy.agent_id == local.agent_id
    assert busagent.admin.agent_info(local.agent_id).name == "h"
    assert proxy(Msg("user", "x")).result(timeout=WAIT).content == "h<x>"
    with pytest.raises(ConfigError, match="already moved to a worker"):
        local.to_dist(server="w1")


def test_init_after_a_failed_init_connects(redis_url: str, prefix: str) -> None:
    busagent.shutdown()
    try:
        with pytest.raises(RedisUnavailable):
            busagent.init("redis://127.0.0.1:1/0", prefix=prefix)
        b = busagent.init(redis_url, prefix=prefix)
        assert b.redis.ping() and busagent.servers() == []
        assert busagent.bus.current() is b
    finally:
        busagent.shutdown()


def test_a_pickled_placeholder_resolves_as_the_original(workers: Workers) -> None:
    workers.start("w1", *MODS)
    h = Helper("h", to_dist=DistConf(server="w1"))
    p = h(Msg("user", "x"))
    copy = pickle.loads(pickle.dumps(p))
    assert not copy.done()  # pending: it was not resolved when pickled
    assert copy.result(timeout=WAIT).content == "h<x>" == p.result(timeout=WAIT).content
    # Resolved, it carries its value (or its error) with it.
    again = pickle.loads(pickle.dumps(p))
    assert again.done() and again.content == "h<x>"
    failed = Boom("b", to_dist=DistConf(server="w1"))(None)
    with pytest.raises(RemoteError):
        failed.result(timeout=WAIT)
    with pytest.raises(RemoteError, match="KeyError"):
        pickle.loads(pickle.dumps(failed)).result(timeout=0.01)
    # Through a real pickling boundary: a child process resolves it from Redis.
    fresh = h(Msg("user", "y"))
    code = ("import pickle, sys, busagent; busagent.init(sys.argv[1], prefix=sys.argv[2]); "
            "p = pickle.loads(sys.stdin.buffer.read()); print(p.result(timeout=30).content)")
    b = busagent.bus.current()
    out = subprocess.run([sys.executable, "-c", code, b.settings.redis_url or "",
                          b.settings.prefix], input=pickle.dumps(fresh), capture_output=True,
                         timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.decode().strip() == "h<y>"


def test_agent_handles_round_trip_in_memory_and_on_the_bus_without_their_class() -> None:
    from busagent.memory import from_json, to_json
    from busagent.protocol import pack, unpack

    h = RemoteAgent("id1", "h", Helper, "w1")
    for back in (from_json(to_json([h])), unpack(pack(Msg("x", {"team": [h]}))).content["team"]):
        assert [(a.agent_id, a.name, a.cls, a.server) for a in back] == [("id1", "h", Helper,
                                                                          "w1")]
    # A class this process never imported: still a handle for reply/observe, named, and
    # refusing @remote methods it cannot check.
    data = to_json({"$agent": 1, "h": h}).replace("tests.values_agents:Helper", "nowhere:Gone")
    gone = from_json(data)["h"]
    assert isinstance(gone, RemoteAgent) and gone.agent_id == "id1"
    assert "Gone" in repr(gone)
    # ...and saying why: its class is not imported here (not "mark it @remote").
    with pytest.raises(AttributeError, match="nowhere:Gone is not imported in this process"):
        gone.anything  # noqa: B018


# --- review of issue 10: F4 memory shown as stored, F5 values that travel exactly, F6 local memory


T3 = '''
import sys

import busagent
from pydantic import BaseModel
from busagent import Agent, DistConf, Msg


class P(BaseModel):
    x: int
    t: tuple[int, int] = (1, 2)


class Storer(Agent):
    def reply(self, x=None):
        self.memory.add([{"plain": 1}, {1: "one", (2, 3): "pair"}, (4, frozenset({5})), P(x=6),
                         Msg("m", P(x=7)), "text", Msg("n", {"$b64": "aGk="})])
        return Msg(self.name, self.memory.size())


if __name__ == "__main__":
    busagent.init(sys.argv[1], prefix=sys.argv[2])
    # Detached: the test reads its memory after this script exits (owned ones go with it).
    s = Storer("s", to_dist=DistConf(server=sys.argv[3], lifetime="detached"))
    assert s(None).result(timeout=30).content == 7
    print(s.agent_id)
'''


def test_busagent_memory_shows_every_item_as_stored_without_the_users_classes(
        workers: Workers, redis_url: str, prefix: str, raw: redis.Redis,
        tmp_path: Path) -> None:
    """F4: a plain dict item, int and tuple keys, tuples, a pydantic model from the user's
    script (which neither the CLI nor this process imported): shown exactly, never dropped,
    never an error; the studio's agent page reads the same."""
    from busagent.studio import data

    script = tmp_path / "t3.py"
    script.write_text(textwrap.dedent(T3))
    workers.start("w1", str(script))
    env = {**os.environ, **FAST, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, str(script), redis_url, prefix, "w1"],
                          capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    agent_id = done.stdout.strip()
    stored = [json.loads(x) for x in raw.lrange(f"{prefix}:memory:{agent_id}", 0, -1)]
    assert len(stored) == 7

    cmd = [sys.executable, "-m", "busagent.cli", "memory", agent_id]
    env = {**os.environ, "BUSAGENT_REDIS_URL": redis_url, "BUSAGENT_PREFIX": prefix,
           "PYTHONPATH": str(ROOT)}
    as_json = subprocess.run([*cmd, "--json"], capture_output=True, text=True, timeout=60,
                             env=env, cwd=ROOT)
    assert as_json.returncode == 0, as_json.stderr
    assert json.loads(as_json.stdout) == stored  # exactly as stored, tagged encoding and all
    table = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env, cwd=ROOT)
    assert table.returncode == 0, table.stderr
    rows = table.stdout.splitlines()[1:]
    assert len(rows) == 7, table.stdout
    for row, shown in zip(rows, ["{'plain': 1}", "{1: 'one', (2, 3): 'pair'}",
                                 "(4, frozenset({5}))", "t3:P(x=6, t=(1, 2))",
                                 "t3:P(x=7, t=(1, 2))", "text", "{'$b64': 'aGk='}"],
                          strict=True):
        assert row.rstrip().endswith(shown), (row, shown)
    assert " m " in rows[4] and " n " in rows[6]  # a Msg keeps its name column

    page = data.agent(agent_id)["memory"]
    assert page["total"] == 7 and len(page["items"]) == 7
    assert page["items"][0] == {"content": {"$dict": {"plain": 1}}}
    assert page["items"][3]["content"]["$model"] == "t3:P"
    assert page["items"][4]["name"] == "m" and page["items"][4]["content"]["$model"] == "t3:P"


def test_tuples_sets_and_their_use_as_keys_travel_exactly_both_ways(workers: Workers) -> None:
    """F5: tuple and frozenset keys, frozensets of tuples, tuples and sets at any depth, as a
    call's argument, keyword argument and reply: exactly what was sent, never a
    ProtocolError; a placeholder inside a tuple is resolved before the call runs."""
    workers.start("w1", *MODS)
    mirror = Mirror("mirror", to_dist=DistConf(server="w1"))
    helper = Helper("h", to_dist=DistConf(server="w1"))
    out = mirror(exotic(), k=exotic()).result(timeout=WAIT).content
    assert out["shape"] == shape(exotic()) and out["kw_shape"] == shape({"k": exotic()})
    assert shape(out["got"]) == shape(exotic()) and shape(out["kw"]["k"]) == shape(exotic())
    assert out["got"] == exotic()
    # In a Msg's content, and a placeholder inside a tuple (resolved on the worker).
    out = mirror(Msg("u", {(1, "a"): (frozenset({2}),)})).result(timeout=WAIT).content
    assert out["shape"] == shape(Msg("u", {(1, "a"): (frozenset({2}),)}))
    out = mirror((helper(Msg("u", 1)), frozenset({1}))).result(timeout=WAIT).content
    assert out["shape"].startswith("tuple[Msg(str:'h<1>'),frozenset{int:1}]")


def test_subclasses_of_built_in_types_travel_as_their_base_type() -> None:
    """F5, as the README says: an IntEnum as its int, a str Enum as its str, a namedtuple as a
    tuple, an OrderedDict as a dict (the receiver may lack the subclass)."""
    import collections
    import enum

    from busagent.protocol import pack, unpack

    class Level(enum.IntEnum):
        HIGH = 2

    class Role(str, enum.Enum):
        USER = "user"

    pair = collections.namedtuple("pair", "a b")
    got = unpack(pack({pair(1, 2): [Level.HIGH, Role.USER, collections.OrderedDict(z=1)]}))
    assert shape(got) == shape({(1, 2): [2, "user", {"z": 1}]})


def test_a_local_agents_memory_stores_values_and_refuses_at_add_naming_where(
        workers: Workers) -> None:
    """F6: a local agent's memory keeps a placeholder's value (at any depth, pending or
    resolved), never the placeholder; what cannot be stored is refused at add, naming where;
    the same as a distributed agent's."""
    workers.start("w1", *MODS)
    h = Helper("h", to_dist=DistConf(server="w1"))
    local = Keeper("local")
    local.memory.add(h(Msg("u", 1)))                       # pending
    done = h(Msg("u", 2))
    done.result(timeout=WAIT)
    local.memory.add([done, Msg("a", {"deep": [h(Msg("u", 3))], "t": (done,)})])
    items = local.memory.get()
    assert placeholders_in(items) == 0
    assert [type(x).__name__ for x in items] == ["Msg", "Msg", "Msg"]
    assert items[0].content == "h<1>" and items[2].content["deep"][0].content == "h<3>"
    assert items[2].content["t"][0].content == "h<2>"
    with pytest.raises(NotSerializable, match=r"memory item 3\.content\['q'\]\[0\]"):
        local.memory.add(Msg("a", {"q": [object()]}))
    assert local.memory.get() == items
    moved = local.to_dist(server="w1")
    moved.exact().result(timeout=WAIT)  # built, its memory written
    assert moved.memory.get() == items

    # The same on a worker: the agent's own memory holds values, and add refuses at once.
    holder = Holder("holder", h, to_dist=DistConf(server="w1"))
    out = holder(Msg("u", 4)).result(timeout=WAIT).content
    assert out["placeholders"] == 0 and out["size"] == 2
    assert "memory item 2.content['q'][0]" in out["refused"]
    first, second = holder.memory.get()
    assert first.content == "h<4>" and second.content["t"][0].content == "h<4>"


def test_memory_keeps_frozensets_and_tuples_exactly_even_as_keys() -> None:
    """A frozenset came back from memory as a set, and as a dict key (or inside a frozenset)
    could not come back at all."""
    from busagent.memory import from_json, to_json

    for item in (exotic(), Msg("a", exotic()), frozenset({(1, 2), frozenset({3})})):
        assert shape(from_json(to_json(item))) == shape(item)
