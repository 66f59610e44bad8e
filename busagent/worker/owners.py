"""The sweep of owned agents whose program is gone (:mod:`busagent.programs`).

Every worker runs it every ``SWEEP_PROGRAMS_EVERY`` heartbeats: for each program in
``{p}:programs`` whose liveness key ``{p}:program:{id}`` no longer exists (the program ended and
deleted it, or stopped renewing it and Redis expired it: Redis's clock, never a host's), one
worker at a time (``{p}:lock:program:{id}``) deletes its owned agents, whatever worker hosts
them, in batches:

* an agent whose record is gone (deleted by hand, its child worker stopped) is dropped from the
  owned set;
* an agent on a live server gets a ``delete`` control entry in that server's inbox, so it is
  deleted after the calls already queued for it, and the hosting worker drops the instance, its
  memory, record and spec (as ``ServerClient.delete_agent`` does, without a reply: nobody
  waits); it leaves the owned set at a later round, once its record is gone;
* an agent on a dead server (nobody reads that inbox) has its record, spec and memory removed
  here; recovery then has nothing of it to move.

A round that found nothing left removes the program's entry. What a round missed (a worker
that died holding a delete entry: recovery answers control entries, it does not move them) is
sent again at the next round after the lock expires, so the sweep converges.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict

from busagent import records
from busagent.bus import Bus
from busagent.protocol import ControlBody
from busagent.records import AgentInfo
from busagent.tuning import PROGRAM_TTL_BEATS, SWEEP_BATCH, SWEEP_PROGRAMS_EVERY

from .hosting import forget

log = logging.getLogger("busagent.worker")


#: program id -> when this worker first found its liveness key missing (monotonic seconds).
_missing: dict[str, float] = {}


def sweep(b: Bus, me: str) -> int:
    """Delete the owned agents of programs that are gone; how many deletions were started.
    Raises redis-py's errors (the heartbeat loop logs them and tries again)."""
    r, k = b.redis, b.keys
    programs = [p.decode() if isinstance(p, bytes) else str(p) for p in r.hkeys(k.programs)]
    if not programs:
        return 0
    ttl = b.settings.heartbeat * PROGRAM_TTL_BEATS
    if records.redis_uptime(r) < 2 * ttl:
        # Redis restarted a moment ago: program keys whose TTL ran out while it was down
        # say nothing of their programs, which renew them as soon as they reconnect.
        _missing.clear()
        return 0
    pipe = r.pipeline(transaction=False)
    for p in programs:
        pipe.exists(k.program(p))
    alive = pipe.execute()
    # A key missing once is not enough: a program whose renewals Redis refused for a moment
    # (out of memory, a dropped connection) renews it again. Gone for a whole TTL more: gone.
    now = time.monotonic()
    for gone in set(_missing) - set(programs):  # swept meanwhile, by this worker or another
        del _missing[gone]
    for p, up in zip(programs, alive, strict=True):
        if up:
            _missing.pop(p, None)
        else:
            _missing.setdefault(p, now)
    alive = [up or now - _missing[p] < ttl for p, up in zip(programs, alive, strict=True)]
    # Held for two sweep periods: long enough that two workers do not send the same deletes,
    # short enough that one that died mid-sweep is taken over soon.
    hold = int(b.settings.heartbeat * SWEEP_PROGRAMS_EVERY * 2 * 1000)
    started = 0
    for p, up in zip(programs, alive, strict=True):
        if up or not r.set(k.program_lock(p), me, nx=True, px=hold):
            continue
        started += _sweep_one(b, p)
    return started


def _sweep_one(b: Bus, program: str) -> int:
    r, k = b.redis, b.keys
    owned = k.owned(program)
    raw_ids = r.srandmember(owned, SWEEP_BATCH)
    ids = [x.decode() if isinstance(x, bytes) else str(x) for x in (raw_ids or [])]
    if not ids:
        pipe = r.pipeline(transaction=True)
        pipe.hdel(k.programs, program)
        pipe.delete(owned, k.program_lock(program))
        pipe.execute()
        return 0
    servers = {s.name: s for s in records.read_servers(r, k.servers)}
    done: list[str] = []
    by_server: dict[str, list[str]] = defaultdict(list)
    for agent_id, raw in zip(ids, r.hmget(k.agents, ids), strict=True):
        info = None if raw is None else AgentInfo.model_validate_json(raw)
        if info is None or info.owner != program:
            done.append(agent_id)
        else:
            by_server[info.server].append(agent_id)
    pipe = r.pipeline(transaction=False)
    if done:
        pipe.srem(owned, *done)
    started = 0
    for server, agent_ids in by_server.items():
        s = servers.get(server)
        if s is None or s.state(b.settings.dead_after) == "dead":
            forget(pipe, k, agent_ids)
            pipe.srem(owned, *agent_ids)
        else:
            for agent_id in agent_ids:
                fields = b.sender.entry("control", ControlBody(op="delete", agent=agent_id).pack(),
                                        agent=agent_id).fields()
                pipe.xadd(k.inbox(server), fields)  # type: ignore[arg-type]
        started += len(agent_ids)
    pipe.execute()
    if started:
        log.info("deleting %d agents of program %s, which is gone", started, program)
    return started


__all__ = ["sweep"]
