"""``RemoteAgent``: the caller's handle on an agent that lives on a worker."""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from typing import Any

from . import admin, callchain, placement, programs, scripts, tracing
from . import bus as _bus
from .agent import Agent, DistConf, is_remote
from .classpath import class_path, find
from .errors import (
    ConfigError,
    ConstructorError,
    NameTaken,
    NotSerializable,
    SkipStatement,
    UnknownClass,
)
from .memory import from_json, to_json
from .placeholder import Placeholder
from .protocol import (
    EXT_AGENT,
    CallBody,
    CreateBatch,
    CreateBody,
    DeliverBody,
    Kind,
    check_size,
    class_name,
)
from .records import AgentInfo


class RemoteAgent:
    """Calls return placeholders at once and run on the agent's worker one at a time, in order.

    ``agent(x)`` calls ``reply``; methods marked ``@busagent.remote`` are called the same way;
    ``observe(x)`` returns a placeholder too (so a broadcast never blocks).
    """

    def __init__(self, agent_id: str, name: str, cls: type, server: str,
                 created: Placeholder | None = None) -> None:
        self.agent_id = agent_id
        self.name = name
        self.cls = cls
        self.server = server
        self._created = created

    def __busagent_wire__(self) -> tuple[int, Any]:
        """A handle travels as a reference to the agent (:data:`protocol.EXT_AGENT`): its id,
        name, class and server, never the agent."""
        return EXT_AGENT, [self.agent_id, self.name, class_name(self.cls), self.server]

    @classmethod
    def from_wire(cls, agent_id: str, name: str, cls_path: str, server: str) -> RemoteAgent:
        """A handle received in a value. Its class is looked up among the modules imported
        here (never imported on a sender's word); if it is not there the handle still calls
        ``reply`` and ``observe`` (which every agent has), and refuses ``@remote`` methods,
        which it cannot check, saying which module to import."""
        _, agent_cls = find(cls_path)
        if not isinstance(agent_cls, type):
            agent_cls = _unloaded(cls_path)
        return cls(agent_id, name, agent_cls, server)

    @classmethod
    def by_id(cls, agent_id: str) -> RemoteAgent:
        """The proxy of a registered agent, from its record (``{p}:agents``): its name, server
        and class. The class must already be imported in this process (a class path read from
        Redis is never imported). Raises UnknownAgent if the agent is not registered,
        UnknownClass if its class is not imported here."""
        info = admin.agent_info(agent_id)
        module = info.cls.partition(":")[0]
        _, agent_cls = find(info.cls)
        if not isinstance(agent_cls, type):
            raise UnknownClass(f"agent {agent_id} is a {info.cls}, which this process has not "
                               f"imported; import {module} first")
        return cls(agent_id, info.name, agent_cls, info.server)

    def _call(self, kind: Kind, args: tuple[Any, ...], kwargs: dict[str, Any],
              method: str | None = None, stream: bool = False) -> Placeholder:
        b = _bus.current()
        chain = callchain.current()
        callchain.refuse(chain, [(self.agent_id, self.name)])
        timeout = b.settings.call_timeout
        call_id = _bus.new_id()
        body = CallBody(args=list(args), kwargs=kwargs, method=method, stream=stream,
                        timeout=timeout,
                        trace=tracing.route(self.agent_id, call_id, self.name)
                        if tracing.on() else None,
                        chain=list(chain))
        try:
            data = body.pack()
        except NotSerializable as e:
            raise NotSerializable(f"arguments to {self.name}.{method or kind}: {e}") from None
        check_size(data, b.settings.max_message_bytes, f"a call to {self.name}")
        p = Placeholder(call_id, self.agent_id)
        b.sender.route(self.agent_id, p.call_id, kind, data, p._fail)
        return p

    def __call__(self, *args: Any, **kwargs: Any) -> Placeholder:
        return self._call("call", args, kwargs)

    def reply(self, *args: Any, **kwargs: Any) -> Placeholder:
        return self._call("call", args, kwargs)

    def observe(self, x: Any) -> Placeholder:
        return self._call("observe", (x,), {})

    def stream(self, *args: Any, **kwargs: Any) -> Placeholder:
        """Call ``reply`` with its output as stream events (``placeholder.stream()``), whether
        or not ``reply`` is a generator."""
        return self._call("call", args, kwargs, stream=True)

    def call_method(self, name: str, *args: Any, stream: bool = False, **kwargs: Any
                    ) -> Placeholder:
        """Call a ``@busagent.remote`` method by name (``stream=True``: as stream events)."""
        if not is_remote(self.cls, name):
            raise AttributeError(f"{self.cls.__name__}.{name} is not marked @busagent.remote")
        return self._call("method", args, kwargs, method=name, stream=stream)

    def __getattr__(self, name: str) -> Any:
        if "cls" not in self.__dict__:
            # Not built yet (pickle looks up __setstate__ on an empty instance): plain Python.
            raise AttributeError(name)
        unloaded = self.cls.__dict__.get("_busagent_unloaded")
        if unloaded and not name.startswith("_"):
            # The stand-in knows no methods: say why, not "mark it", which it may well be.
            raise AttributeError(
                f"{self.cls.__name__}.{name}: the agent's class {unloaded} is not imported in "
                "this process, so its @busagent.remote methods are unknown here; import its "
                "module first (reply and observe work without it)")
        if name.startswith("_") or not is_remote(self.cls, name):
            raise AttributeError(
                f"{self.cls.__name__}.{name} is not callable remotely; mark it with "
                "@busagent.remote to call it through the proxy"
            )

        def method(*args: Any, **kwargs: Any) -> Placeholder:
            return self._call("method", args, kwargs, method=name)

        method.__name__ = name
        return method

    def ready(self, timeout: float | None = 60.0) -> RemoteAgent:
        """Wait until the worker has built the agent; raises its constructor's error if any."""
        if self._created is not None:
            got = self._created.result(timeout)
            failed = got.get("failed") if isinstance(got, dict) else None
            if failed and self.agent_id in failed:  # one agent of a bulk creation
                raise ConstructorError(f"{failed[self.agent_id]} (server {self.server!r})")
        return self

    @property
    def memory(self) -> RemoteMemory:
        return RemoteMemory(self.agent_id)

    def delete(self, timeout: float | None = 30.0) -> bool:
        return admin.ServerClient(self.server).delete_agent(self.agent_id, timeout)

    def __repr__(self) -> str:
        return (f"RemoteAgent({self.cls.__name__}, name={self.name!r}, "
                f"agent_id={self.agent_id!r}, server={self.server!r})")


