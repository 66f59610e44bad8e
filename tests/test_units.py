"""Unit tests: the codec, memory, settings, errors and placement (fakeredis, no processes)."""

from __future__ import annotations

import contextlib
import json
import time
from types import SimpleNamespace
from typing import Any

import fakeredis
import pytest

import busagent
from busagent import Msg
from busagent.config import Settings
from busagent.errors import (
    ConfigError,
    NotSerializable,
    PlacementError,
    ProtocolError,
    RemoteError,
    UnknownAgent,
    from_wire,
)
from busagent.keys import Keys
from busagent.memory import Memory, from_json, to_json
from busagent.placeholder import Placeholder
from busagent.placement import Placement, place
from busagent.protocol import Ref, Reply, pack, substitute, unpack
from busagent.records import ServerInfo
from tests.agents import Point


def test_public_api_is_frozen() -> None:
    assert sorted(busagent.__all__) == sorted([
        "Agent", "BusagentError", "CallTimeout", "ConfigError", "DistConf", "Memory",
        "MessageTooLarge", "Msg", "NotSerializable", "Placeholder", "PlacementError",
        "ProtocolError", "RedisUnavailable", "RemoteAgent", "RemoteError", "ServerClient",
        "Settings", "UnknownAgent", "UnknownClass", "agather", "agents", "gather", "init",
        "remote", "servers", "shutdown",
        # models, hubs, the task center, streaming, humans, bulk calls
        "ModelConfig", "ModelError", "load_model_configs", "models", "Hub", "HubMessage",
        "Member", "Broadcast", "Direct", "Function", "Random", "RoundRobin", "TaskCenter",
        "StepEvent", "Event", "Human", "fanout", "create_many", "release",
        # the error groups (errors.py draws the tree)
        "AgentError", "BusError", "UsageError", "ConstructorError", "DeadLettered",
        # cancellation
        "cancel", "cancelled", "Cancelled",
        # namespaces, names and lifetimes
        "get_agent", "NameTaken",
    ])


def test_msg_positional_and_defaults() -> None:
    m = Msg("user", {"k": [1, 2]})
    assert (m.name, m.content, m.role, m.metadata, m.url) == ("user", {"k": [1, 2]}, "user",
                                                              None, None)
    assert len(m.id) == 24 and m.timestamp[:2] == "20"
    assert Msg("a", 1).id != Msg("a", 1).id


def test_codec_roundtrips_msgs_refs_models_nested() -> None:
    inner = Msg("b", b"\x00bytes", role="assistant", metadata={"t": 1.5})
    p = Placeholder("call-1")
    value = {"msgs": [Msg("a", inner), inner], "ref": p, "point": Point(x=1, y=2),
             "tuple": (1, 2), 3: None}
    refs: list[Ref] = []
    out = unpack(pack(value), refs)
    assert out["msgs"][0].content == inner and out["msgs"][1] == inner
    assert out["ref"] == Ref("call-1") and refs == [Ref("call-1")]
    assert out["point"] == Point(x=1, y=2) and out[3] is None
    assert type(out["tuple"]) is tuple and out["tuple"] == (1, 2)  # exact (README: Values)
    assert substitute(out, {"call-1": "resolved"})["ref"] == "resolved"
    nested = substitute(Msg("x", [Ref("call-1")]), {"call-1": 7})
    assert nested.content == [7]


def test_codec_refuses_what_cannot_travel() -> None:
    with pytest.raises(NotSerializable, match="object cannot travel"):
        pack({"x": object()})
    with pytest.raises(NotSerializable):
        pack(lambda: 1)


def test_codec_rejects_garbage_and_unknown_models() -> None:
    import msgpack

    unknown_ext = msgpack.packb(msgpack.ExtType(9, b""))
    for data in (b"\xc1", b"\x92\x01", b"\x80\x04\x95garbage", unknown_ext):
        with pytest.raises(ProtocolError):
            unpack(data)
    fake = msgpack.packb(msgpack.ExtType(3, pack(["not.loaded.module:Thing", {}])))
    with pytest.raises(ProtocolError, match="not loaded"):
        unpack(fake)
    notmodel = msgpack.packb(msgpack.ExtType(3, pack(["os:system", {}])))
    with pytest.raises(ProtocolError, match="not a pydantic model"):
        unpack(notmodel)


def test_reply_roundtrip_and_error_mapping() -> None:
    r = Reply.parse(Reply.ok(Msg("a", 1)))
    assert r.success and r.value.content == 1
    e = from_wire("ValueError", "bad", "tb", "w1")
    assert isinstance(e, RemoteError) and e.type == "ValueError" and "tb" in str(e)
    assert isinstance(from_wire("UnknownAgent", "gone", "", "w1"), UnknownAgent)
    with pytest.raises(ProtocolError):
        Reply.parse(pack({"nope": 1}))


