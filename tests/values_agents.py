"""Agent classes for ``tests/test_edges_values.py`` (``--agents tests.values_agents``)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import busagent
from busagent import Agent, Msg

#: text that is not valid Unicode: a file name os.fsdecode could not decode (a lone surrogate).
BAD_TEXT = "cannot open " + os.fsdecode(b"report-\xff.txt")


def tricky() -> list[Any]:
    """Memory items JSON alone would change: int keys, user dicts that look like the encoding's
    own tags, tuples, sets, bytes, a Msg holding all of them, a dict with a Msg's field names."""
    return [
        {1: "one"},
        {"$b64": "aGk="},
        {"$msg": {"name": "x"}},
        {"$model": "tests.agents:Point", "data": {"x": 1}},
        (1, (2, "three")),
        {4, 5},
        b"hi\xff",
        {"name": "n", "id": "i", "timestamp": "t"},
        Msg("m", {"$b64": "x", 2: (3,), "raw": b"\x00"}, metadata={"k": [1, 2]}, id="m1",
            timestamp="2026-01-01 00:00:00.000"),
        [None, True, 1.5, "é"],
        "x" + os.fsdecode(b"\xff"),
    ]


class Faulty(Agent):
    """``reply(x)`` does what ``x.content`` says: each mode is a value that cannot travel."""

    def reply(self, x: Msg | None = None) -> Any:
        mode = x.content if x is not None else "ok"
        if mode == "raise-bad-text":
            raise ValueError(BAD_TEXT)
        if mode == "raise-bad-str":
            raise _BadStr()
        if mode == "reply-bad-text":
            return Msg(self.name, {"file": BAD_TEXT})
        if mode == "reply-object":
            return Msg(self.name, {"deep": [1, {"thing": object()}]})
        if mode == "memory-object":
            self.memory.add(Msg(self.name, {"handle": object()}))
            return Msg(self.name, "stored?")
        if mode == "memory-bad-text":
            self.memory.add("kept")
            self.memory.add(Msg(self.name, BAD_TEXT))  # stored exactly (JSON escapes)
            return Msg(self.name, "stored")
        self.memory.add(x)
        return Msg(self.name, f"ok:{mode}")

    @busagent.remote
    def remembered(self) -> list[Any]:
        """The contents in memory (the text that cannot travel named, not sent)."""
        out = [m.content if isinstance(m, Msg) else m for m in self.memory.get()]
        return ["BAD_TEXT" if c == BAD_TEXT else c for c in out]


class _BadStr(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no text for you")


class Streamer(Agent):
    def reply(self, x: Msg | None = None) -> Iterator[Any]:
        yield "fine "
        if x is not None and x.content == "bad":
            yield {"file": BAD_TEXT}
        yield "done"


class Helper(Agent):
    def reply(self, x: Msg | None = None) -> Msg:
        return Msg(self.name, f"{self.name}<{x.content if x else ''}>", role="assistant")


class Manager(Agent):
    """Built with a team of distributed agents (handles as constructor arguments); replies with
    the team's placeholders inside its reply, and keeps them in memory."""

    def __init__(self, name: str, team: list[Any] | None = None) -> None:
        super().__init__(name)
        self.team = list(team or [])

    def reply(self, x: Msg | None = None) -> Msg:
        team = list(self.team)
        if x is not None and isinstance(x.content, dict) and "team" in x.content:
            team += x.content["team"]  # handles inside a message too
        answers = [h(x) for h in team]
        self.memory.add(answers[0] if answers else None)
        return Msg(self.name, {"answers": answers, "team": team})


class Creator(Agent):
    """Creates its helper itself (on a worker), as in the issue."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.helper = Helper(f"{name}-helper", to_dist=True)

    def reply(self, x: Msg | None = None) -> Msg:
        self.memory.add(self.helper(x))
        return Msg(self.name, {"answer": self.helper(x)})


class Keeper(Agent):
    def reply(self, x: Msg | None = None) -> Msg:
        self.memory.add(tricky())
        return Msg(self.name, len(self.memory.get()))

    @busagent.remote
    def exact(self) -> bool:
        return self.memory.get()[-len(tricky()):] == tricky()


class Boom(Agent):
    def reply(self, x: Msg | None = None) -> Msg:
        raise KeyError(f"no such key {x.content if x else None!r}")


class Echo(Agent):
    def reply(self, *xs: Any) -> Msg:
        return Msg(self.name, [x.content if isinstance(x, Msg) else x for x in xs])


# --- F5, F6: values msgpack alone would change, memory that resolves and refuses at add --------


def exotic() -> dict[Any, Any]:
    """Values msgpack alone writes as arrays and cannot bring back: tuple and frozenset keys,
    frozensets holding tuples, tuples and sets at depth, a namedless empty tuple as a key."""
    return {(1, 2): "t", frozenset({(3, "a"), 4}): {5, 6}, "tuple": (1, (2, [3])),
            "frozen": frozenset({frozenset({7})}), ((1,), b"k"): [(), set()], None: {(): 0}}


def shape(v: Any) -> str:
    """``v`` as text that shows every container's exact type, the same in every process (a
    set's order is not: its items are sorted here)."""
    if isinstance(v, dict):
        return "dict{" + ",".join(sorted(f"{shape(k)}:{shape(x)}" for k, x in v.items())) + "}"
    if isinstance(v, set | frozenset):
        return type(v).__name__ + "{" + ",".join(sorted(shape(x) for x in v)) + "}"
    if isinstance(v, list | tuple):
        return type(v).__name__ + "[" + ",".join(shape(x) for x in v) + "]"
    if isinstance(v, Msg):
        return f"Msg({shape(v.content)})"
    return f"{type(v).__name__}:{v!r}"


def placeholders_in(v: Any) -> int:
    """How many placeholder objects ``v`` holds, at any depth."""
    if isinstance(v, busagent.Placeholder):
        return 1
    if isinstance(v, dict):
        return sum(placeholders_in(k) + placeholders_in(x) for k, x in v.items())
    if isinstance(v, list | tuple | set | frozenset):
        return sum(placeholders_in(x) for x in v)
    if isinstance(v, Msg):
        return placeholders_in(v.content) + placeholders_in(v.metadata)
    return 0


class Mirror(Agent):
    """Replies with what it was given and the shape it saw."""

    def reply(self, x: Any = None, **kw: Any) -> Msg:
        return Msg(self.name, {"got": x, "kw": kw, "shape": shape(x), "kw_shape": shape(kw)})


class Holder(Agent):
    """Adds a helper's placeholders (at depth) and an unencodable value to its memory."""

    def __init__(self, name: str, helper: Any = None) -> None:
        super().__init__(name)
        self.helper = helper

    def reply(self, x: Msg | None = None) -> Msg:
        p = self.helper(x)
        self.memory.add(p)
        self.memory.add(Msg(self.name, {"deep": [self.helper(x)], "t": (p,)}))
        try:
            self.memory.add(Msg(self.name, {"q": [object()]}))
            refused = ""
        except busagent.errors.NotSerializable as e:
            refused = str(e)
        return Msg(self.name, {"refused": refused, "size": self.memory.size(),
                               "placeholders": placeholders_in(self.memory.get())})
