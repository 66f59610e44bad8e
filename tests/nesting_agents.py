"""Agent classes for the nesting, cycle, poison and delete tests (``--agents
tests.nesting_agents``)."""

from __future__ import annotations

import os
import time
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
