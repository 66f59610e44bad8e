"""Agent classes for tests/test_state.py and tests/test_cancel.py (``--agents
tests.state_agents``)."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from typing import Any

import busagent
from busagent import Agent, Msg


class Counter(Agent):
    """Declares its state with ``state_attrs``; ``scratch`` is not declared."""

    state_attrs = ("inc", "seen")

    def __init__(self, name: str, inc: int = 2) -> None:
        super().__init__(name)
        self.inc = inc
        self.seen: list[Any] = []
        self.scratch = "from the constructor"

    def reply(self, x: Msg | None = None) -> int:
        self.seen.append(x.content if x else None)
        self.scratch = "changed by a call"
        return self.inc

    @busagent.remote
    def set_inc(self, inc: int) -> int:
        old, self.inc = self.inc, inc
        self.scratch = "changed by a call"
        return old

    @busagent.remote
    async def aset_inc(self, inc: int) -> int:
        await asyncio.sleep(0)
        old, self.inc = self.inc, inc
        return old

    @busagent.remote
    def hold(self, seconds: float) -> int:
        """Change the state, then take ``seconds`` (to be frozen or killed mid-call)."""
        self.inc += 1
        time.sleep(seconds)
        return self.inc

    @busagent.remote
    def set_bad(self) -> None:
        self.inc = threading.Lock()  # cannot be stored

    @busagent.remote
    def peek(self) -> dict[str, Any]:
        return {"inc": self.inc, "seen": self.seen, "scratch": self.scratch,
                "pid": os.getpid()}


class Registered(Agent):
    """Declares its state with ``register_state``: values memory's encoding keeps exact."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.notes: tuple[Any, ...] = ()
        self.last: Msg | None = None
        self.tags: set[str] = set()
        self.raw = b""
        self.register_state("notes", "last", "tags", "raw")

    def reply(self, x: Msg | None = None) -> int:
        self.notes = (*self.notes, x.content if x else None)
        self.last = x
        self.tags.add(f"t{len(self.notes)}")
        self.raw += b"\x00"
        return len(self.notes)

    @busagent.remote
    def peek(self) -> dict[str, Any]:
        # repr: the reply's own encoding would turn tuples and sets into lists
        return {"notes": repr(self.notes), "last": self.last.content if self.last else None,
                "tags": repr(sorted(self.tags)),
                "types": [type(v).__name__ for v in (self.notes, self.tags, self.raw)],
                "raw": self.raw, "pid": os.getpid()}


class Custom(Agent):
    """Overrides state_dict / load_state_dict (AgentScope 1.0's way)."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.total = 0
        self.built_with = "constructor"

    def state_dict(self) -> dict[str, Any]:
        return {"total": self.total}

    def load_state_dict(self, state: Any) -> None:
        self.total = state["total"]
        self.built_with = "load_state_dict"

    def reply(self, x: Msg | None = None) -> int:
        self.total += x.content if x else 1
        return self.total

    @busagent.remote
    def peek(self) -> dict[str, Any]:
        return {"total": self.total, "built_with": self.built_with, "pid": os.getpid()}


class Slow(Agent):
    """For cancellation: a sync reply that checks ``busagent.cancelled()``, one that ignores
    it, and an async one."""

    state_attrs = ("done",)

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.done: list[str] = []
        self.started = threading.Event()

    def reply(self, x: Msg | None = None) -> str:
        tag = x.content if x else ""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if busagent.cancelled():
                self.done.append(f"stopped {tag}")
                return "stopped early"
            time.sleep(0.01)
        self.done.append(f"finished {tag}")
        return "finished"

    @busagent.remote
    def ignoring(self, folder: str) -> str:
        """Runs until ``folder/release`` exists whether cancelled or not; it only reports (in
        ``folder/seen``) that its flag turned, so a test knows the cancel reached it."""
        seen, release = os.path.join(folder, "seen"), os.path.join(folder, "release")
        while not os.path.exists(release):
            if busagent.cancelled() and not os.path.exists(seen):
                open(seen, "w").close()
            time.sleep(0.01)
        self.done.append("ignoring finished")
        return "finished"

    @busagent.remote
    async def asleep(self, seconds: float) -> str:
        try:
            await asyncio.sleep(seconds)
        except asyncio.CancelledError:
            self.done.append("async cancelled")
            raise
        self.done.append("async finished")
        return "finished"

    @busagent.remote
    def quick(self, tag: str) -> str:
        self.done.append(tag)
        return tag

    @busagent.remote
    def history(self) -> list[str]:
        return self.done