def _unloaded(path: str) -> type:
    """A stand-in class for a handle whose agent class is not imported in this process."""
    module, _, qual = path.partition(":")
    return type(qual.rpartition(".")[2] or "Agent", (Agent,),
                {"__module__": module, "_busagent_unloaded": path})


class RemoteMemory:
    """A read-only view of a distributed agent's memory, as of its last completed call."""

    def __init__(self, agent_id: str) -> None:
        self.agent_id = agent_id

    def get(self, recent_n: int | None = None) -> list[Any]:
        b = _bus.current()
        start = 0 if recent_n is None else -recent_n
        if recent_n == 0:
            return []
        with b.errors():
            items: Any = b.redis.lrange(b.keys.memory(self.agent_id), start, -1)
        return [from_json(x) for x in items]

    def size(self) -> int:
        b = _bus.current()
        with b.errors():
            return int(b.redis.llen(b.keys.memory(self.agent_id)))


def fanout(agents: Sequence[RemoteAgent | str], *args: Any, **kwargs: Any) -> list[Placeholder]:
    """Call ``reply`` on every agent (a proxy, or an agent id: routing reads the agent's record,
    so an id is enough) with the same arguments; the placeholders, in order.

    The same as ``[a(*args, **kwargs) for a in agents]`` but the arguments are encoded once and
    a thousand calls travel in one routing step: what a shard fanning a round out to 10,000
    participants should use. Raises NotSerializable or MessageTooLarge for the arguments; an
    unknown agent id fails its own placeholder with UnknownAgent."""
    b = _bus.current()
    chain = callchain.current()
    if chain:  # from inside an agent's call: none of the targets may be up its chain
        callchain.refuse(chain, [(a, a) if isinstance(a, str) else (a.agent_id, a.name)
                                 for a in agents])
    timeout = b.settings.call_timeout
    body = CallBody(args=list(args), kwargs=kwargs, timeout=timeout,
                    trace=tracing.route("fanout", "", f"fanout to {len(agents)}")
                    if tracing.on() else None,
                    chain=list(chain))
    try:
        data = body.pack()
    except NotSerializable as e:
        raise NotSerializable(f"arguments to fanout: {e}") from None
    check_size(data, b.settings.max_message_bytes, "a fan-out call")
    ps = {_bus.new_id(): a if isinstance(a, str) else a.agent_id for a in agents}
    placeholders = {c: Placeholder(c, a) for c, a in ps.items()}

    def failed(call_ids: list[str], err: BaseException) -> None:
        for c in call_ids:
            placeholders[c]._fail(err)

    b.sender.route_many(list(ps), list(ps.values()), "call", data, failed)
    return list(placeholders.values())


