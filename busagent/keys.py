"""Every Redis key busagent uses, in one place.

The README's "Redis key layout" section documents the same table for redis-cli users; change both
together. All keys start with the configurable prefix (default ``busagent``).

| key                               | type   | what                                               |
|-----------------------------------|--------|----------------------------------------------------|
| ``{p}:servers``                   | hash   | server name -> JSON ServerInfo (heartbeat, cpu...) |
| ``{p}:agents``                    | hash   | agent id -> JSON AgentInfo (class, name, server)   |
| ``{p}:inbox:{server}``            | stream | calls for the agents one server hosts              |
| ``{p}:reply:{call}``              | list   | one msgpack Reply; expires after ``reply_ttl``     |
| ``{p}:sent:{call}``               | string | marks a routed call for 30 s (sends are retried)   |
| ``{p}:memory:{agent}``            | list   | the agent's memory, one JSON Msg per element       |
| ``{p}:state:{agent}``             | string | the agent's declared state (JSON, last call)       |
| ``{p}:specs``                     | hash   | agent id -> msgpack constructor call (to rebuild)  |
| ``{p}:deadletter``                | stream | calls given up on, with the reason (capped)        |
| ``{p}:lock:{server}``             | string | held by whoever moves a dead server's agents       |
| ``{p}:restarts:{server}``         | hash   | entry id -> deaths under this name holding it      |
| ``{p}:ready:{server}``            | list   | a token pushed once when a worker is serving       |
| ``{p}:models``                    | hash   | config_name -> JSON model config, for every worker |
| ``{p}:models:{server}``           | hash   | config_name -> JSON model config, one server's     |
| ``{p}:hub:{hub}``                 | stream | a hub's messages in their one order (its history)  |
| ``{p}:hub:{hub}:members``         | hash   | agent id -> JSON Member (name, role, watcher)      |
| ``{p}:chunks:{call}``             | stream | a streamed reply's events; expires like replies    |
| ``{p}:logs:{server}``             | stream | a worker's recent log lines (capped)               |
| ``{p}:names:{namespace}``         | hash   | registered name -> agent id, unique per namespace  |
| ``{p}:programs``                  | hash   | program id -> JSON ProgramInfo (namespace, pid...) |
| ``{p}:program:{program}``         | string | "alive": expires (server-side TTL) unless renewed  |
| ``{p}:owned:{program}``           | set    | ids of the agents a program owns (not detached)    |
| ``{p}:lock:program:{program}``    | string | held by the worker sweeping a dead program         |
"""

from __future__ import annotations

from dataclasses import dataclass

GROUP = "workers"
"""The consumer group every inbox stream is read with."""


@dataclass(frozen=True)
class Keys:
    prefix: str = "busagent"

    @property
    def servers(self) -> str:
        return f"{self.prefix}:servers"

    @property
    def agents(self) -> str:
        return f"{self.prefix}:agents"

    @property
    def inbox_prefix(self) -> str:
        """What the routing script prepends to a server name to find its inbox."""
        return f"{self.prefix}:inbox:"

    def inbox(self, server: str) -> str:
        return f"{self.inbox_prefix}{server}"

    @property
    def reply_prefix(self) -> str:
        return f"{self.prefix}:reply:"

    def reply(self, call_id: str) -> str:
        return f"{self.reply_prefix}{call_id}"

    @property
    def sent_prefix(self) -> str:
        return f"{self.prefix}:sent:"

    def sent(self, call_id: str) -> str:
        return f"{self.sent_prefix}{call_id}"

    @property
    def memory_prefix(self) -> str:
        return f"{self.prefix}:memory:"

    def memory(self, agent_id: str) -> str:
        return f"{self.memory_prefix}{agent_id}"

    def state(self, agent_id: str) -> str:
        """String: the agent's declared state (``Agent.state_dict``) as one JSON object,
        written with its memory by every committed call that changed it."""
        return f"{self.prefix}:state:{agent_id}"

    def ready(self, server: str) -> str:
        return f"{self.prefix}:ready:{server}"

    @property
    def specs(self) -> str:
        return f"{self.prefix}:specs"

    @property
    def deadletter(self) -> str:
        return f"{self.prefix}:deadletter"

    def lock(self, server: str) -> str:
        return f"{self.prefix}:lock:{server}"

    def restarts(self, server: str) -> str:
        """Hash: inbox entry id -> how many times a worker under this name died holding it
        (counted when one restarts under the name), so poison calls are counted there too."""
        return f"{self.prefix}:restarts:{server}"

    def models(self, server: str | None = None) -> str:
        return f"{self.prefix}:models:{server}" if server else f"{self.prefix}:models"

    def hub(self, name: str) -> str:
        return f"{self.prefix}:hub:{name}"

    def members(self, hub: str) -> str:
        return f"{self.prefix}:hub:{hub}:members"

    def chunks(self, call_id: str) -> str:
        return f"{self.prefix}:chunks:{call_id}"

    def logs(self, server: str) -> str:
        return f"{self.prefix}:logs:{server}"

    def names(self, namespace: str) -> str:
        """Hash: registered name -> agent id, for one namespace."""
        return f"{self.prefix}:names:{namespace}"

    @property
    def names_pattern(self) -> str:
        return f"{self.prefix}:names:*"

    @property
    def programs(self) -> str:
        """Hash: program id -> JSON :class:`~busagent.records.ProgramInfo`."""
        return f"{self.prefix}:programs"

    def program(self, program: str) -> str:
        """A program's liveness: exists while the program heart-beats (a Redis TTL, so expiry
        is judged by Redis's clock, not any host's)."""
        return f"{self.prefix}:program:{program}"

    def owned(self, program: str) -> str:
        """Set: the ids of the agents ``program`` owns (deleted when it exits or dies)."""
        return f"{self.prefix}:owned:{program}"

    def program_lock(self, program: str) -> str:
        return f"{self.prefix}:lock:program:{program}"

    @property
    def hub_pattern(self) -> str:
        """A SCAN pattern matching every hub stream (and, to be filtered out, member hashes)."""
        return f"{self.prefix}:hub:*"
