"""``Agent``: an object with ``reply(x)`` and a memory, local or distributed."""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from .config import NAMESPACE_RULE, namespace_ok
from .errors import ConfigError
from .ids import new_id
from .memory import Memory, to_json

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


#: AgentScope's ``to_dist`` arguments: an agent server's address and its pool settings
_AGENTSCOPE_KEYS = frozenset({"host", "port", "max_pool_size", "max_expire_time",
                              "max_timeout_seconds", "local_mode", "lazy_launch",
                              "launch_server", "retry_strategy"})


def _bad_to_dist(what: str) -> ConfigError:
    return ConfigError(f"to_dist {what}: use to_dist=True (the least loaded worker) or "
                       "DistConf(server=NAME) (the worker started with `busagent worker --name "
                       "NAME`)")


class DistConf(BaseModel):
    """Where a distributed agent goes and who owns it. ``server=None``: the least loaded live
    worker that loaded the agent's module, else worker processes started for this program.

    ``name``: register the agent under this name in ``namespace`` (default: the program's,
    ``busagent.init(namespace=...)``), unique there (enforced atomically in Redis);
    ``busagent.get_agent(name)`` finds it from any process. Taken already: NameTaken, unless
    ``get_if_exists=True``, which returns the existing agent instead (its constructor arguments
    and placement are not compared; Ray's rule). ``lifetime``: ``"owned"`` (the default, also
    ``None``) deletes the agent when the creating program exits or dies; ``"detached"`` keeps
    it until it is deleted.

    Raises ConfigError (never pydantic's ValidationError) for anything else, naming what to use
    instead: AgentScope's ``{"host": ..., "port": ...}`` addresses an agent server, and busagent
    places by worker name, so such a dict is refused with that hint rather than guessed at."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    server: str | None = None
    name: str | None = None
    namespace: str | None = None
    lifetime: Literal["owned", "detached"] = "owned"
    get_if_exists: bool = False

    def __init__(self, **data: Any) -> None:
        agentscope = sorted(_AGENTSCOPE_KEYS & data.keys())
        if agentscope:
            raise _bad_to_dist(f"{', '.join(agentscope)}: busagent places agents on workers "
                               "by name, not by host and port (a worker on that host "
                               "registers itself in Redis)")
        unknown = sorted(set(data) - set(type(self).model_fields))
        if unknown:
            raise _bad_to_dist(f"has unknown field(s) {', '.join(map(repr, unknown))}")
        for field in ("server", "name", "namespace"):
            v = data.get(field)
            if v is not None and (not isinstance(v, str) or not v.strip()):
                raise _bad_to_dist(f"{field} {v!r}: a non-empty string")
        if data.get("lifetime", "owned") is None:
            data = {**data, "lifetime": "owned"}  # Ray spells the default None
        if data.get("lifetime", "owned") not in ("owned", "detached"):
            raise _bad_to_dist(f"lifetime {data['lifetime']!r}: 'owned' (the default: deleted "
                               "when this program exits) or 'detached'")
        if data.get("get_if_exists") and data.get("name") is None:
            raise _bad_to_dist("get_if_exists=True needs a name")
        if "get_if_exists" in data and not isinstance(data["get_if_exists"], bool):
            raise _bad_to_dist(f"get_if_exists {data['get_if_exists']!r}: True or False")
        if data.get("namespace") is not None and not namespace_ok(data["namespace"]):
            raise _bad_to_dist(f"namespace {data['namespace']!r}: {NAMESPACE_RULE}")
        try:
            super().__init__(**data)
        except ValidationError as e:  # unreachable after the checks; kept one line all the same
            raise _bad_to_dist(f"is invalid: {e.errors()[0]['msg']}") from None

    @classmethod
    def of(cls, value: Any) -> DistConf:
        """A DistConf from ``to_dist=``: True, a DistConf or a dict of its fields. Raises
        ConfigError for anything else."""
        if value is True:
            return cls()
        if isinstance(value, DistConf):
            return value
        if isinstance(value, dict):
            if not all(isinstance(k, str) for k in value):
                raise _bad_to_dist(f"{value!r}: its keys must be field names")
            return cls(**value)  # a copy: the caller's dict is never changed
        raise _bad_to_dist(f"{value!r} ({type(value).__name__})")


class AgentMeta(type):
    """Intercepts ``to_dist=`` at construction: the agent is then built only on a worker and a
    proxy is returned."""

    def __call__(cls, *args: Any, to_dist: Any = None, **kwargs: Any) -> Any:
        # AgentScope's rule: anything but None and False asks for a distributed agent, so an
        # empty dict or a mistyped value is checked (and refused) rather than run locally.
        if to_dist is not None and to_dist is not False:
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

    #: The attribute names that are this agent's declared state (AgentScope 1.0's registered
    #: state): saved with every committed call, in the same atomic step as its memory, and
    #: restored when the agent is rebuilt (recovery after a crash, ``stop --drain``,
    #: ``to_dist()``). Every other attribute is rebuilt by the constructor. Declare here,
    #: with :meth:`register_state` in ``__init__``, or override :meth:`state_dict` and
    #: :meth:`load_state_dict` together.
    state_attrs: ClassVar[tuple[str, ...]] = ()
    #: names added by :meth:`register_state` (per instance).
    _state_names: tuple[str, ...] = ()
    #: the state's JSON as last saved (None: never), so an unchanged state is not rewritten.
    _state_saved: str | None = None

    def __init__(self, name: str, **kwargs: Any) -> None:
        self.name = name
        self.memory = Memory()
        self.agent_id = assigning_id.get() or new_id()

    def register_state(self, *names: str) -> None:
        """Declare attributes as this agent's state (see :attr:`state_attrs`), as AgentScope
        1.0's ``register_state`` does. Raises ConfigError for a name that is not an attribute
        name."""
        for n in names:
            if not (isinstance(n, str) and n.isidentifier()):
                raise ConfigError(f"register_state({n!r}): a state is named by an attribute "
                                  "name (a string such as 'inc')")
        self._state_names = tuple(dict.fromkeys((*self._state_names, *names)))

    def state_dict(self) -> dict[str, Any]:
        """The declared state, ``{attribute name: value}``. Values are data as memory stores
        it (msgpack-like values, Msgs, pydantic models, distributed agents); anything else
        fails the call that changed it with NotSerializable."""
        return {n: getattr(self, n) for n in _unique((*self.state_attrs, *self._state_names))
                if hasattr(self, n)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Set the attributes of a saved :meth:`state_dict` (called after the constructor
        when the agent is rebuilt)."""
        for n, v in state.items():
            setattr(self, n, v)

    def _take_state(self) -> str | None:
        """The state's JSON if it changed since the last save (then marked saved), else None.
        Raises NotSerializable naming the attribute. Cheap for an agent without declared
        state: one empty dict per call."""
        state = self.state_dict()
        if not state and self._state_saved is None:
            return None
        text = to_json(state, "state")
        if text == self._state_saved:
            return None
        self._state_saved = text
        return text

    def reply(self, x: Any = None) -> Any:
        raise NotImplementedError(f"{type(self).__name__} must implement reply(x)")

    def observe(self, x: Any) -> None:
        """Receive a message without replying: it goes into memory."""
        self.memory.add(x)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.reply(*args, **kwargs)

    def to_dist(self, server: str | DistConf | dict[str, Any] | None = None, to_dist: Any = None,
                **agentscope: Any) -> Any:
        """Rebuild this agent on a worker from its constructor arguments, with its current
        memory, its declared state (:attr:`state_attrs`) and its ``agent_id`` (as AgentScope
        does: hubs and records that name it keep working), and return the proxy.
        ``server``: a worker's name, or (given first, as ``to_dist(DistConf(server="w"))``
        reads) a DistConf or a dict of its fields; ``to_dist``: as the constructor's.
        AgentScope's ``host=``, ``port=`` ... raise ConfigError saying what to use instead; so
        does a second call (two distributed agents cannot share one id; use the proxy the
        first call returned)."""
        if agentscope:
            DistConf(**agentscope)  # raises, naming the AgentScope arguments
        if self._dist is not None:
            raise ConfigError(f"{self.name} ({self.agent_id}) was already moved to a worker by "
                              f"to_dist(); use the proxy it returned: {self._dist!r}")
        if isinstance(server, DistConf | dict):
            if to_dist is not None:
                raise ConfigError("to_dist: give a DistConf once, first or as to_dist=")
            server, to_dist = None, server
        conf = DistConf.of(to_dist) if to_dist is not None else DistConf(server=server)
        args, kwargs = getattr(self, "_init_args", ((self.name,), {}))
        state = self.state_dict()
        proxy = _create(type(self), args, kwargs, conf, memory=self.memory.get(),
                        agent_id=self.agent_id,
                        state=to_json(state, "state") if state else None)
        self._dist = proxy
        return proxy

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, agent_id={self.agent_id!r})"


def _unique(names: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(names))


def _create(cls: type, args: tuple[Any, ...], kwargs: dict[str, Any], conf: DistConf,
            memory: list[Any] | None = None, agent_id: str | None = None,
            state: str | None = None) -> Any:
    """Build an agent on a worker and return its proxy (:func:`busagent.proxy.create`).

    The one link from the base agent to distribution, and a lazy import on purpose: the proxy
    side (bus, placement, proxies) imports this module, so importing it at the top would be a
    cycle, and an agent that is never distributed never loads it. Hubs are not linked at all:
    a worker delivers hub messages to an agent (``busagent.hub.deliver``), the agent does not
    know hubs."""
    from .proxy import create

    return create(cls, args, kwargs, conf, memory=memory, agent_id=agent_id, state=state)
