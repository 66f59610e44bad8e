"""``Agent``: an object with ``reply(x)`` and a memory, local or distributed."""

from __future__ import annotations

import contextvars
from collections.abc import Callable
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict

from .errors import ConfigError
from .ids import new_id
from .memory import Memory

F = TypeVar("F", bound=Callable[..., Any])

#: the id a worker assigns to the agent it is constructing (read by Agent.__init__).
assigning_id: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "busagent_assigning_id", default=None
)


def remote(fn: F) -> F:
    """Mark a method as callable through a distributed agent's proxy (it returns a placeholder,
    like ``reply``). Unmarked methods are refused by the worker."""
    fn.__busagent_remote__ = True  # type: ignore[attr-defined]
    return fn


def is_remote(cls: type, name: str) -> bool:
    return bool(getattr(getattr(cls, name, None), "__busagent_remote__", False))


class DistConf(BaseModel):
    """Where a distributed agent goes. ``server=None``: the least loaded live worker that loaded
    the agent's module, else worker processes started for this program."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    server: str | None = None

    @classmethod
    def of(cls, value: Any) -> DistConf:
        if value is True:
            return cls()
        if isinstance(value, DistConf):
            return value
        if isinstance(value, dict):
            return cls(**value)  # a copy: the caller's dict is never changed
        raise ConfigError(f"to_dist must be True, a DistConf or a dict, not {value!r}")


class AgentMeta(type):
    """Intercepts ``to_dist=`` at construction: the agent is then built only on a worker and a
    proxy is returned."""

    def __call__(cls, *args: Any, to_dist: Any = None, **kwargs: Any) -> Any:
        if to_dist:
            return _create(cls, args, kwargs, DistConf.of(to_dist))
        obj = super().__call__(*args, **kwargs)
        obj._init_args = (args, kwargs)
        return obj


class Agent(metaclass=AgentMeta):
    """Subclass it and implement ``reply(x)`` (plain or ``async def``).

    ``Agent(name, ..., to_dist=True | DistConf(...))`` builds the agent on a worker and returns a
    proxy whose calls return placeholders; ``agent.to_dist()`` moves an existing one there.
    """

    _init_args: tuple[tuple[Any, ...], dict[str, Any]]
    #: the proxy ``to_dist()`` returned (the agent now lives on a worker under its id).
    _dist: Any = None

    def __init__(self, name: str, **kwargs: Any) -> None:
        self.name = name
        self.memory = Memory()
        self.agent_id = assigning_id.get() or new_id()

    def reply(self, x: Any = None) -> Any:
        raise NotImplementedError(f"{type(self).__name__} must implement reply(x)")

    def observe(self, x: Any) -> None:
        """Receive a message without replying: it goes into memory."""
        self.memory.add(x)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.reply(*args, **kwargs)

    def to_dist(self, server: str | None = None, to_dist: Any = None) -> Any:
        """Rebuild this agent on a worker from its constructor arguments, with its current
        memory and its ``agent_id`` (as AgentScope does: hubs and records that name it keep
        working), and return the proxy. Raises ConfigError the second time: two distributed
        agents cannot share one id; use the proxy the first call returned."""
        if self._dist is not None:
            raise ConfigError(f"{self.name} ({self.agent_id}) was already moved to a worker by "
                              f"to_dist(); use the proxy it returned: {self._dist!r}")
        conf = DistConf.of(to_dist) if to_dist else DistConf(server=server)
        args, kwargs = getattr(self, "_init_args", ((self.name,), {}))
        proxy = _create(type(self), args, kwargs, conf, memory=self.memory.get(),
                        agent_id=self.agent_id)
        self._dist = proxy
        return proxy

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, agent_id={self.agent_id!r})"


def _create(cls: type, args: tuple[Any, ...], kwargs: dict[str, Any], conf: DistConf,
            memory: list[Any] | None = None, agent_id: str | None = None) -> Any:
    """Build an agent on a worker and return its proxy (:func:`busagent.proxy.create`).

    The one link from the base agent to distribution, and a lazy import on purpose: the proxy
    side (bus, placement, proxies) imports this module, so importing it at the top would be a
    cycle, and an agent that is never distributed never loads it. Hubs are not linked at all:
    a worker delivers hub messages to an agent (``busagent.hub.deliver``), the agent does not
    know hubs."""
    from .proxy import create

    return create(cls, args, kwargs, conf, memory=memory, agent_id=agent_id)
