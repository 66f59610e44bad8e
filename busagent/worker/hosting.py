"""The agents a worker hosts: building, rebuilding, creating and deleting them.

Agents are built only from classes in the modules the worker loaded (``--agents``), never by
importing on a caller's word. Registry records and specs are written by the creating caller;
the committer removes them with a deleted agent's reply.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from types import ModuleType
from typing import Any

import redis

from busagent.agent import Agent, assigning_id
from busagent.bus import Bus
from busagent.classpath import lookup
from busagent.errors import (
    BusagentError,
    ConstructorError,
    PlacementError,
    ProtocolError,
    UnknownAgent,
    UnknownClass,
)
from busagent.keys import Keys
from busagent.memory import Memory, from_json
from busagent.protocol import CreateBatch, CreateBody, safe_text
from busagent.records import AgentInfo
from busagent.tuning import FAILED_CREATES

from .jobs import Done, Job, Replies, silent, user_traceback

log = logging.getLogger("busagent.worker")


class Hosting:
    """The agents of server ``server``, at most ``capacity`` of them, built from the classes of
    ``loaded`` (module name -> module)."""

    def __init__(self, bus: Bus, server: str, capacity: int, loaded: dict[str, ModuleType],
                 replies: Replies) -> None:
        self.r = bus.redis
        self.keys = bus.keys
        self.server = server
        self.capacity = capacity
        self.loaded = loaded
        self.replies = replies
        self.agents: dict[str, Agent] = {}
        #: constructor errors by agent id (the last FAILED_CREATES), so calls that queued behind
        #: a failed create say why.
        self.failed: dict[str, str] = {}

    def agent(self, agent_id: str) -> Agent:
        """The hosted agent; UnknownAgent (saying why, if its create failed) if there is none."""
        agent = self.agents.get(agent_id)
        if agent is None:
            why = self.failed.get(agent_id)
            raise UnknownAgent(
                f"agent {agent_id} could not be built: {why}" if why else
                f"agent {agent_id} is not hosted by server {self.server} (deleted, or the "
                "server restarted); create it again"
            )
        return agent

    # --- building ----------------------------------------------------------------------------

    def resolve(self, path: str) -> type[Agent]:
        """The Agent subclass named ``module:qualname`` in a loaded module (UnknownClass)."""
        found, obj = lookup(path, self.loaded)
        module = path.partition(":")[0]
        if not found:
            raise UnknownClass(
                f"server {self.server} did not load module {module!r} (it loaded "
                f"{sorted(self.loaded)}); start a worker with --agents {module}"
            )
        if not (isinstance(obj, type) and issubclass(obj, Agent)):
            raise UnknownClass(f"{path} is not an Agent subclass in module {module!r}")
        return obj

    def build(self, agent_id: str, body: CreateBody) -> Agent:
        """Construct the agent under its id (the constructor's own errors propagate)."""
        cls = self.resolve(body.cls)
        token = assigning_id.set(agent_id)
        try:
            agent = cls(*body.args, **body.kwargs)
        finally:
            assigning_id.reset(token)
        agent.agent_id = agent_id
        return agent

    def restore(self, agent_id: str) -> Agent:
        """Rebuild an agent from its stored spec, with its memory and declared state as stored
        in Redis (the constructor rebuilds every other attribute)."""
        pipe = self.r.pipeline(transaction=False)  # one round trip for spec, memory and state
        pipe.hget(self.keys.specs, agent_id)
        pipe.lrange(self.keys.memory(agent_id), 0, -1)
        pipe.get(self.keys.state(agent_id))
        spec, items, state = pipe.execute()
        if spec is None:
            raise UnknownAgent(f"agent {agent_id} has no stored spec to rebuild it from")
        agent = self.build(agent_id, CreateBody.unpack(spec))
        agent.memory = Memory(from_json(x) for x in items)  # already saved: nothing to rewrite
        if state is not None:
            agent.load_state_dict(from_json(state))
            agent._state_saved = state.decode()
        return agent

    def rebuild(self, records: Iterable[AgentInfo]) -> None:
        """Restore the agents of a previous worker under this name (failures are remembered
        and logged: one bad agent must not stop the rest)."""
        for info in records:
            try:
                self.agents[info.id] = self.restore(info.id)
            except Exception as e:  # noqa: BLE001
                self._remember_failure(info.id, e)
                log.warning("could not rebuild agent %s: %s", info.id, e)
        if self.agents:
            log.warning("rebuilt %d agents of the previous %s", len(self.agents), self.server)

    def _check_room(self) -> None:
        if len(self.agents) >= self.capacity:
            raise PlacementError(f"server {self.server} is full ({self.capacity} agents); "
                                 "raise its --capacity (BUSAGENT_CAPACITY) or start another")

    def _remember_failure(self, agent_id: str, err: BaseException) -> str:
        """Keep why ``agent_id`` could not be built (the last FAILED_CREATES); the reason."""
        why = self.failed[agent_id] = f"{type(err).__name__}: {safe_text(err)}"
        if len(self.failed) > FAILED_CREATES:
            self.failed.pop(next(iter(self.failed)))
        return why

    # --- create and delete (kinds create and control) ----------------------------------------

    def restore_entry(self, job: Job) -> Done:
        """A ``restore`` entry: an agent moved here by recovery, rebuilt from its spec and stored
        memory. Nobody waits on it; a failure is logged and remembered for its calls."""
        e = job.entry
        try:
            self._check_room()
            if e.agent not in self.agents:  # (a retried move may queue it twice)
                self.agents[e.agent] = self.restore(e.agent)
        except Exception as err:  # noqa: BLE001 - its calls say why (UnknownAgent)
            self._remember_failure(e.agent, err)
            log.warning("could not rebuild agent %s: %s", e.agent, err)
        return silent(job.entry_id)

    def create(self, job: Job) -> Done:
        """A ``create`` entry: build one agent. Replies ``{agent_id, server}``; a failed
        constructor replies ConstructorError and drops the agent's record."""
        e = job.entry
        try:
            self._check_room()
            if e.agent in self.agents:  # a create sent twice (a retried send): same agent
                return self.replies.done(job, self.agents[e.agent],
                                         {"agent_id": e.agent, "server": self.server})
            body = CreateBody.unpack(e.body)
            agent = self.build(e.agent, body)
            if body.memory:
                agent.memory = Memory(from_json(x) for x in body.memory)
                agent.memory._saved = 0  # persist the carried-over memory with this reply
            if body.state is not None:  # to_dist(): the local agent's declared state
                agent.load_state_dict(from_json(body.state))
        except Exception as err:  # noqa: BLE001 - the constructor's error goes to the caller
            self._remember_failure(e.agent, err)
            if not isinstance(err, BusagentError):  # the constructor itself raised
                why = f"{type(err).__name__}: {safe_text(err)}"
                reply = self.replies.error(ConstructorError(why), user_traceback(err))
            else:
                reply = self.replies.error(err)
            return Done(job.entry_id, e.call, reply, e.agent, drop=True)
        self.agents[e.agent] = agent
        return self.replies.done(job, agent, {"agent_id": e.agent, "server": self.server})

    def create_many(self, job: Job) -> Done:
        """``busagent.create_many``: build a chunk of agents from one entry. An agent whose
        record no longer names this server (recovery moved the chunk's agents while the entry
        waited) is left to the server that has it, so none is built twice. Replies
        ``{server, created, failed: {agent id: reason}}``."""
        e = job.entry
        ids = CreateBatch.unpack(e.body).agents
        pipe = self.r.pipeline(transaction=False)
        pipe.hmget(self.keys.agents, ids)
        pipe.hmget(self.keys.specs, ids)
        records, specs = pipe.execute()
        failed: dict[str, str] = {}
        built = 0
        for agent_id, rec, spec in zip(ids, records, specs, strict=True):
            if agent_id in self.agents or rec is None or spec is None:
                continue
            if AgentInfo.model_validate_json(rec).server != self.server:
                continue
            try:
                self._check_room()
                self.agents[agent_id] = self.build(agent_id, CreateBody.unpack(spec))
                built += 1
            except Exception as err:  # noqa: BLE001 - reported per agent to the caller
                failed[agent_id] = self._remember_failure(agent_id, err)
        if failed:
            pipe = self.r.pipeline(transaction=False)
            forget(pipe, self.keys, list(failed))
            pipe.execute()
        return Done(job.entry_id, e.call, self.replies.ok(
            {"server": self.server, "created": built, "failed": failed}))

    def delete(self, job: Job) -> Done:
        """Drop the entry's agent; replies whether it was here. The committer removes its
        memory, record and spec with the reply."""
        e = job.entry
        if not e.agent:
            raise ProtocolError("delete needs an agent id")
        found = self.agents.pop(e.agent, None) is not None
        self.failed.pop(e.agent, None)
        # Its hub traces now (the committer's script drops memory, record and spec with the
        # reply, and touches no key it is not given).
        pipe = self.r.pipeline(transaction=False)
        forget(pipe, self.keys, [e.agent], member_hashes(self.r, self.keys))
        pipe.execute()
        return Done(job.entry_id, e.call, self.replies.ok(found), e.agent, drop=True)

    def delete_all(self) -> int:
        """Drop every agent with its memory, record and spec; how many there were."""
        ids = list(self.agents)
        self.agents.clear()
        hubs = member_hashes(self.r, self.keys)
        pipe = self.r.pipeline(transaction=True)
        forget(pipe, self.keys, ids, hubs)
        pipe.execute()
        return len(ids)

    def listing(self) -> list[dict[str, Any]]:
        """``{agent_id, name, cls, memory_size}`` per hosted agent."""
        return [
            {"agent_id": a.agent_id, "name": a.name,
             "cls": f"{type(a).__module__}:{type(a).__qualname__}",
             "memory_size": a.memory.size()}
            for a in list(self.agents.values())
        ]


def forget(pipe: Any, keys: Keys, ids: list[str], hubs: Sequence[str] = ()) -> None:
    """Queue on ``pipe`` the removal of agents' records, specs, memory and state, and of their
    fields in the hub member hashes ``hubs`` (:func:`member_hashes`): membership, cursor,
    leave record, so a deleted agent is no role a publish can still name."""
    for i in range(0, len(ids), 1000):
        chunk = ids[i : i + 1000]
        pipe.hdel(keys.agents, *chunk)
        pipe.hdel(keys.specs, *chunk)
        pipe.delete(*[keys.memory(a) for a in chunk], *[keys.state(a) for a in chunk])
        fields = [f for a in chunk for f in (a, f"~cursor:{a}", f"~left:{a}")]
        for h in hubs:
            pipe.hdel(h, *fields)


def member_hashes(r: Any, keys: Keys) -> list[str]:
    """Every hub's member hash, for :func:`forget`. A SCAN over the hub keys: deleting agents
    costs that (rare, administrative); the call path pays nothing, as an index of memberships
    per agent would make every join and leave pay."""
    suffix = keys.members("")[len(keys.hub("")):]  # ":members"
    try:
        found = [k.decode() if isinstance(k, bytes) else str(k)
                 for k in r.scan_iter(match=keys.hub_pattern, count=1000)]
    except redis.exceptions.NoPermissionError as e:
        # The least-privilege ACL (README) grants no SCAN, which lists other prefixes' keys
        # too: the delete goes on, its hub traces stay, and the worker says so.
        log.warning("hub memberships of deleted agents stay: %s (grant +scan to remove them)",
                    e)
        return []
    return sorted({k for k in found if k.endswith(suffix)})
