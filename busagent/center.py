"""The task center: runs a hub's conversation step by step (ModelScope-Agent's ``TaskCenter``).

    center = TaskCenter("room")
    center.add_agents([writer, critic, human], roles=["writer", "critic", "user"])
    center.send_task_request("Write a haiku about Redis", send_to="writer")
    for event in center.step(round=3, deadline=30):
        print(event)                  # writer: <chunk> ... as the speakers produce them

Each round, the chosen speakers take their turn at once (distributed ones on their workers,
local ones on threads): each catches up on the hub and replies, their output streams back as
typed events in the order it arrives, and each finished reply is published to the hub. Who
speaks: by default the members with messages addressed to them since their last turn (a turn
drains that, so nobody stays "notified" forever); or ``speakers=`` roles, a function of the
candidates, or a moderator agent that names them. A speaker that misses the step's deadline
is skipped (an ``skipped`` event) and its late output is dropped, not published.
"""

from __future__ import annotations

import asyncio
import inspect
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Literal

from pydantic import BaseModel

from .errors import BusagentError, CallTimeout, ConfigError, MessageTooLarge, NotSerializable
from .hub import Hub, Member, seq_key
from .message import Msg
from .placeholder import Placeholder
from .proxy import deliver
from .stream import Emitter, Event, follow, joined

#: ``step(deadline=)`` left out: the center's own deadline (None means no deadline)
_DEFAULT: Any = object()

StepType = Literal["start", "chunk", "end", "error", "skipped"]


class StepEvent(BaseModel):
    """What a speaker did: ``start``, ``chunk`` (a piece of its reply), ``end`` (its whole
    reply, now published to the hub as ``seq``), ``error`` or ``skipped`` (missed the deadline
    or had nothing to say)."""

    round: int
    role: str
    name: str
    type: StepType
    data: Any = None
    seq: str | None = None

    def __str__(self) -> str:
        if self.type == "chunk":
            return f"{self.role}: {self.data}"
        return f"[{self.role} {self.type}{': ' + str(self.data) if self.data else ''}]"


Speakers = (str | Sequence[str] | Callable[["TaskCenter", list[Member]], Iterable[str]] | Any)