def test_memory_tracks_changes_for_incremental_saves() -> None:
    m = Memory()
    m.add(Msg("a", 1))
    m.add([Msg("a", 2), None])
    m.add(None)
    cleared, new = m.take_changes()
    assert not cleared and [json.loads(x)["content"] for x in new] == [1, 2]
    assert m.take_changes() == (False, [])
    m.clear()
    m.add("plain")
    cleared, new = m.take_changes()
    assert cleared and new == ['"plain"']
    assert m.get(1) == ["plain"] and m.get(0) == [] and m.size() == 1
    original = Msg("a", {"raw": b"\xff", "inner": Msg("b", [Point(x=1, y=2)])}, metadata={"k": 1})
    back = from_json(to_json(original))
    assert back == original
    assert json.loads(to_json(original))["content"]["raw"] == {"$b64": "/w=="}


def test_settings_from_env_and_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BUSAGENT_PREFIX", "app1")
    monkeypatch.setenv("BUSAGENT_CALL_TIMEOUT", "none")
    s = Settings.load(heartbeat=0.5)
    assert (s.prefix, s.call_timeout, s.heartbeat) == ("app1", None, 0.5)
    assert s.block_slice < s.socket_timeout
    with pytest.raises(ConfigError, match="unknown setting"):
        Settings.load(nonsense=1)
    with pytest.raises(ConfigError, match="invalid"):
        Settings.load(prefix="a b")
    monkeypatch.setenv("BUSAGENT_HEARTBEAT", "-1")
    with pytest.raises(ConfigError):
        Settings.load()


def test_keys_are_prefixed() -> None:
    k = Keys("p")
    assert [k.servers, k.agents, k.inbox("s"), k.reply("c"), k.memory("a"), k.ready("s")] == [
        "p:servers", "p:agents", "p:inbox:s", "p:reply:c", "p:memory:a", "p:ready:s"]


def _fake_bus() -> Any:
    s = Settings.load(dead_after=10)
    return SimpleNamespace(redis=fakeredis.FakeRedis(), keys=Keys("u"), settings=s,
                           placement=Placement(), errors=contextlib.nullcontext,
                           where=lambda: "", private_to="this-program")


def _server(name: str, **kw: Any) -> str:
    base = dict(name=name, host="h", pid=1, started=0.0, heartbeat=time.time(), capacity=100,
                modules=["m"], agents=0, cpu=0.0)
    return ServerInfo(**{**base, **kw}).model_dump_json()


def test_placement_prefers_light_servers_and_spreads_bursts() -> None:
    b = _fake_bus()
    b.redis.hset(b.keys.servers, mapping={
        "busy": _server("busy", cpu=90.0),
        "idle1": _server("idle1"),
        "idle2": _server("idle2"),
        "dead": _server("dead", heartbeat=time.time() - 60),
        "full": _server("full", agents=100),
        "other": _server("other", modules=["x"]),
    })
    picks = [place(b, "m", "m", None) for _ in range(30)]
    assert set(picks) == {"idle1", "idle2", "busy"}
    assert abs(picks.count("idle1") - picks.count("idle2")) <= 1
    assert picks.count("busy") < picks.count("idle1")
    assert place(b, "x", "x", None) == "other"
    with pytest.raises(PlacementError, match="did not load module 'm'"):
        place(b, "m", "m", "other")
    with pytest.raises(PlacementError, match="no live server named 'dead'"):
        place(b, "m", "m", "dead")
    with pytest.raises(PlacementError, match="full"):
        place(b, "m", "m", "full")


def test_ids_are_unique_across_a_fork() -> None:
    import os

    from busagent.ids import new_id

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child writes its first id and leaves at once
        os.write(w, new_id().encode())
        os._exit(0)
    os.waitpid(pid, 0)
    child = os.read(r, 64).decode()
    mine = {new_id() for _ in range(1000)}
    assert len(mine) == 1000 and child not in mine and child[:16] != next(iter(mine))[:16]


def test_openai_model_against_the_fake_endpoint() -> None:
    import asyncio

    from busagent.errors import ModelError
    from busagent.fakellm import FakeLLM
    from busagent.models import ModelConfig, OpenAIChatModel

    fake = FakeLLM().start()
    down = FakeLLM(fail_every=1).start()  # every request fails
    try:
        m = OpenAIChatModel(ModelConfig.model_validate(fake.config("f")))
        msgs = [{"role": "user", "content": "hello"}]

        async def run() -> tuple[str, list[str]]:
            text = (await m.acall(msgs)).text
            return text, [p async for p in m.astream(msgs)]

        text, pieces = asyncio.run(run())
        assert text.endswith("I agree, let us go on.") and "".join(pieces) == text
        assert len(pieces) > 3  # streamed word by word
        assert m(msgs).text == text  # the blocking form, from a plain thread
        bad = OpenAIChatModel(ModelConfig.model_validate(down.config("d", max_retries=2)))
        with pytest.raises(ModelError, match="failed 3 times"):
            asyncio.run(bad.acall(msgs))
        assert down.requests == 3
    finally:
        fake.stop()
        down.stop()
