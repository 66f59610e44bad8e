"""Whatever arrives on the bus, the worker answers with a clear error where it can and keeps
serving everyone else. Nothing is unpickled."""

from __future__ import annotations

import pickle
from typing import Any

import pytest

import busagent
from busagent import DistConf, Msg, Placeholder
from busagent.errors import MessageTooLarge, ProtocolError, UnknownClass
from busagent.protocol import VERSION, pack
from tests.agents import Adder

from .conftest import Workers, wait_for


class Boom:
    def __reduce__(self) -> Any:
        return (print, ("pickle was executed",))


def _send(b: busagent.bus.Bus, server: str, **fields: Any) -> Placeholder:
    call = fields.setdefault("call", busagent.bus.new_id())
    b.redis.xadd(b.keys.inbox(server), fields)
    return Placeholder(call)


def test_hostile_entries_get_errors_and_the_worker_survives(workers: Workers) -> None:
    proc = workers.start("w1", env={"BUSAGENT_MAX_MESSAGE_BYTES": "4096"})
    b = busagent.bus.current()
    a = Adder("a", to_dist=DistConf(server="w1"))
    assert a(None).content == 1
    ok = {"v": VERSION, "agent": a.agent_id, "caller": "evil", "kind": "call"}

    # No call id at all: nobody to answer; dropped and acknowledged.
    b.redis.xadd(b.keys.inbox("w1"), {"junk": b"\x00\xff"})
    with pytest.raises(ProtocolError, match="malformed data"):
        _send(b, "w1", **ok, body=pickle.dumps(Boom())).result(timeout=10)
    with pytest.raises(ProtocolError, match="malformed"):
        _send(b, "w1", **ok, body=b"\xc1\xc1garbage").result(timeout=10)
    with pytest.raises(ProtocolError, match="protocol version 99"):
        _send(b, "w1", **{**ok, "v": 99}, body=pack({"args": []})).result(timeout=10)
    with pytest.raises(ProtocolError, match="malformed call entry"):
        _send(b, "w1", **{**ok, "kind": "exec"}, body=b"").result(timeout=10)
    with pytest.raises(ProtocolError, match=r"not marked @busagent\.remote"):
        _send(b, "w1", **{**ok, "kind": "method"},
              body=pack({"method": "secret"})).result(timeout=10)
    with pytest.raises(MessageTooLarge):
        _send(b, "w1", **ok, body=pack({"args": ["x" * 10_000]})).result(timeout=10)
    for cls in ("os:system", "tests.agents:Point", "builtins:object"):
        create = {"v": VERSION, "agent": busagent.bus.new_id(), "caller": "evil", "kind": "create",
                  "body": pack({"cls": cls, "name": "x", "args": [], "kwargs": {}})}
        with pytest.raises(UnknownClass):
            _send(b, "w1", **create).result(timeout=10)

    # Still the same process, still serving, nothing left pending.
    assert proc.poll() is None
    assert a(Msg("user", 41)).content == 42
    wait_for(lambda: b.redis.xpending(b.keys.inbox("w1"), "workers")["pending"] == 0,
             what="no pending entries")
