"""Agents for the studio, status and logs tests (``--agents tests.studio_agents``)."""

from __future__ import annotations

import logging
import time

from busagent import Agent, Msg

log = logging.getLogger("tests.studio_agents")


class Talker(Agent):
    """Logs a warning per call (a worker keeps its log lines in Redis) and remembers the input."""

    def reply(self, x: Msg | None = None) -> Msg:
        self.memory.add(x)
        log.warning("talker %s heard %s", self.name, x.content if x else None)
        return Msg(self.name, f"heard {x.content if x else None}", role="assistant")


class Boom(Agent):
    def reply(self, x: Msg | None = None) -> Msg:
        raise ValueError("boom")


class Slow(Agent):
    def __init__(self, name: str, seconds: float = 5.0) -> None:
        super().__init__(name)
        self.seconds = seconds

    def reply(self, x: Msg | None = None) -> Msg:
        time.sleep(self.seconds)
        return Msg(self.name, "slept")


class Keeper(Agent):
    """Remembers each input and answers ``heard <content>``, quietly."""

    def reply(self, x: Msg | None = None) -> Msg:
        self.memory.add(x)
        return Msg(self.name, f"heard {x.content if x else None}", role="assistant")
