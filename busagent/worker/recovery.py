"""Moving agents off a server that died (or is draining), with their memory and waiting calls.

Any live worker runs this for a server whose heartbeat stopped; one at a time per dead server
(a lock). It marks the server dead first, which fences it: a frozen worker that wakes up finds
itself dead at its next heartbeat and stops, and its commits of calls that were moved are
refused (see commit.lua). Then, in batches, move.lua re-points each agent's record at a live
server that loaded its module, queues a restore there and moves the agent's waiting calls.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import redis

from busagent import records, replies, scripts
from busagent.bus import Bus
from busagent.errors import DeadLettered, UnknownAgent
from busagent.keys import GROUP
from busagent.protocol import Entry, Reply, deadletter
from busagent.records import AgentInfo, ServerInfo, pick, read_servers
from busagent.tuning import MOVE_BATCH, RECOVERY_LOCK_MS

log = logging.getLogger("busagent.recovery")



@dataclass
class Result:
    moved_agents: int = 0
    moved_calls: int = 0
    deadlettered: int = 0
    stranded: int = 0


def agents_of(b: Bus, server: str) -> list[AgentInfo]:
    return records.agents_of(b.redis, b.keys.agents, server)


def needs_recovery(b: Bus, info: ServerInfo) -> bool:
    """Dead by :meth:`ServerInfo.state` (the Redis clock) with agents or calls left to move."""
    if info.state(b.settings.dead_after) != "dead":
        return False
    return info.status != "dead" or info.agents > 0 or b.redis.xlen(b.keys.inbox(info.name)) > 0


def lock(b: Bus, server: str, owner: str) -> bool:
    return bool(b.redis.set(b.keys.lock(server), owner, nx=True, px=RECOVERY_LOCK_MS))


def unlock(b: Bus, server: str, owner: str) -> None:
    key = b.keys.lock(server)
    if b.redis.get(key) == owner.encode():
        b.redis.delete(key)


def mark_dead(b: Bus, server: str) -> ServerInfo | None:
    raw = b.redis.hget(b.keys.servers, server)
    if raw is None:
        return None
    info = ServerInfo.model_validate_json(raw)
    info.status = "dead"
    b.redis.hset(b.keys.servers, server, info.model_dump_json())
    return info


def recover(b: Bus, server: str, owner: str, exclude: set[str] | None = None) -> Result | None:
    """Move ``server``'s agents and waiting calls to live servers. None if someone else is on it."""
    if not lock(b, server, owner):
        return None
    try:
        # Decided from a snapshot: under the lock, look again. A worker restarted under this
        # name registers under the same lock, and must not be taken apart as its predecessor.
        info = records.read_server(b.redis, b.keys.servers, server)
        if (info is not None and server not in (exclude or set())
                and not needs_recovery(b, info)):
            return None
        return _recover(b, server, exclude or set())
    finally:
        unlock(b, server, owner)


def _recover(b: Bus, server: str, exclude: set[str]) -> Result:
    k = b.keys
    s = b.settings
    info = mark_dead(b, server)
    inbox = k.inbox(server)
    res = Result()
    agents = agents_of(b, server)

    # A snapshot of the waiting calls, grouped by agent; the script also takes what arrives later.
    by_agent: dict[str, list[bytes]] = defaultdict(list)
    control: list[tuple[bytes, dict[bytes, bytes]]] = []
    last = b"0-0"
    for entry_id, fields in entries(b, inbox):
        last = entry_id
        agent = Entry.agent_of(fields)
        if agent:
            by_agent[agent].append(entry_id)
        else:
            control.append((entry_id, fields))
    answer(b, inbox, control, UnknownAgent(f"server {server} died before answering"), server)

    # Deaths of workers restarted under this name, counted per entry (count_restart).
    restarts: dict[bytes, bytes] = b.redis.hgetall(k.restarts(server))  # type: ignore[assignment]
    live = [x for x in read_servers(b.redis, k.servers) if x.alive(s.dead_after)
            and x.name != server
            and x.name not in exclude]
    batch: list[scripts.Move] = []
    for a in agents:
        # Never onto another program's private child workers (they stop when it exits).
        target = pick([x for x in live if x.serves(a.owner)], a.cls.split(":")[0])
        if target is None:
            res.stranded += 1
            continue
        record = a.model_copy(update={"server": target.name}).model_dump_json()
        restore = Entry.new(s.secret, "restore", b"", agent=a.id, caller="recovery")
        batch.append(scripts.Move(a.id, target.name, record, restore.fields(),
                                  by_agent.get(a.id, [])))
        if len(batch) == MOVE_BATCH:
            _move(b, server, inbox, last, batch, res, restarts)
            batch = []
    if batch:
        _move(b, server, inbox, last, batch, res, restarts)

    # Calls left for agents nobody has any more: answer them.
    leftover = []
    for entry_id, fields in entries(b, inbox):
        agent = Entry.agent_of(fields)
        if not agent or b.redis.hexists(k.agents, agent):
            continue
        leftover.append((entry_id, fields))
    answer(b, inbox, leftover, UnknownAgent(
        "the agent's server died and the agent is no longer registered"), server)

    if info is not None:
        info.agents = res.stranded
        b.redis.hset(k.servers, server, info.model_dump_json())
    if res.stranded == 0 and b.redis.xlen(inbox) == 0:
        b.redis.delete(inbox, k.restarts(server))
    log.warning("recovered %s: %d agents and %d calls moved, %d dead-lettered, %d stranded",
                server, res.moved_agents, res.moved_calls, res.deadlettered, res.stranded)
    return res


