"""Hubs: named conversation spaces on the bus.

A hub is a Redis stream (``{p}:hub:{name}``): XADD gives every message its place in one order,
and the stream is the history. Members are recorded in ``{p}:hub:{name}:members``. Publishing is
one XADD plus a fire-and-forget notice to each addressed member, so it never waits on a slow
receiver (AgentScope's broadcast was one blocking call per member).

A member reads the hub where it lives (:func:`deliver`: its worker runs it for a ``deliver``
entry, the publishing process for a local member): from its :class:`Cursor` to the end, in
stream order, observing the messages addressed to it; the agent itself knows nothing of hubs.
Notices can arrive in any order or twice; the cursor makes that harmless, so every member sees
its messages in the hub's one order. A member that joins late reads the history
(``join(history=True)``); one rebuilt after a crash finds its cursor again in its restored
memory (each observed message carries its ``seq``).

    hub = Hub("room")
    hub.join(alice, role="writer"); hub.join(bob, role="critic"); hub.join(log, watcher=True)
    hub.publish(Msg("user", "hi"))                       # everyone
    hub.publish(Msg("user", "review"), send_to="critic")  # a role (or a name, or an agent)
    hub.publish(msg, routing=RoundRobin(role="critic"))   # a policy picks the receivers
    for m in hub.watch(): print(m.sent_from, m.msg.content)
"""

from __future__ import annotations

import json
import logging
import random as _random
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

from pydantic import BaseModel

from . import bus as _bus
from . import proxy
from .errors import BusagentError, ConfigError
from .message import Msg
from .protocol import pack, unpack
from .proxy import RemoteAgent

log = logging.getLogger("busagent.hub")

EVERYONE = "*"


class Member(BaseModel):
    id: str
    name: str
    role: str
    watcher: bool = False
    #: hub seq the member starts reading after ("0-0": the whole history)
    since: str = "0-0"
    joined: float = 0.0
    #: set once it has left: the last seq it still observes (what was published before
    #: :meth:`Hub.leave`)
    until: str | None = None


class HubMessage(BaseModel):
    """One message of a hub, as stored: ``seq`` is its stream id (its place in the one order),
    ``send_to`` the targets it was published to: ``"*"``, ``"role:<r>"``, ``"name:<n>"`` or agent
    ids."""

    hub: str
    seq: str
    sent_from: str
    sender: str = ""
    send_to: list[str]
    msg: Msg

    def to(self, member: Member) -> bool:
        """Whether this message is addressed to ``member`` (watchers see everything): what
        makes a member "notified". Never its own message, so nobody is asked to answer itself."""
        if member.watcher:
            return True
        if member.id == self.sender:
            return False
        return any(t == EVERYONE or t == member.id or t == f"role:{member.role}"
                   or t == f"name:{member.name}" for t in self.send_to)

    def kept_by(self, member: Member) -> bool:
        """Whether ``member`` observes this message: what it heard and what it said, so its
        memory holds the conversation as the hub has it, its own lines in their place."""
        return member.id == self.sender or self.to(member)


class Routing(Protocol):
    """A routing policy: picks the receivers of a message among the hub's members."""

    def __call__(self, hub: Hub, msg: Msg, members: list[Member], sender: str
                 ) -> list[str]: ...


class Broadcast:
    def __call__(self, hub: Hub, msg: Msg, members: list[Member], sender: str) -> list[str]:
        return [EVERYONE]


class Direct:
    """To the named roles, names, agent ids or agents."""

    def __init__(self, *targets: Any) -> None:
        self.targets = targets

    def __call__(self, hub: Hub, msg: Msg, members: list[Member], sender: str) -> list[str]:
        return hub.targets(list(self.targets), members)


def _candidates(members: list[Member], sender: str, role: str | None) -> list[Member]:
    return [m for m in members if not m.watcher and m.id != sender
            and (role is None or m.role == role)]


class RoundRobin:
    """One receiver at a time, in turn (among one role's members, or all). The turn is kept in
    Redis, so several publishers share one rotation."""

    def __init__(self, role: str | None = None) -> None:
        self.role = role

    def __call__(self, hub: Hub, msg: Msg, members: list[Member], sender: str) -> list[str]:
        cands = _candidates(members, sender, self.role)
        if not cands:
            raise ConfigError(f"hub {hub.name!r}: nobody to route to (role {self.role!r})")
        b = _bus.current()
        with b.errors():
            turn = int(b.redis.hincrby(b.keys.members(hub.name), f"~turn:{self.role or ''}", 1))
        return [cands[(turn - 1) % len(cands)].id]


