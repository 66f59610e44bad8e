"""Agent classes the test workers load (``--agents tests.agents``)."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from typing import Any

from pydantic import BaseModel

import busagent
from busagent import Agent, Msg


class Adder(Agent):
    def __init__(self, name: str, inc: int = 1) -> None:
        super().__init__(name)
        self.inc = inc

    def reply(self, x: Msg | None = None) -> Msg:
        self.memory.add(x)
        return Msg(self.name, (x.content if x else 0) + self.inc, role="assistant")

    @busagent.remote
    def set_inc(self, inc: int) -> int:
        old, self.inc = self.inc, inc
        return old

    def secret(self) -> str:  # not marked remote: the worker must refuse it
        return "leaked"


class AsyncAdder(Agent):
    def __init__(self, name: str, inc: int = 1, delay: float = 0.0) -> None:
        super().__init__(name)
        self.inc = inc
        self.delay = delay

    async def reply(self, x: Msg | None = None) -> Msg:
        await asyncio.sleep(self.delay)
        self.memory.add(x)
        return Msg(self.name, (x.content if x else 0) + self.inc, role="assistant")


class Sleeper(Agent):
    def __init__(self, name: str, seconds: float = 1.0) -> None:
        super().__init__(name)
        self.seconds = seconds

    def reply(self, *xs: Msg | None) -> Msg:
        time.sleep(self.seconds)
        seen = "+".join(str(x.content) for x in xs if x is not None)
        return Msg(self.name, f"{self.name}({seen})")


class Recorder(Agent):
    """Records calls in memory and fails loudly if two ever overlap."""

    def __init__(self, name: str, hold: float = 0.0) -> None:
        super().__init__(name)
        self.hold = hold
        self._lock = threading.Lock()

    def reply(self, x: Msg | None = None) -> Msg:
        if not self._lock.acquire(blocking=False):
            raise RuntimeError("two calls ran at once on one agent")
        try:
            if self.hold:
                time.sleep(self.hold)
            self.memory.add(x)
            return Msg(self.name, self.memory.size())
        finally:
            self._lock.release()


class Failer(Agent):
    def reply(self, x: Msg | None = None) -> Msg:
        return self.explode(x)

    def explode(self, x: Any) -> Msg:
        raise ValueError(f"boom: {x.content if x else None}")


class BadReply(Agent):
    def reply(self, x: Msg | None = None) -> Any:
        return object()


class BadInit(Agent):
    def __init__(self, name: str) -> None:
        super().__init__(name)
        raise RuntimeError("constructor failed on purpose")


class Info(Agent):
    def reply(self, x: Msg | None = None) -> dict[str, Any]:
        return {"pid": os.getpid(), "agent_id": self.agent_id}


class Point(BaseModel):
    x: int
    y: int


class Geo(Agent):
    def __init__(self, name: str, origin: Point) -> None:
        super().__init__(name)
        self.origin = origin

    def reply(self, p: Point) -> Point:
        return Point(x=p.x + self.origin.x, y=p.y + self.origin.y)


class Killer(Agent):
    """A poison call: takes its worker down with it."""

    def reply(self, x: Msg | None = None) -> Msg:
        os._exit(17)


class Member(Agent):
    """A hub member: speaks a line that counts what it has heard; ``heard`` lists the hub
    messages it observed, in the order it observed them."""

    def __init__(self, name: str, delay: float = 0.0) -> None:
        super().__init__(name)
        self.delay = delay

    def reply(self, x: Msg | None = None) -> str:
        if self.delay:
            time.sleep(self.delay)
        return f"{self.name} heard {len(self.memory)}"

    @busagent.remote
    def heard(self) -> list[list[str]]:
        return [[m.metadata["seq"], str(m.content)] for m in self.memory.get()
                if isinstance(m, Msg) and m.metadata and "seq" in m.metadata]


class Streamer(Agent):
    """Streams its reply word by word (an async generator, like LLM tokens)."""

    async def reply(self, x: Msg | None = None) -> Any:  # type: ignore[override]
        text = str(x.content) if x is not None else f"{self.name} says hello to everyone"
        for i, word in enumerate(text.split(" ")):
            await asyncio.sleep(0.01)
            yield word if i == 0 else " " + word


class SyncStreamer(Agent):
    """Streams from a plain generator, then fails halfway when asked to."""

    def reply(self, x: Msg | None = None) -> Any:
        for i in range(3):
            yield f"part{i}"
        if x is not None and x.content == "fail":
            raise ValueError("broke after three parts")
