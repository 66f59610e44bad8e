"""Agent classes for tests/test_edges_hubs.py (workers load ``--agents tests.hub_agents``)."""

from __future__ import annotations

import time
from typing import Any

import busagent
from busagent import Agent, Msg, models


class Speaker(Agent):
    """Says a numbered line each turn and keeps nothing itself: what its memory holds is what
    the hub gave it. ``kept`` lists that memory as ``[seq, sent_from, content]``."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.turn = 0

    def reply(self, x: Msg | None = None) -> str:
        self.turn += 1
        return f"{self.name} line {self.turn}"

    @busagent.remote
    def kept(self) -> list[list[Any]]:
        return [[(m.metadata or {}).get("seq"), (m.metadata or {}).get("sent_from"),
                 m.content] for m in self.memory.get() if isinstance(m, Msg)]

    @busagent.remote
    def hold(self, seconds: float) -> None:
        """Keeps its mailbox busy, so what is sent to it meanwhile runs after this."""
        time.sleep(seconds)


class Keeper(Speaker):
    """AgentScope's habit: puts its own reply in its memory and returns the Msg."""

    def reply(self, x: Msg | None = None) -> Msg:  # type: ignore[override]
        self.turn += 1
        msg = Msg(self.name, f"{self.name} kept line {self.turn}", role="assistant")
        self.memory.add(msg)
        return msg


class ModelUser(Agent):
    """Asks the model config it was given, on its worker."""

    def __init__(self, name: str, config_name: str) -> None:
        super().__init__(name)
        self.config_name = config_name

    def reply(self, x: Msg | None = None) -> str:
        model = models.get(self.config_name)
        return model([Msg("user", "say something", role="user")]).text