class Random:
    """``k`` receivers drawn at random (among one role's members, or all)."""

    def __init__(self, k: int = 1, role: str | None = None, seed: int | None = None) -> None:
        self.k, self.role = k, role
        self.rng = _random.Random(seed)

    def __call__(self, hub: Hub, msg: Msg, members: list[Member], sender: str) -> list[str]:
        cands = _candidates(members, sender, self.role)
        if not cands:
            raise ConfigError(f"hub {hub.name!r}: nobody to route to (role {self.role!r})")
        return [m.id for m in self.rng.sample(cands, min(self.k, len(cands)))]


class Function:
    """A user function ``fn(msg, members) -> members, names, roles or ids``."""

    def __init__(self, fn: Callable[[Msg, list[Member]], Sequence[Any]]) -> None:
        self.fn = fn

    def __call__(self, hub: Hub, msg: Msg, members: list[Member], sender: str) -> list[str]:
        cands = _candidates(members, sender, None)
        return hub.targets(list(self.fn(msg, cands)), members)


def _left(member: str) -> str:
    """The members hash field that keeps a member that left until its worker caught up."""
    return f"~left:{member}"


def _id_of(agent: Any) -> str:
    agent_id = getattr(agent, "agent_id", None)
    if not isinstance(agent_id, str):
        raise ConfigError(f"{agent!r} is not an agent (no agent_id)")
    return agent_id