def _move(b: Bus, server: str, inbox: str, last: bytes, batch: list[scripts.Move],
          res: Result, restarts: dict[bytes, bytes]) -> None:
    s = b.settings
    moved, dead = scripts.move(b.scripts, b.keys, server, last, batch, reply_ttl=s.reply_ttl,
                               max_deliveries=s.max_deliveries, deadletter_max=s.deadletter_max,
                               restarts=restarts)
    res.moved_agents += len(batch)
    res.moved_calls += int(moved)
    res.deadlettered += int(dead)


def entries(b: Bus, inbox: str) -> list[tuple[bytes, dict[bytes, bytes]]]:
    out: list[tuple[bytes, dict[bytes, bytes]]] = []
    start = "-"
    while True:
        page: Any = b.redis.xrange(inbox, start, "+", count=1000)
        out.extend(page)
        if len(page) < 1000:
            return out
        start = "(" + page[-1][0].decode()


def answer(b: Bus, inbox: str, waiting: list[tuple[bytes, dict[bytes, bytes]]],
           err: Exception, server: str) -> None:
    """Answer waiting calls with ``err`` and remove them from the inbox."""
    if not waiting:
        return
    reply = Reply.fail(err, server=server)
    pipe = b.redis.pipeline(transaction=True)
    for entry_id, fields in waiting:
        call = Entry.reply_to(fields)  # "" for entries nobody waits on (a restore, a wake)
        if call:
            replies.write(b, pipe, call, reply)
        pipe.xack(inbox, GROUP, entry_id)
        pipe.xdel(inbox, entry_id)
    try:
        pipe.execute()
    except redis.exceptions.RedisError as e:
        log.warning("could not answer calls left on %s: %s", server, e)


def count_restart(b: Bus, server: str) -> int:
    """A worker starting under ``server``'s name after one died: the entries its predecessor
    read and never answered (its pending list) were each delivered to a worker that died. Count
    that death per entry in ``{p}:restarts:{server}``, on top of the deaths recovery counted
    when it moved the entry (its ``tries``); one that reaches ``max_deliveries`` is
    dead-lettered (its caller gets DeadLettered) instead of run again. So a poison call does
    not kill a supervisor-restarted worker forever. Returns how many were dead-lettered.

    Entries read but not yet started count too (a worker reads many at once): the count is of
    deaths while holding the entry, as recovery's is. Called under the name's recovery lock."""
    k, s, r = b.keys, b.settings, b.redis
    inbox, counts_key = k.inbox(server), k.restarts(server)
    pending: list[Any] = []
    start = "-"
    while True:  # paged: a worker can die holding many
        page: Any = r.xpending_range(inbox, GROUP, start, "+", 1000, consumername=server)
        pending.extend(page)
        if len(page) < 1000:
            break
        start = "(" + page[-1]["message_id"].decode()
    if not pending:
        r.delete(counts_key)
        return 0
    counts: Any = r.hgetall(counts_key)
    keep: dict[bytes, int] = {}
    dead: list[tuple[bytes, dict[bytes, bytes], int]] = []
    read = r.pipeline(transaction=False)
    for p in pending:
        read.xrange(inbox, p["message_id"], p["message_id"])
    for p, got in zip(pending, read.execute(), strict=True):
        entry_id = p["message_id"]
        if not got:
            continue  # answered and deleted meanwhile
        fields = got[0][1]
        deaths = int(counts.get(entry_id, 0)) + 1
        tries = int(fields.get(b"tries", b"0") or 0) + deaths
        if tries >= s.max_deliveries:
            dead.append((entry_id, fields, tries))
        else:
            keep[entry_id] = deaths
    pipe = r.pipeline(transaction=True)
    pipe.delete(counts_key)  # entries answered since the last restart drop out here
    if keep:
        pipe.hset(counts_key, mapping=keep)  # type: ignore[arg-type]
    for entry_id, fields, tries in dead:
        reason = f"delivered {tries} times; each worker died (last: {server}, restarted)"
        pipe.xadd(k.deadletter, deadletter(fields, reason, server, tries),  # type: ignore[arg-type]
                  maxlen=s.deadletter_max, approximate=True)
        call = Entry.reply_to(fields)
        if call:
            replies.write(b, pipe, call, Reply.fail(DeadLettered(
                f"the call was delivered {tries} times and its worker died each time; it is in "
                "the dead-letter stream (`busagent deadletter`)"), server=server))
        pipe.xack(inbox, GROUP, entry_id)
        pipe.xdel(inbox, entry_id)
    pipe.execute()
    if dead:
        log.warning("%s: %d calls dead-lettered at restart (they killed every worker that "
                    "ran them)", server, len(dead))
    return len(dead)
