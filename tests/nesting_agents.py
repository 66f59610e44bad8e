"""Agent classes for the nesting, cycle, poison and delete tests (``--agents
tests.nesting_agents``)."""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import busagent
from busagent import Agent, Msg, RemoteAgent


class Relay(Agent):
    """Passes the call on to ``next_id`` and blocks on its reply inside ``reply`` (a nested
    call); with no next agent it is the leaf: sleeps ``hold`` seconds and answers."""

    def __init__(self, name: str, next_id: str = "", hold: float = 0.0) -> None:
        super().__init__(name)
        self.next_id = next_id
        self.hold = hold

    @busagent.remote
    def point_to(self, next_id: str) -> None:
        self.next_id = next_id

    def reply(self, x: Msg | None = None) -> Msg:
        n = x.content if x is not None else 0
        if not self.next_id:
            time.sleep(self.hold)
            return Msg(self.name, n + 1)
        return Msg(self.name, RemoteAgent.by_id(self.next_id)(Msg("user", n)).content + 1)


class AsyncRelay(Relay):
    """:class:`Relay` with an ``async def reply`` that awaits the nested call."""

    async def reply(self, x: Msg | None = None) -> Msg:  # type: ignore[override]
        n = x.content if x is not None else 0
        if not self.next_id:
            return Msg(self.name, n + 1)
        got = await RemoteAgent.by_id(self.next_id)(Msg("user", n))
        return Msg(self.name, got.content + 1)


class Gate(Agent):
    """Adds to its memory, then waits until the file ``go`` exists (so a test can act while
    the call runs); ``started`` is created once the call has begun."""

    def __init__(self, name: str, started: str, go: str) -> None:
        super().__init__(name)
        self.started = Path(started)
        self.go = Path(go)

    def reply(self, x: Msg | None = None) -> Msg:
        self.memory.add(Msg(self.name, "before the delete"))
        self.started.touch()
        deadline = time.monotonic() + 30
        while not self.go.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        self.memory.add(Msg(self.name, "after the delete"))
        return Msg(self.name, "done")


class Poison(Agent):
    """Every call takes its worker down with it."""

    def reply(self, x: Any = None) -> Msg:
        os._exit(17)


class Caller(Agent):
    """Calls ``peer_id`` with its input: ``wait`` False sends without waiting and returns
    "<name> returned" (a callback pattern's first half); True waits for the peer's reply;
    "thread" waits for it in a thread the reply starts. The outcome of a waited call is also
    written to ``out`` (a file), if given: "ok <content>" or "<error type>: <message>"."""

    def __init__(self, name: str, peer_id: str = "", wait: bool | str = True,
                 out: str = "") -> None:
        super().__init__(name)
        self.peer_id = peer_id
        self.wait = wait
        self.out = out

    @busagent.remote
    def point_to(self, peer_id: str) -> None:
        self.peer_id = peer_id

    def reply(self, x: Msg | None = None) -> Msg:
        peer = RemoteAgent.by_id(self.peer_id)
        if not self.wait:
            if x is not None and x.content == "x":  # the callback: answered here
                return Msg(self.name, f"{self.name} called back")
            peer(Msg(self.name, "call me back"))
            return Msg(self.name, f"{self.name} returned")
        try:
            if self.wait == "thread":
                with ThreadPoolExecutor(1) as pool:
                    got = pool.submit(lambda: peer(Msg(self.name, "x")).result(timeout=30))
                    content = got.result().content
            else:
                content = peer(Msg(self.name, "x")).content
        except Exception as e:
            if self.out:
                Path(self.out).write_text(f"{type(e).__name__}: {e}")
            raise
        if self.out:
            Path(self.out).write_text(f"ok {content}")
        return Msg(self.name, content)


class Answerer(Agent):
    def reply(self, x: Msg | None = None) -> Msg:
        return Msg(self.name, f"{self.name} answered")