class Hub:
    """A named conversation space. Cheap to construct: all state is in Redis, so any process
    (or agent) can open the same hub by name."""

    def __init__(self, name: str) -> None:
        if not name or any(c in name for c in " :{}"):
            raise ConfigError(f"hub name {name!r}: use letters, digits, - and _")
        self.name = name
        #: agents of this process that are members: they are delivered to directly
        self.local: dict[str, Any] = {}

    # --- membership --------------------------------------------------------------------------

    def join(self, agent: Any, role: str | None = None, watcher: bool = False,
             history: bool = True) -> Member:
        """Add an agent (local or distributed) with a role (default: its name). ``history``:
        it catches up on the messages published before it joined; else it starts from now."""
        b = _bus.current()
        since = "0-0" if history else self.last_seq()
        m = Member(id=_id_of(agent), name=agent.name, role=role or agent.name, watcher=watcher,
                   since=since, joined=time.time())
        with b.errors():
            pipe = b.redis.pipeline(transaction=False)
            pipe.hset(b.keys.members(self.name), m.id, m.model_dump_json())
            pipe.hdel(b.keys.members(self.name), _left(m.id))
            pipe.execute()
        if not isinstance(agent, RemoteAgent):
            self.local[m.id] = agent
        if history:
            self._notify([m])
        return m

    def last_seq(self) -> str:
        """The seq of the newest message ("0-0" when there is none)."""
        b = _bus.current()
        with b.errors():
            last: Any = b.redis.xrevrange(b.keys.hub(self.name), count=1)
        return str(last[0][0].decode()) if last else "0-0"

    def leave(self, agent: Any) -> None:
        """Remove a member. It still observes what was published before the leave (the notices
        of those messages may not have reached its worker yet): a local member catches up here,
        a distributed one on its worker, which then forgets the member's last traces in the hub
        (a record kept until then as ``~left:<id>`` in the members hash). Not a member: no-op."""
        b = _bus.current()
        agent_id = _id_of(agent)
        key = b.keys.members(self.name)
        me = self.member(agent_id)
        self.local.pop(agent_id, None)
        if me is None:
            return
        gone = me.model_copy(update={"until": self.last_seq()})
        if not isinstance(agent, RemoteAgent):
            self.deliver(agent, gone)
            with b.errors():
                b.redis.hdel(key, agent_id, f"~cursor:{agent_id}")
            return
        with b.errors():
            pipe = b.redis.pipeline(transaction=True)
            pipe.hset(key, _left(agent_id), gone.model_dump_json())
            pipe.hdel(key, agent_id)
            pipe.execute()
        # Its worker catches up to ``until`` and then drops the record: that happens on the
        # notice of the last publish if that one is still on its way, else on this one.
        proxy.deliver([agent_id], self.name)

    def members(self) -> list[Member]:
        """In the order they joined, watchers included."""
        b = _bus.current()
        with b.errors():
            raw: Any = b.redis.hgetall(b.keys.members(self.name))
        ms = [Member.model_validate_json(v) for k, v in raw.items() if not k.startswith(b"~")]
        return sorted(ms, key=lambda m: (m.joined, m.id))

    def member(self, agent_id: str) -> Member | None:
        b = _bus.current()
        with b.errors():
            raw: Any = b.redis.hget(b.keys.members(self.name), agent_id)
        return None if raw is None else Member.model_validate_json(raw)

    def sender(self, sent_from: Any, members: list[Member]) -> tuple[str, Member | None]:
        """Who ``sent_from`` is: an agent, a Member, an agent id, a role (ModelScope's
        ``send_from``) or a name, tried in that order, as (the id to record, the member). A
        string that is none of them is a sender from outside the hub, recorded as it is.
        Raises ConfigError when it is a role several members share, or a watcher."""
        if sent_from is None:
            return "", None
        if isinstance(sent_from, Member):
            key = sent_from.id
        elif isinstance(sent_from, str):
            key = sent_from
        else:
            key = _id_of(sent_from)
        me = next((m for m in members if m.id == key), None)
        if me is None:
            by_role = [m for m in members if m.role == key]
            if len(by_role) > 1:
                raise ConfigError(f"hub {self.name!r}: sent_from {key!r} is the role of "
                                  f"{sorted(m.name for m in by_role)}; give one of them")
            me = by_role[0] if by_role else next((m for m in members if m.name == key), None)
        if me is not None and me.watcher:
            raise ConfigError(f"{me.name} is a watcher of hub {self.name!r}: watchers "
                              "see everything and never publish")
        return (me.id if me is not None else key), me

    def targets(self, send_to: list[Any], members: list[Member]) -> list[str]:
        """Targets for names, roles, agent ids or agents; an unknown one is an error (a message
        to nobody would be lost silently)."""
        out = []
        for t in send_to:
            if isinstance(t, Member):
                out.append(t.id)
            elif not isinstance(t, str):
                out.append(_id_of(t))
            elif t in ("all", EVERYONE):
                out.append(EVERYONE)
            elif any(m.role == t for m in members):
                out.append(f"role:{t}")
            elif any(m.name == t for m in members):
                out.append(f"name:{t}")
            elif any(m.id == t for m in members):
                out.append(t)
            else:
                raise ConfigError(f"hub {self.name!r} has no member, role or name {t!r}; "
                                  f"members: {sorted({m.role for m in members})}")
        return out

    # --- publishing --------------------------------------------------------------------------

    def publish(self, msg: Msg, send_to: Any = None, routing: Routing | None = None,
                sent_from: Any = None) -> str:
        """Append ``msg`` to the hub for ``send_to`` (None or "all": everyone; a role, name,
        agent, or a list of them) or for whom ``routing`` picks. Returns its seq. Watchers may
        not publish."""
        b = _bus.current()
        members = self.members()
        sender, _ = self.sender(sent_from, members)
        if routing is not None:
            to = routing(self, msg, members, sender)
        elif send_to is None:
            to = [EVERYONE]
        else:
            to = self.targets(list(send_to) if isinstance(send_to, list | tuple) else [send_to],
                              members)
        fields: Any = {"from": msg.name, "sender": sender, "to": json.dumps(to), "msg": pack(msg)}
        with b.errors():
            raw_seq: Any = b.redis.xadd(b.keys.hub(self.name), fields,
                                        maxlen=b.settings.hub_history, approximate=True)
        seq = raw_seq.decode() if isinstance(raw_seq, bytes) else str(raw_seq)
        probe = HubMessage(hub=self.name, seq=seq, sent_from=msg.name, sender=sender,
                           send_to=to, msg=msg)
        self._notify([m for m in members if probe.kept_by(m)])
        return seq

    def _notify(self, members: list[Member]) -> None:
        remote = []
        for m in members:
            local = self.local.get(m.id)
            if local is not None:
                self.deliver(local, m)
            else:
                remote.append(m.id)
        if remote:
            # Fire and forget: nobody waits on a notice, and one that arrives twice or out of
            # order is harmless (the member's cursor decides what it has not seen).
            proxy.deliver(remote, self.name)

    # --- reading -----------------------------------------------------------------------------

    def _decode(self, entry_id: bytes, f: dict[bytes, bytes]) -> HubMessage:
        return HubMessage(hub=self.name, seq=entry_id.decode(), sent_from=f[b"from"].decode(),
                          sender=f[b"sender"].decode(), send_to=json.loads(f[b"to"]),
                          msg=unpack(f[b"msg"]))

    def history(self, start: str = "-", count: int | None = None) -> list[HubMessage]:
        """Messages from ``start`` (a seq, inclusive) in their one order."""
        b = _bus.current()
        with b.errors():
            got: Any = b.redis.xrange(b.keys.hub(self.name), start, "+", count=count)
        return [self._decode(i, f) for i, f in got]

    def watch(self, start: str = "$", timeout: float | None = None, block_ms: int = 1000,
              stop: threading.Event | None = None) -> Iterator[HubMessage]:
        """Every message as it is published (``start="0"``: the history first). Ends when
        ``timeout`` seconds pass with nothing new, or once ``stop`` is set and it has caught
        up; runs until broken out of otherwise."""
        b = _bus.current()
        key = b.keys.hub(self.name)
        cursor = self.last_seq() if start == "$" else start
        idle = time.monotonic()
        while True:
            with b.errors():
                got: Any = b.redis.xread({key: cursor}, block=block_ms, count=500)
            if not got:
                if (timeout is not None and time.monotonic() - idle > timeout) or (
                        stop is not None and stop.is_set()):
                    return
                continue
            idle = time.monotonic()
            for entry_id, f in got[0][1]:
                cursor = entry_id.decode()
                yield self._decode(entry_id, f)

    def deliver(self, agent: Any, me: Member | None = None) -> int:
        """Have ``agent`` (an object of this process) observe the messages it has not seen that
        were addressed to it or sent by it, in the hub's order; returns how many (0 if it is
        not a member). A member that left observes up to its leave, then its traces in the hub
        are dropped. Runs where the agent lives: see :func:`deliver`."""
        cursor = Cursor.of(agent)
        with cursor.lock:
            if me is not None:
                return self._deliver(agent, cursor, me, None)
            return self._deliver(agent, cursor, *self._member_and_end(agent.agent_id))

    def _member_and_end(self, agent_id: str) -> tuple[Member | None, str]:
        """The member's record (or the one it left) and the hub's newest seq, read together in
        one round trip (MULTI): whatever is in the stream then was published while that record
        held, so a delivery that stops there never hands a member that left a message
        published after its leave."""
        b = _bus.current()
        with b.errors():
            pipe = b.redis.pipeline(transaction=True)
            pipe.hmget(b.keys.members(self.name), [agent_id, _left(agent_id)])
            pipe.xrevrange(b.keys.hub(self.name), count=1)
            (live, left), last = pipe.execute()
        got = live if live is not None else left
        me = None if got is None else Member.model_validate_json(got)
        return me, (last[0][0].decode() if last else "0-0")

    def _deliver(self, agent: Any, cursors: Cursor, me: Member | None, end: str | None) -> int:
        """Observe from the cursor up to ``end`` (the newest seq when the member record was
        read; None: all there is), and no further than the member's leave."""
        if me is None:
            return 0
        b = _bus.current()
        mark = f"~cursor:{me.id}"
        cursor = cursors.at.get(self.name) or _cursor_in_memory(agent, self.name)
        if cursor is None:  # a memory that was cleared: the last cursor it saved
            with b.errors():
                saved: Any = b.redis.hget(b.keys.members(self.name), mark)
            cursor = saved.decode() if saved else me.since
        cursor = max(cursor, me.since, key=seq_key)
        start = cursor
        n = 0
        kept: set[str] | None = None  # read once, at its first own line (before observing it)
        bounds = [x for x in (me.until, end) if x is not None]
        stop = min(bounds, key=seq_key) if bounds else None
        while stop is None or seq_key(cursor) < seq_key(stop):
            with b.errors():
                entries: Any = b.redis.xrange(b.keys.hub(self.name), f"({cursor}",
                                              stop or "+", count=500)
            if not entries:
                break
            for entry_id, f in entries:
                try:
                    hm = self._decode(entry_id, f)
                except BusagentError as e:
                    # A message this process cannot decode (a model whose module it did not
                    # load): failing here would fail every later delivery at the same message,
                    # and the member would observe nothing more. Skipped, and said so.
                    log.warning("hub %s: %s cannot observe message %s: %s", self.name,
                                me.name, entry_id.decode(), e)
                    cursor = entry_id.decode()
                    continue
                cursor = hm.seq
                if not hm.kept_by(me):
                    continue
                if hm.sender == me.id:
                    kept = _kept_itself(agent) if kept is None else kept
                    if hm.msg.id in kept:
                        # An agent that put its reply in its memory itself has it, but where
                        # it replied: before the lines of others published ahead of it.
                        _place_own_line(agent, hm.msg.id)
                        continue
                meta = {**(hm.msg.metadata or {}), "hub": self.name, "seq": hm.seq,
                        "sent_from": hm.sent_from, "send_to": hm.send_to}
                agent.observe(hm.msg.model_copy(update={"metadata": meta}))
                n += 1
        cursors.at[self.name] = cursor
        if me.until is not None:
            with b.errors():
                b.redis.hdel(b.keys.members(self.name), _left(me.id), mark)
        elif cursor != start:
            with b.errors():
                b.redis.hset(b.keys.members(self.name), mark, cursor)
        return n


