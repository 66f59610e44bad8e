"""The protocol on both ends, and the Lua scripts held to it (no Redis, no processes)."""

from __future__ import annotations

import re
from importlib import resources
from typing import Any, get_args

import pytest

from busagent import Msg
from busagent.errors import _BY_CODE, BusagentError, ProtocolError, RemoteError, UnknownAgent
from busagent.memory import from_json, to_json
from busagent.protocol import (
    DEADLETTER_FIELDS,
    LUA_ENTRY_FIELDS,
    VERSION,
    CallBody,
    ControlBody,
    CreateBody,
    Entry,
    ErrorInfo,
    Kind,
    Ref,
    Reply,
    unpack,
)
from busagent.scripts import NAMES
from tests.agents import Point


def _lua(name: str) -> str:
    return resources.files("busagent").joinpath(name).read_text()


def _as_redis_returns(fields: dict[str, Any]) -> dict[bytes, bytes]:
    return {k.encode(): v if isinstance(v, bytes) else str(v).encode() for k, v in fields.items()}


def test_entry_roundtrips_through_its_stream_fields() -> None:
    e = Entry.new("secret", "call", b"\x00body", call="c1", agent="a1", caller="h:1")
    fields = e.fields()
    assert set(fields) == {"v", "kind", "call", "agent", "caller", "body", "sig"}
    assert Entry.from_fields(_as_redis_returns(fields)) == e
    # Defaults stay out of the entry: an unsigned wake is short in redis-cli.
    wake = Entry.new(None, "control", ControlBody(op="wake").pack())
    assert set(wake.fields()) == {"v", "kind", "body"}
    assert Entry.from_fields(_as_redis_returns(wake.fields())) == wake


@pytest.mark.parametrize("fields", [
    {"v": VERSION, "kind": "exec", "call": "c", "agent": "a"},            # unknown kind
    {"v": VERSION, "kind": "create", "call": "c"},                       # create needs an agent
    {"v": VERSION, "kind": "call", "agent": "a"},                        # nobody to answer
    {"v": VERSION, "kind": "restore", "call": "c", "agent": "a"},        # restores are unanswered
    {"v": "one", "kind": "call", "call": "c", "agent": "a"},
    {"kind": "call", "call": "c", "agent": "a"},                          # no version
])
def test_malformed_entries_raise_protocol_errors(fields: dict[str, Any]) -> None:
    with pytest.raises(ProtocolError, match="malformed call entry"):
        Entry.from_fields(_as_redis_returns(fields))


def test_undecodable_header_is_malformed() -> None:
    with pytest.raises(ProtocolError, match="malformed call entry"):
        Entry.from_fields({b"call": b"\xff\xfe", b"kind": b"call", b"v": str(VERSION).encode()})


def test_another_versions_entry_parses_so_the_worker_can_name_the_version() -> None:
    old = Entry.from_fields({b"v": b"1", b"kind": b"create", b"call": b"c", b"restore": b"1"})
    assert old.v == 1 and old.v != VERSION


def test_who_is_answered_is_decided_by_kind() -> None:
    restore = Entry.new(None, "restore", b"", agent="a1", caller="recovery")
    assert restore.call == "" and Entry.reply_to(_as_redis_returns(restore.fields())) == ""
    assert Entry.reply_to({b"kind": b"call", b"call": b"c9"}) == "c9"
    assert Entry.reply_to({b"kind": b"control"}) == ""  # the worker's wake
    assert Entry.agent_of({b"junk": b"\x00"}) == ""


def test_bodies_pack_small_and_keep_user_values() -> None:
    assert unpack(CallBody(args=[1]).pack()) == {"args": [1]}  # defaults left out
    body = CallBody(args=[Msg("a", Point(x=1, y=2)), Ref("c1")], method="m", stream=True)
    refs: list[Ref] = []
    back = CallBody.unpack(body.pack(), refs)
    assert back.args[0].content == Point(x=1, y=2) and refs == [Ref("c1")]
    assert (back.method, back.stream, back.timeout) == ("m", True, None)
    spec = CreateBody(cls="m:C", name="n", memory=[to_json(Msg("a", 1))])
    assert from_json(CreateBody.unpack(spec.pack()).memory[0]).content == 1
    for bad in (CallBody(args=[1]).pack(), b"\x93\x01\x02\x03"):
        with pytest.raises(ProtocolError, match="malformed CreateBody"):
            CreateBody.unpack(bad)


def test_replies_carry_values_and_errors() -> None:
    assert Reply.parse(Reply.ok([1, "x"])).value_or_raise() == [1, "x"]
    with pytest.raises(UnknownAgent) as e:
        Reply.parse(Reply.fail(UnknownAgent("gone"), server="w1")).value_or_raise()
    assert e.value.server == "w1"
    with pytest.raises(RemoteError, match="ValueError: bad") as r:
        Reply.parse(Reply.fail(ValueError("bad"), traceback="tb")).value_or_raise()
    assert r.value.traceback == "tb"


def _xadd_field_names(src: str) -> set[str]:
    """The quoted field names in the XADDs of a script (pairs after the ``'*'`` id), and the
    names it compares fields with (``x[i] == 'name'``)."""
    names: set[str] = set()
    for call in re.findall(r"redis\.call\('XADD',(.*?)\)\s*$", src, re.S | re.M):
        args = [a.strip() for a in call.replace("\n", " ").split(",")]
        after = args[args.index("'*'") + 1 :]
        names.update(a.strip("'") for a in after[::2] if re.fullmatch(r"'\w+'", a))
    names.update(re.findall(r"\[i\]\s*==\s*'(\w+)'", src))
    for m in re.finditer(r"\[#f \+ 1\]\s*=\s*'(\w+)'", src):  # appended field names
        names.add(m.group(1))
    return names


def test_lua_entry_fields_are_the_models() -> None:
    model = set(Entry.model_fields) | set(DEADLETTER_FIELDS)
    for script, documented in LUA_ENTRY_FIELDS.items():
        spelled = _xadd_field_names(_lua(script))
        assert spelled == documented, script
        assert documented <= model, script
    # Kinds a script compares against are kinds of the model.
    kinds = set(get_args(Kind))
    for name in NAMES:
        assert set(re.findall(r"\[i \+ 1\]\s*==\s*'(\w+)'", _lua(f"{name}.lua"))) <= kinds


def test_lua_replies_are_replies_with_known_error_codes() -> None:
    assert set(_BY_CODE) >= {c.__name__ for c in BusagentError.__subclasses__()}
    seen = set()
    for name in NAMES:
        src = _lua(f"{name}.lua")
        for t in re.findall(r"type\s*=\s*'(\w+)'", src):
            assert t in _BY_CODE, f"{name}.lua replies with unknown error type {t!r}"
            seen.add(t)
        for table in re.findall(r"cmsgpack\.pack\(\{(.*?)\}\)\)", src, re.S):
            keys = set(re.findall(r"(\w+)\s*=", table))
            assert keys <= {"ok", "value", "error"} | set(ErrorInfo.model_fields), name
    assert seen == {"UnknownAgent", "DeadLettered"}
