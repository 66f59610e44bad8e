"""Humans in the loop: a human is an agent of the orchestrating process.

``Human(name, mode="terminal")`` shows what was said since its last turn and reads a line from
the terminal; ``mode="chatbot"`` takes its answer from a UI callback (``human.respond(text)``,
kept until its next turn), or ``TaskCenter.step(user_response=...)`` gives it the answer for a
turn in that step only. Either way, a human who has not answered within
``timeout`` seconds is skipped: ``reply`` returns None and the conversation goes on.
"""

from __future__ import annotations

import queue
import select
import sys
from typing import IO, Any, Literal

from .agent import Agent
from .errors import ConfigError
from .message import Msg


class Human(Agent):
    def __init__(self, name: str = "user", mode: Literal["terminal", "chatbot"] = "terminal",
                 timeout: float = 60.0, prompt: str = "> ", stdin: IO[str] | None = None,
                 stdout: IO[str] | None = None, echo: bool = True) -> None:
        super().__init__(name)
        if mode not in ("terminal", "chatbot"):
            raise ConfigError(f"Human mode {mode!r}: use 'terminal' or 'chatbot'")
        self.mode = mode
        self.timeout = timeout
        self.prompt = prompt
        self.stdin = stdin
        self.stdout = stdout
        #: terminal mode: print what was said since the last turn (off when the program
        #: already shows the conversation)
        self.echo = echo
        self._answers: queue.Queue[str] = queue.Queue()
        self._shown = 0

    def to_dist(self, server: Any = None, to_dist: Any = None, **agentscope: Any) -> Any:
        raise ConfigError("a Human lives where its terminal or UI is; keep it local")

    def respond(self, text: str) -> None:
        """Chatbot mode: the UI's callback with what the human typed."""
        self._answers.put(text)

    def take_answer(self, answer: str) -> str:
        """This turn's answer, given to the step it belongs to (``step(user_response=...)``):
        said now, never queued for a later turn."""
        return answer

    def reply(self, x: Any = None) -> str | None:
        self.memory.add(x)
        if self.mode == "chatbot":
            try:
                return self._answers.get(timeout=self.timeout)
            except queue.Empty:
                return None
        return self._read_terminal()

    def _read_terminal(self) -> str | None:
        out = self.stdout or sys.stdout
        items = self.memory.get()
        for m in items[self._shown:] if self.echo else []:
            # its own lines come back from the hub too (a member keeps what it said)
            if isinstance(m, Msg) and m.name != self.name:
                out.write(f"{m.name}: {m.content}\n")
        self._shown = len(items)
        out.write(f"{self.name} {self.prompt}")
        out.flush()
        src = self.stdin or sys.stdin
        try:
            ready, _, _ = select.select([src], [], [], self.timeout)
        except (ValueError, OSError):  # no real file (e.g. pytest's capture): read directly
            ready = [src]
        if not ready:
            out.write(f"\n(no answer within {self.timeout:g} s: skipped)\n")
            return None
        line = src.readline()
        return line.strip() or None