def deliver(agent: Any, hub: str) -> int:
    """Have ``agent``, an object of this process, observe the messages of hub ``hub`` addressed
    to it that it has not seen, in the hub's order; returns how many. A worker runs it for a
    ``deliver`` entry (sent by :func:`busagent.proxy.deliver`); a publishing process runs
    :meth:`Hub.deliver` itself for its local members."""
    return Hub(hub).deliver(agent)


class Cursor:
    """Where one agent of this process has read each hub: ``at`` maps a hub name to the seq of
    the last message it has seen, and ``lock`` makes deliveries to it run one at a time (a
    local member can be delivered to by several publishing threads at once; on a worker its
    mailbox already runs one call at a time).

    One per agent id, kept outside the user's object and living as long as it: a rebuilt agent
    (same id, new object) starts again from its restored memory, and a deleted one leaves
    nothing behind."""

    def __init__(self, agent: Any) -> None:
        self.agent_id = _id_of(agent)
        self.lock = threading.Lock()
        self.at: dict[str, str] = {}
        self._agent = weakref.ref(agent)

    @classmethod
    def of(cls, agent: Any) -> Cursor:
        """The cursor of ``agent`` (made on first use)."""
        agent_id = _id_of(agent)
        c = _cursors.get(agent_id)
        if c is not None and c._agent() is agent:
            return c
        with _cursors_lock:
            c = _cursors.get(agent_id)
            if c is None or c._agent() is not agent:
                c = _cursors[agent_id] = cls(agent)
                # The finalizer holds the cursor until the agent is collected; the weak map
                # then forgets it.
                weakref.finalize(agent, _keep, c)
            return c


