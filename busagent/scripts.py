"""busagent's six Lua scripts, one typed function each: the only code that knows their KEYS and
ARGV order (each ``.lua`` file beside this one documents the same order on top).

| script            | called by                 | does                                       |
|-------------------|---------------------------|--------------------------------------------|
| ``route.lua``     | :mod:`busagent.sender`    | routes calls to their agents' inboxes      |
| ``collect.lua``   | :mod:`busagent.replies`   | reads (or takes) many replies in one step  |
| ``commit.lua``    | the worker's group commit | reply + memory + state + XACK/XDEL, fenced |
| ``heartbeat.lua`` | the worker's heartbeat    | writes its record unless fenced            |
| ``move.lua``      | recovery                  | moves agents and their calls off a server  |
| ``name.lua``      | ``proxy.create`` (named)  | reserves a name and creates its agent      |

Every key a script touches is passed in KEYS where the caller can know it before the script runs
(a Redis rule, and what Redis Cluster will need). The remaining exceptions, the blockers for
Cluster, are keys only the script can find:

* ``route.lua``: the inbox ``{p}:inbox:{server}``: the server is read from the agent's record
  in the same atomic step (that is the point of routing in a script).
* ``move.lua``: the reply keys ``{p}:reply:{call}`` of dead-lettered calls: which calls reach
  ``max_deliveries`` is counted in the script, and calls that arrived after the snapshot are
  only seen there.

Beyond those, Cluster would also need every key of one script call in one hash slot.

Scripts are loaded once per connection (``SCRIPT LOAD``) and called by SHA; a Redis that
restarted empty answers NOSCRIPT, and the call loads them again and retries once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any, Protocol

import msgpack
import redis
import redis.asyncio as aredis

from .keys import GROUP, Keys
from .tuning import PEEK_BYTES

NAMES = ("route", "collect", "commit", "move", "heartbeat", "name")
LUA = {n: resources.files("busagent").joinpath(f"{n}.lua").read_text() for n in NAMES}


class Scripts:
    """The scripts' SHAs on one Redis, and running them with a reload on NOSCRIPT."""

    def __init__(self, r: redis.Redis) -> None:
        self.r = r
        self.sha: dict[str, str] = {}
        self.load()

    def load(self) -> None:
        self.sha = {n: str(self.r.script_load(src)) for n, src in LUA.items()}

    def run(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        try:
            return self.r.evalsha(self.sha[name], len(keys), *keys, *args)
        except redis.exceptions.NoScriptError:
            self.load()
            return self.r.evalsha(self.sha[name], len(keys), *keys, *args)

    async def arun(self, client: aredis.Redis, name: str, keys: Sequence[str],
                   args: Sequence[Any]) -> Any:
        try:
            return await client.evalsha(self.sha[name], len(keys), *keys, *args)
        except redis.exceptions.NoScriptError:
            self.load()
            return await client.evalsha(self.sha[name], len(keys), *keys, *args)


def _packed(obj: Any) -> bytes:
    # Lua's cmsgpack predates msgpack's bin type: bytes travel as raw strings.
    return msgpack.packb(obj, use_bin_type=False)  # type: ignore[no-any-return]


# --- route.lua ----------------------------------------------------------------------------------


def route(s: Scripts, keys: Keys, calls: Sequence[tuple[str, str, str]], *, kind: str,
          body: bytes, caller: str, version: int, reply_ttl: int, sent_ttl: int
          ) -> Callable[[Any], None]:
    """One routing script call for ``calls`` (``(call id, agent id, signature)``, one body), as
    a function that adds it to a client or a pipeline: the sender adds it, and adds it again
    after a NOSCRIPT. Returns nothing to wait for: the caller resolves the calls' replies."""
    ks = [keys.agents, keys.servers, *[keys.sent(c) for c, _, _ in calls],
          *[keys.reply(c) for c, _, _ in calls]]
    args = [keys.inbox_prefix, reply_ttl, sent_ttl, version, caller, kind, body,
            _packed([list(c) for c in calls])]
    n = len(ks)

    def add(client: Any) -> None:
        client.evalsha(s.sha["route"], n, *ks, *args)

    return add


# --- collect.lua --------------------------------------------------------------------------------


def collect(s: Scripts, reply_keys: Sequence[str], take: bool,
            budget: int = PEEK_BYTES) -> list[bytes | None]:
    """Each key's reply or None (not there, or past ``budget`` bytes of replies already in
    this answer: read it next time); ``take`` deletes what it read."""
    return [v or None for v in s.run("collect", reply_keys, [int(take), budget])]


async def acollect(s: Scripts, client: aredis.Redis, reply_keys: Sequence[str], take: bool,
                   budget: int = PEEK_BYTES) -> list[bytes | None]:
    """:func:`collect` on an asyncio client."""
    return [v or None
            for v in await s.arun(client, "collect", reply_keys, [int(take), budget])]


def sizes(s: Scripts, reply_keys: Sequence[str]) -> list[int]:
    """Each key's reply size in bytes (0 if it is not there), without sending any reply."""
    return [int(n) for n in s.run("collect", reply_keys, [2, 0])]


# --- commit.lua ---------------------------------------------------------------------------------


class Finished(Protocol):
    """A finished call as the worker's group commit hands it over."""

    entry_id: bytes
    call_id: str
    reply: bytes
    agent_id: str | None
    mem_cleared: bool
    mem_new: list[str] | None
    state: str | None
    drop: bool


def commit(s: Scripts, keys: Keys, inbox: str, reply_ttl: int, batch: Sequence[Finished]) -> int:
    """Commit ``batch`` atomically; returns how many were fenced (moved away meanwhile)."""
    ks = [inbox, keys.agents, keys.specs]
    index: dict[str, int] = {}

    def at(key: str) -> int:
        i = index.get(key)
        if i is None:
            ks.append(key)
            i = index[key] = len(ks)  # Lua counts from 1
        return i

    recs = []
    for d in batch:
        op = 2 if d.drop else 1 if d.mem_cleared else 0
        rk = at(keys.reply(d.call_id)) if d.call_id and d.reply else 0
        # Only a memory that changes is a key the script touches (most calls change none).
        changed = d.drop or d.mem_cleared or d.mem_new
        mk = at(keys.memory(d.agent_id)) if d.agent_id and changed else 0
        # The declared state: only when it changed (or the agent is dropped with it).
        sk = at(keys.state(d.agent_id)) if d.agent_id and (d.drop or d.state is not None) else 0
        rec: list[Any] = [d.entry_id, rk, d.reply, d.agent_id or "", mk, op, sk,
                          d.state or ""]
        if d.mem_new and not d.drop:
            rec.extend(d.mem_new)
        recs.append(rec)
    return int(s.run("commit", ks, [GROUP, reply_ttl, _packed(recs)]))


# --- heartbeat.lua ------------------------------------------------------------------------------


def heartbeat(s: Scripts, keys: Keys, name: str, record_json: str,
              adopt: bool = False) -> tuple[bool, float]:
    """Write a server's record (JSON without ``heartbeat``: the script stamps it with Redis's
    ``TIME``); returns (False if it was fenced, i.e. declared dead by others, the Redis time in
    epoch seconds). ``adopt`` writes even over a dead record (a new owner of the name)."""
    ok, now = s.run("heartbeat", [keys.servers], [name, record_json, "1" if adopt else "0"])
    return bool(ok), float(now)


# --- name.lua -----------------------------------------------------------------------------------


def create_named(s: Scripts, keys: Keys, namespace: str, name: str, agent_id: str, record: str,
                 spec: bytes, inbox: str, owner: str | None,
                 fields: dict[str, Any]) -> tuple[str, str] | None:
    """Reserve ``name`` in ``namespace`` and create the agent (record, spec, owned set, create
    entry on ``inbox``) atomically. None if created; else ``(agent id, record JSON)`` of the
    agent that holds the name."""
    flat: list[Any] = []
    for k, v in fields.items():
        flat += [k, v]
    got = s.run("name", [keys.names(namespace), keys.agents, keys.specs, inbox,
                         keys.owned(owner or "-")],
                [name, agent_id, record, spec, owner or "", *flat])
    if int(got[0]) == 1:
        return None
    return _text(got[1]), _text(got[2])


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


# --- move.lua -----------------------------------------------------------------------------------


@dataclass
class Move:
    """One agent to move: where, its new record, and the entries waiting for it."""

    agent_id: str
    server: str
    record_json: str
    #: the restore entry's fields (``Entry.fields()``), queued unless a create waits.
    restore: dict[str, Any]
    entry_ids: list[bytes]


def move(s: Scripts, keys: Keys, server: str, last: bytes, batch: Sequence[Move], *,
         reply_ttl: int, max_deliveries: int, deadletter_max: int,
         restarts: dict[bytes, bytes] | None = None) -> tuple[int, int]:
    """Move ``batch`` off ``server`` (its entries up to ``last`` listed, later ones found by the
    script); returns (calls moved, calls dead-lettered). ``restarts``: entry id -> deaths of
    workers restarted under ``server``'s name while holding it (``{p}:restarts:{server}``),
    added to the entry's ``tries``."""
    ks = [keys.agents, keys.inbox(server), keys.deadletter]
    index: dict[str, int] = {}
    recs = []
    for m in batch:
        inbox = keys.inbox(m.server)
        if inbox not in index:
            ks.append(inbox)
            index[inbox] = len(ks)
        flat: list[Any] = []
        for k, v in m.restore.items():
            flat += [k, str(v) if isinstance(v, int) else v]
        recs.append([m.agent_id, index[inbox], m.record_json, flat, m.entry_ids])
    moved, dead = s.run("move", ks, [GROUP, keys.reply_prefix, reply_ttl, max_deliveries,
                                     deadletter_max, server, last, _packed(recs),
                                     _packed({k: int(v) for k, v in (restarts or {}).items()})])
    return int(moved), int(dead)