def deliver(agent_ids: Sequence[str], hub: str, speak: bool = False) -> list[Placeholder]:
    """Have each agent observe the messages of ``hub`` addressed to it that it has not seen
    (kind ``deliver``, run by the agent's worker with :func:`busagent.hub.deliver`); with
    ``speak`` each then takes a turn, ``reply()`` from memory, whose output is written as
    stream events (``busagent.stream.follow``). Returns one placeholder per agent, in order, at
    once: the count observed, or the turn's reply. Addressed by id (the record routes it), so
    no proxy or class is needed; a thousand agents cost one routing step."""
    b = _bus.current()
    data = DeliverBody(hub=hub, speak=speak).pack()
    calls = {_bus.new_id(): a for a in agent_ids}
    placeholders = {c: Placeholder(c, a) for c, a in calls.items()}

    def failed(call_ids: list[str], err: BaseException) -> None:
        for c in call_ids:
            placeholders[c]._fail(err)

    b.sender.route_many(list(calls), list(calls.values()), "deliver", data, failed)
    return list(placeholders.values())


def _spec(b: _bus.Bus, cls: type, path: str, args: tuple[Any, ...], kwargs: dict[str, Any],
          memory: list[Any] | None = None, state: str | None = None) -> tuple[str, bytes]:
    """(name, encoded constructor call) of one agent."""
    name = args[0] if args else kwargs.get("name", cls.__name__)
    if not isinstance(name, str):
        raise ConfigError(f"an agent's name must be a string, not {name!r}")
    # In memory's own encoding (exact: a tuple stays a tuple); NotSerializable names the item.
    stored = [to_json(x, f"memory item {i}") for i, x in enumerate(memory or ())]
    try:
        body = CreateBody(cls=path, name=name, args=list(args), kwargs=kwargs,
                          memory=stored, state=state).pack()
    except NotSerializable as e:
        raise NotSerializable(
            f"constructor arguments of {cls.__name__}: {e}; pass data and build objects in "
            "__init__ on the worker"
        ) from None
    check_size(body, b.settings.max_message_bytes,
               f"the constructor arguments of {cls.__name__}")
    return name, body


def create_many(cls: type, items: Iterable[Any], to_dist: Any = True,
                chunk: int = 1000) -> list[RemoteAgent]:
    """Create many agents of one class in bulk; returns their proxies at once, in order.

    Each item is an agent's constructor arguments: a name, a tuple of positional arguments, a
    dict of keyword arguments, or ``(args, kwargs)``. Agents are placed ``chunk`` at a time
    (each chunk on the least loaded server) and each chunk travels as one entry, so creating a
    million agents costs a thousand messages. Every agent still has its own record and stored
    constructor call, so it is recovered like any other. ``agent.ready()`` raises its own
    constructor's error, if it had one."""
    if _bus.loading_script.get():
        raise SkipStatement("creating distributed agents while a worker loads a script")
    b = _bus.current()
    conf = DistConf.of(to_dist)
    if conf.name is not None:
        raise ConfigError("create_many: DistConf(name=...) names one agent; create named "
                          "agents one at a time")
    namespace = conf.namespace or b.namespace
    owner = None if conf.lifetime == "detached" else b.owner.ensure()
    path, load = class_path(cls)
    module = path.split(":")[0]
    keys = b.keys
    out: list[RemoteAgent] = []
    todo = list(items)
    for i in range(0, len(todo), chunk):
        part = todo[i : i + chunk]
        server = placement.place(b, module, load, conf.server, count=len(part))
        now = time.time()
        records: dict[str, str] = {}
        specs: dict[str, bytes] = {}
        call_id = _bus.new_id()
        created = Placeholder(call_id, "")
        for item in part:
            args, kwargs = _arguments(item)
            name, body = _spec(b, cls, path, args, kwargs)
            agent_id = _bus.new_id()
            records[agent_id] = AgentInfo(id=agent_id, name=name, cls=path, server=server,
                                          created=now, namespace=namespace,
                                          owner=owner).model_dump_json()
            specs[agent_id] = body
            out.append(RemoteAgent(agent_id, name, cls, server, created))
        # The entry names the agents; the worker reads their specs, written just before it.
        fields = b.sender.entry("create_many", CreateBatch(agents=list(specs)).pack(),
                                call=call_id).fields()

        def add(pipe: Any, records: dict[str, str] = records, specs: dict[str, bytes] = specs,
                fields: dict[str, Any] = fields, server: str = server) -> None:
            pipe.hset(keys.agents, mapping=records)
            pipe.hset(keys.specs, mapping=specs)
            if owner is not None:
                pipe.sadd(keys.owned(owner), *specs)
            pipe.xadd(keys.inbox(server), fields)

        b.sender.send(add, 4 if owner is not None else 3, created._fail)
    return out