_cursors: weakref.WeakValueDictionary[str, Cursor] = weakref.WeakValueDictionary()
_cursors_lock = threading.Lock()


def _keep(cursor: Cursor) -> None:
    """The finalizer's callback: nothing to do, holding ``cursor`` was its job."""


def seq_key(seq: str) -> tuple[int, int]:
    """A hub seq (a stream id, ``"<ms>-<n>"``) as a sortable pair: seqs compare in hub order."""
    ms, _, n = seq.partition("-")
    return int(ms), int(n or 0)


#: how far back in a memory an agent's own reply is looked for (see :func:`_kept_itself`)
OWN_LINE_LOOKBACK = 256


def _kept_itself(agent: Any) -> set[str]:
    """The ids of the Msgs among the agent's latest ``OWN_LINE_LOOKBACK`` memory items that no
    hub gave it: where a reply it put in its memory itself is. The lines of others published in
    the same round can be observed between its reply and its own line's return, so the search
    is not cut at the last hub message; a reply further back than that is given again."""
    memory = getattr(agent, "memory", None)
    if memory is None:
        return set()
    return {item.id for item in memory.get(recent_n=OWN_LINE_LOOKBACK)
            if isinstance(item, Msg) and "seq" not in (item.metadata or {})}


def _place_own_line(agent: Any, msg_id: str) -> None:
    """Move the Msg ``msg_id`` that the agent put in its memory itself to the end of its memory
    now that its line is delivered: deliveries run in hub order, so the lines observed after
    it (of others, published before it, while it was replying) go back before it. Nothing
    changes when it is already last (the usual case); a move rewrites the memory through its
    public ``get``/``clear``/``add`` (one list rewrite in Redis at the commit, so it costs the
    memory's length, only for the agents that keep their own replies)."""
    memory = agent.memory
    items = memory.get()
    first = max(len(items) - OWN_LINE_LOOKBACK, 0)
    at = next((i for i in range(len(items) - 1, first - 1, -1)
               if isinstance(items[i], Msg) and items[i].id == msg_id), None)
    if at is None or at == len(items) - 1:
        return
    memory.clear()
    memory.add([*items[:at], *items[at + 1:], items[at]])


def _cursor_in_memory(agent: Any, hub: str) -> str | None:
    """The newest seq of this hub in the agent's memory: where a rebuilt agent resumes, so its
    cursor always agrees with the memory it got back."""
    memory = getattr(agent, "memory", None)
    if memory is None:
        return None
    for item in reversed(memory.get()):
        meta = getattr(item, "metadata", None)
        if isinstance(meta, dict) and meta.get("hub") == hub and isinstance(meta.get("seq"), str):
            return str(meta["seq"])
    return None
