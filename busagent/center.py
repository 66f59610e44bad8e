"""The task center: runs a hub's conversation step by step (ModelScope-Agent's ``TaskCenter``).

    center = TaskCenter("room")
    center.add_agents([writer, critic, human], roles=["writer", "critic", "user"])
    center.send_task_request("Write a haiku about Redis", send_to="writer")
    for event in center.step(round=3, deadline=30):
        print(event)                  # writer: <chunk> ... as the speakers produce them

Each round, the chosen speakers take their turn at once (distributed ones on their workers,
local ones on threads): each catches up on the hub and replies, their output streams back as
typed events in the order it arrives, and each finished reply is published to the hub. Who
speaks: ``allowed_roles=`` (ModelScope's: those roles speak, notified or not); else
``speakers=`` roles, a function of the candidates, or a moderator agent that names them; else
the members with messages addressed to them since their last turn (a turn drains that, so
nobody stays "notified" forever). Roles are matched whole, never as substrings, and a round in
which nobody can speak says why (a ``skipped`` event with no role). A speaker that misses the
step's deadline is skipped (a ``skipped`` event) and its late output is dropped, not published.
Every member's memory holds what it heard and what it said, in hub order (see
:meth:`busagent.hub.Hub.deliver`).
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

#: the name of a task sent with no ``send_from`` (ModelScope's ``USER_REQUIREMENT``)
TASK_FROM = "user_requirement"

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

    def send_task_request(self, task: Any, send_to: Any = "all", send_from: Any = None) -> str:
        """Publish a task to the hub; returns its seq. ``send_to``: everyone, roles, names or
        agents. ``send_from``: a member (its role, as in ModelScope, or its name, id or the
        agent), who then has the task in its memory as its own line and is not notified by it;
        or any other name, a sender from outside the hub. The default is from outside, named
        ``"user_requirement"`` as in ModelScope, so it never collides with a member (a
        ``Human`` is named ``"user"`` by default). Raises ConfigError for an unknown target."""
        _, me = self.hub.sender(send_from, self.hub.members())
        name = me.name if me is not None else (send_from or TASK_FROM)
        msg = task if isinstance(task, Msg) else Msg(str(name), task, role="user")
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
             allowed_roles: str | Sequence[str] | None = None,
             user_response: str | None = None, speakers: Speakers = None,
             deadline: float | None = _DEFAULT) -> Iterator[StepEvent]:
        """Run up to ``round`` rounds; yields the speakers' events as they arrive.

        Who speaks in a round: ``allowed_roles`` (a role or a list of roles, matched whole,
        never as substrings; ``[]`` is ModelScope's "not given") are the speakers, notified or
        not, as in ModelScope; else
        ``speakers``; else the members notified since their last turn. With both, ``speakers``
        picks and ``allowed_roles`` limits. A round in which nobody can speak yields one
        ``skipped`` event with no role whose data says why, and ends the step.

        ``task``: an extra message for this step's first speakers only (published to them
        from outside the hub), not to everyone. ``user_response``: the answer of a ``Human``
        member who speaks in this step (its first turn in it); given to a step in which no
        human speaks, it is dropped with a ``skipped`` event on the human's role saying so,
        never kept for a later turn. Raises ConfigError for a role no member has (or a
        watcher's: watchers never speak), or a ``user_response`` in a hub without a human.
        """
        limit = self.deadline if deadline is _DEFAULT else deadline
        allowed = self._allowed(allowed_roles)
        humans = self._humans() if user_response is not None else []
        if user_response is not None and not humans:
            raise ConfigError(f"step(user_response=...): hub {self.hub.name!r} has no Human "
                              "member of this process to give it to")
        answer = user_response
        for r in range(1, round + 1):
            chosen, why = self._choose(speakers, allowed)
            if not chosen:
                if task is not None:
                    why += "; the step's task was not published"
                yield StepEvent(round=r, role="", name="", type="skipped", data=why)
                break
            if task is not None:
                self.hub.publish(Msg(TASK_FROM, task, role="user") if not isinstance(task, Msg)
                                 else task, send_to=chosen)
                task = None
            speaking = {m.id for m in chosen}
            answers = {}
            if answer is not None and any(h.id in speaking for h in humans):
                answers = {h.id: answer for h in humans if h.id in speaking}
                answer = None
            yield from self._turn(r, chosen, send_to, limit, answers)
        if answer is not None:
            for h in humans:
                yield StepEvent(round=round, role=h.role, name=h.name, type="skipped",
                                data=f"user_response {answer!r} was not used: {h.role} did not "
                                "speak in this step (dropped, not kept for a later one)")

    # --- choosing ----------------------------------------------------------------------------

    def _humans(self) -> list[Member]:
        """The members that are humans of this process (they take ``user_response``)."""
        return [m for m in self.hub.members()
                if hasattr(self.hub.local.get(m.id), "take_answer")]

    def _allowed(self, allowed_roles: str | Sequence[str] | None) -> list[Member] | None:
        """The members ``allowed_roles`` names, checked before anything runs."""
        given: Any = allowed_roles  # checked here: callers pass anything
        if given is None:
            return None
        if isinstance(given, str):
            names: list[Any] = [given]
        elif isinstance(given, Iterable) and not isinstance(given, bytes | dict):
            names = list(given)
        else:
            names = [given]
        if not names:
            return None  # ModelScope's default ([]): no restriction, the notified speak
        if not all(isinstance(n, str) and n for n in names):
            raise ConfigError(f"allowed_roles {allowed_roles!r}: give a role or a list of roles")
        return _named(self.hub, names, self.hub.members(), "allowed_roles")

    def _choose(self, speakers: Speakers, allowed: list[Member] | None
                ) -> tuple[list[Member], str]:
        """This round's speakers, in the order they joined, or none and why."""
        everyone = self.hub.members()
        members = [m for m in everyone if not m.watcher]
        if speakers is None:
            if allowed is not None:
                ids = {m.id for m in members}
                # a member that left since the step began no longer speaks
                return [m for m in allowed if m.id in ids], "allowed_roles: none is a member now"
            chosen = self.notified(members)
            return chosen, ("nobody to speak: no member has messages addressed to it since "
                            "its last turn" if members else
                            f"nobody to speak: hub {self.hub.name!r} has no members")
        if isinstance(speakers, str):
            chosen = _named(self.hub, [speakers], everyone, "speakers")
            how = f"speakers {speakers!r}"
        elif hasattr(speakers, "agent_id"):  # a moderator agent names the speakers
            named = self._ask(speakers, members)
            chosen = _named(self.hub, named, everyone, None)
            how = f"the moderator named {named!r}, no speaking member's role or name"
        elif callable(speakers):
            named = list(speakers(self, members))
            chosen = _named(self.hub, named, everyone, None)
            how = f"speakers() named {named!r}, no speaking member's role or name"
        else:
            chosen = _named(self.hub, list(speakers), everyone, "speakers")
            how = f"speakers {speakers!r}"
        if allowed is not None:
            ok = {m.id for m in allowed}
            chosen = [m for m in chosen if m.id in ok]
            how = f"{how}: none of them in allowed_roles {sorted({m.role for m in allowed})}"
        return chosen, f"nobody to speak: {how}"

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

    def _turn(self, r: int, chosen: list[Member], send_to: Any, limit: float | None,
              answers: dict[str, str]) -> Iterator[StepEvent]:
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
                threading.Thread(target=_speak_local,
                                 args=(agent, m, self.hub, events, stop, answers.get(m.id)),
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
        # A Msg is published as it is (its id lets a speaker that kept its own reply in
        # memory recognise it when the hub gives it back).
        said = value if isinstance(value, Msg) else Msg(m.name, value, role="assistant")
        if said.content is None or said.content == "":
            return StepEvent(round=r, role=m.role, name=m.name, type="skipped",
                             data="nothing to say")
        try:
            seq = self.hub.publish(said, sent_from=m.id,
                                   send_to=None if send_to == "all" else send_to)
        except (NotSerializable, MessageTooLarge) as e:
            # One speaker's reply that cannot travel is that speaker's error; the others'
            # replies in the round are still published.
            return StepEvent(round=r, role=m.role, name=m.name, type="error",
                             data={"type": e.code, "message": str(e)})
        return StepEvent(round=r, role=m.role, name=m.name, type="end", data=said.content,
                         seq=seq)


def _named(hub: Hub, names: Iterable[Any], members: list[Member], what: str | None
           ) -> list[Member]:
    """The speaking members that ``names`` name (whole roles, else names, else agent ids), in
    the order they joined. ``what`` set (the caller's own list): an unknown name or a watcher's
    raises ConfigError; unset (a moderator's or a function's answer): they are left out."""
    out: dict[str, Member] = {}
    for n in names:
        n = str(n)
        found = ([m for m in members if m.role == n] or [m for m in members if m.name == n]
                 or [m for m in members if m.id == n])
        if what is not None and not found:
            raise ConfigError(f"{what}: hub {hub.name!r} has no role, name or member {n!r}; "
                              f"roles: {sorted({m.role for m in members if not m.watcher})}")
        if what is not None and any(m.watcher for m in found):
            raise ConfigError(f"{what}: {n} is a watcher of hub {hub.name!r}; watchers "
                              "observe and never speak")
        out.update((m.id, m) for m in found if not m.watcher)
    return [m for m in members if m.id in out]


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
                 stop: threading.Event, answer: str | None = None) -> None:
    """A local member's turn on a thread, as the same events a worker writes: catch up on the
    hub, then ``reply()`` from memory (what AgentScope's msghub does); a human given this
    step's ``answer`` says that instead."""
    em = Emitter("")

    def put(ev: Event) -> None:
        if not stop.is_set():
            events.put((m, ev))

    put(em.start(m.id, m.name))
    try:
        hub.deliver(agent, m)
        out = agent.take_answer(answer) if answer is not None else agent.reply()
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