def _arguments(item: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if isinstance(item, str):
        return (item,), {}
    if isinstance(item, dict):
        return (), item
    if (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], tuple | list)
            and isinstance(item[1], dict)):
        return tuple(item[0]), item[1]
    if isinstance(item, tuple | list):
        return tuple(item), {}
    raise ConfigError(f"create_many: {item!r} is not a name, args tuple, kwargs dict or "
                      "(args, kwargs)")


def create(cls: type, args: tuple[Any, ...], kwargs: dict[str, Any], conf: DistConf,
           memory: list[Any] | None = None, agent_id: str | None = None,
           state: str | None = None) -> RemoteAgent:
    """Build an agent on a worker: the class travels by name, the arguments as data.
    ``agent_id``: keep this id (``agent.to_dist()``: the agent keeps its identity);
    ``state``: its declared state as JSON (``Agent.state_dict``), loaded after the
    constructor. ``conf.name``: reserved in its namespace atomically with the creation
    (NameTaken if held, the holder's proxy with ``get_if_exists``); costs one synchronous
    round trip (two with ``get_if_exists``: the holder is looked up before anything is
    placed). Owned agents (not ``lifetime="detached"``) are added to the program's owned set
    in the same pipeline."""
    if _bus.loading_script.get():
        raise SkipStatement("creating a distributed agent while a worker loads a script")
    b = _bus.current()
    path, load = class_path(cls)
    name, body = _spec(b, cls, path, args, kwargs, memory, state)
    namespace = conf.namespace or b.namespace
    if conf.name is not None and conf.get_if_exists:
        held = programs.named(b, namespace, conf.name)
        if held is not None:  # found without placing (which might start child workers)
            return _holder(cls, held)
    owner = None if conf.lifetime == "detached" else b.owner.ensure()
    server = placement.place(b, path.split(":")[0], load, conf.server)
    agent_id, call_id = agent_id or _bus.new_id(), _bus.new_id()
    info = AgentInfo(id=agent_id, name=name, cls=path, server=server, created=time.time(),
                     namespace=namespace, registered=conf.name, owner=owner)
    keys = b.keys
    fields = b.sender.entry("create", body, call=call_id, agent=agent_id).fields()
    created = Placeholder(call_id, agent_id)
    if conf.name is not None:
        b.sender.flush()  # what this program sent before goes first, as with unnamed creates
        with b.errors():
            held_by = scripts.create_named(b.scripts, keys, namespace, conf.name, agent_id,
                                           info.model_dump_json(), body, keys.inbox(server),
                                           owner, fields)
        if held_by is not None:
            holder = AgentInfo.model_validate_json(held_by[1])
            if conf.get_if_exists:  # lost a race to create it: the winner's is the one
                return _holder(cls, holder)
            raise NameTaken(f"the name {conf.name!r} is taken in namespace {namespace!r} by "
                            f"agent {holder.id} ({holder.cls} on {holder.server}); pick "
                            "another, pass get_if_exists=True, or busagent.get_agent(name)")
        return RemoteAgent(agent_id, name, cls, server, created)

    def add(pipe: Any) -> None:
        # The record first: calls sent right after this are routed by it and queue behind the
        # create in the same inbox. The spec lets recovery rebuild the agent elsewhere.
        pipe.hset(keys.agents, agent_id, info.model_dump_json())
        pipe.hset(keys.specs, agent_id, body)
        if owner is not None:
            pipe.sadd(keys.owned(owner), agent_id)
        pipe.xadd(keys.inbox(server), fields)

    b.sender.send(add, 4 if owner is not None else 3, created._fail)
    return RemoteAgent(agent_id, name, cls, server, created)


def _holder(cls: type, info: AgentInfo) -> RemoteAgent:
    """The proxy of the agent that holds a name: with ``cls`` if that is its class."""
    try:
        same = class_name(cls) == info.cls
    except Exception:  # noqa: BLE001 - a class that has no path: look the record's up
        same = False
    if same:
        return RemoteAgent(info.id, info.name, cls, info.server)
    return RemoteAgent.from_wire(info.id, info.name, info.cls, info.server)