class TaskCenter:
    def __init__(self, hub: Hub | str, deadline: float | None = 120.0) -> None:
        self.hub = hub if isinstance(hub, Hub) else Hub(hub)
        self.deadline = deadline
        #: agent id -> the hub seq up to which it has had its turn
        self.turns: dict[str, str] = {}

    def add_agents(self, agents: Sequence[Any], roles: Sequence[str] | None = None,
                   watcher: bool = False) -> list[Member]:
        if roles is not None and len(roles) != len(agents):
            raise ConfigError("add_agents: give one role per agent")
        return [self.hub.join(a, role=roles[i] if roles else None, watcher=watcher)
                for i, a in enumerate(agents)]

    def send_task_request(self, task: Any, send_to: Any = "all", send_from: str = "user") -> str:
        """Publish a task to the hub (``send_to``: everyone, roles, names or agents)."""
        msg = task if isinstance(task, Msg) else Msg(send_from, task, role="user")
        return self.hub.publish(msg, send_to=None if send_to == "all" else send_to,
                                sent_from=send_from)

    def notified(self, members: list[Member] | None = None) -> list[Member]:
        """Members (of ``members``, default: all but watchers) with messages addressed to them
        since their last turn."""
        if members is None:
            members = [m for m in self.hub.members() if not m.watcher]
        if not members:
            return []
        oldest = min((self.turns.get(m.id, m.since) for m in members), key=seq_key)
        pending = self.hub.history(f"({oldest}" if oldest != "0-0" else "-")
        return [m for m in members
                if any(h.to(m) and seq_key(h.seq) > seq_key(self.turns.get(m.id, m.since))
                       for h in pending)]

    def step(self, task: Any = None, round: int = 1, send_to: Any = "all",
             allowed_roles: Sequence[str] | None = None, user_response: str | None = None,
             speakers: Speakers = None, deadline: float | None = _DEFAULT,
             ) -> Iterator[StepEvent]:
        """Run up to ``round`` rounds; yields the speakers' events as they arrive. Stops early
        when nobody is left to speak."""
        limit = self.deadline if deadline is _DEFAULT else deadline
        if task is not None:
            self.send_task_request(task)
        if user_response is not None:
            for a in self.hub.local.values():
                if hasattr(a, "respond"):
                    a.respond(user_response)
        for r in range(1, round + 1):
            chosen = self._choose(speakers)
            if allowed_roles is not None:
                chosen = [m for m in chosen if m.role in allowed_roles]
            if not chosen:
                return
            yield from self._turn(r, chosen, send_to, limit)

    # --- choosing ----------------------------------------------------------------------------

    def _choose(self, speakers: Speakers) -> list[Member]:
        members = [m for m in self.hub.members() if not m.watcher]
        if speakers is None:
            return self.notified(members)
        if isinstance(speakers, str):
            names: Iterable[str] = [speakers]
        elif hasattr(speakers, "agent_id"):  # a moderator agent names the speakers
            names = self._ask(speakers, members)
        elif callable(speakers):
            names = speakers(self, members)
        else:
            names = speakers
        wanted = set(names)
        return [m for m in members if m.role in wanted or m.name in wanted or m.id in wanted]

    def _ask(self, moderator: Any, members: list[Member]) -> list[str]:
        recent = [f"{h.sent_from}: {h.msg.content}" for h in self.hub.history()[-20:]]
        question = Msg("task_center", {"candidates": sorted({m.role for m in members}),
                                       "history": recent}, role="user")
        answer = moderator(question)
        if isinstance(answer, Placeholder):
            answer = answer.result()
        content = answer.content if isinstance(answer, Msg) else answer
        if isinstance(content, str):
            return [c.strip() for c in content.replace(";", ",").split(",") if c.strip()]
        return [str(c) for c in content or []]

    # --- one round ---------------------------------------------------------------------------

    def _turn(self, r: int, chosen: list[Member], send_to: Any, limit: float | None
              ) -> Iterator[StepEvent]:
        upto = self.hub.last_seq()
        events: queue.Queue[tuple[Member, Event]] = queue.Queue()
        stop = threading.Event()
        distributed: list[Member] = []
        for m in chosen:
            self.turns[m.id] = upto  # drained now, whatever comes of the turn
            agent = self.hub.local.get(m.id)
            if agent is None:
                distributed.append(m)
            else:
                threading.Thread(target=_speak_local, args=(agent, m, self.hub, events, stop),
                                 daemon=True).start()
        # Distributed speakers take their turn on their workers (a ``deliver`` entry with
        # ``speak``), and their output streams back as events.
        turns = deliver([m.id for m in distributed], self.hub.name, speak=True)
        remote = {p.call_id: m for p, m in zip(turns, distributed, strict=True)}
        if remote:
            threading.Thread(target=_follow, args=(remote, events, limit, stop),
                             daemon=True).start()
        end = None if limit is None else time.monotonic() + limit
        pieces: dict[str, list[Any]] = {m.id: [] for m in chosen}
        open_ = {m.id: m for m in chosen}
        try:
            while open_:
                try:
                    wait = None if end is None else max(0.0, end - time.monotonic())
                    m, ev = events.get(timeout=wait)
                except queue.Empty:
                    break
                if m.id not in open_:
                    continue
                if ev.type == "chunk":
                    pieces[m.id].append(ev.data)
                    yield StepEvent(round=r, role=m.role, name=m.name, type="chunk", data=ev.data)
                elif ev.type == "start":
                    yield StepEvent(round=r, role=m.role, name=m.name, type="start")
                else:
                    del open_[m.id]
                    yield self._finish(r, m, ev, pieces[m.id], send_to)
        finally:
            stop.set()
        for m in open_.values():
            yield StepEvent(round=r, role=m.role, name=m.name, type="skipped",
                            data=f"no reply within {limit} s")

    def _finish(self, r: int, m: Member, ev: Event, pieces: list[Any], send_to: Any
                ) -> StepEvent:
        if ev.type == "error":
            return StepEvent(round=r, role=m.role, name=m.name, type="error", data=ev.data)
        # A reply that did not stream arrives as one chunk holding the whole value.
        value = pieces[0] if len(pieces) == 1 else joined(pieces)
        if isinstance(value, Msg):
            value = value.content
        if value is None or value == "":
            return StepEvent(round=r, role=m.role, name=m.name, type="skipped",
                             data="nothing to say")
        try:
            seq = self.hub.publish(Msg(m.name, value, role="assistant"), sent_from=m.id,
                                   send_to=None if send_to == "all" else send_to)
        except (NotSerializable, MessageTooLarge) as e:
            # One speaker's reply that cannot travel is that speaker's error; the others'
            # replies in the round are still published.
            return StepEvent(round=r, role=m.role, name=m.name, type="error",
                             data={"type": e.code, "message": str(e)})
        return StepEvent(round=r, role=m.role, name=m.name, type="end", data=value, seq=seq)


def _follow(remote: dict[str, Member], events: queue.Queue[tuple[Member, Event]],
            limit: float | None, stop: threading.Event) -> None:
    try:
        for ev in follow(list(remote), timeout=limit, block_ms=200):
            if stop.is_set():
                return
            events.put((remote[ev.call], ev))
    except CallTimeout:
        return  # the step's own deadline reports who was skipped
    except BusagentError as e:
        for call, m in remote.items():
            events.put((m, Event(call=call, seq=-1, type="error",
                                 data={"type": e.code, "message": str(e)})))


def _speak_local(agent: Any, m: Member, hub: Hub, events: queue.Queue[tuple[Member, Event]],
                 stop: threading.Event) -> None:
    """A local member's turn on a thread, as the same events a worker writes: catch up on the
    hub, then ``reply()`` from memory (what AgentScope's msghub does)."""
    em = Emitter("")

    def put(ev: Event) -> None:
        if not stop.is_set():
            events.put((m, ev))

    put(em.start(m.id, m.name))
    try:
        hub.deliver(agent, m)
        out = agent.reply()
        if inspect.isgenerator(out):
            for piece in out:
                put(em.chunk(piece))
        elif inspect.isasyncgen(out) or inspect.isawaitable(out):
            for piece in asyncio.run(_drain(out)):
                put(em.chunk(piece))
        else:
            put(em.chunk(out))
    except Exception as e:  # noqa: BLE001  (reported to the step, like a remote error)
        put(em.error(e))
        return
    put(em.end())


async def _drain(out: Any) -> list[Any]:
    if inspect.isasyncgen(out):
        return [piece async for piece in out]
    return [await out]
