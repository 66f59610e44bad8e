"""The errors busagent raises, grouped by what the caller does about them (httpx's way).

    BusagentError
    ├── UsageError             fix the calling code or the configuration; retrying will not help
    │   ├── ConfigError        bad settings or arguments (also a ValueError)
    │   ├── NotSerializable    a value cannot travel on the bus (also a TypeError)
    │   ├── MessageTooLarge    an encoded call or reply exceeds ``max_message_bytes``
    │   ├── UnknownClass       a worker was asked for a class from a module it did not load
    │   ├── UnknownName        no hub or server by that name (the studio's 404)
    │   ├── CallCycle          a call to an agent up its own call chain (itself, A -> B -> A)
    │   └── NameTaken          a name is already registered in its namespace (also a ValueError)
    ├── BusError               the bus itself failed: fix Redis or the deployment, then retry
    │   ├── RedisUnavailable   Redis cannot be reached or refused us (also a ConnectionError)
    │   └── ProtocolError      an entry on the bus is malformed, unsigned or of another version
    ├── AgentError             the agent is not there to run the call: create it (again)
    │   ├── UnknownAgent       the agent id is not (or no longer) registered or hosted
    │   ├── PlacementError     no live server can host the agent
    │   ├── ConstructorError   the agent's constructor raised on its worker
    │   └── DeadLettered       every worker that took the call died; it is in the dead letters
    ├── CallTimeout            a deadline passed; the call may still run (also a TimeoutError)
    ├── Cancelled              ``busagent.cancel`` cancelled the call; nothing to fix
    ├── ModelError             a model endpoint failed after its retries
    └── RemoteError            the agent's own code raised: ``type``, ``message``, ``traceback``

Every error's ``code`` is its class name and travels on the bus, so ``except UnknownAgent``
works across processes: :func:`from_wire` rebuilds busagent's own classes, and anything else the
remote code raised arrives as a :class:`RemoteError`. Errors of lower layers (redis-py) are
translated once, at the bus boundary (:meth:`busagent.bus.Bus.errors`).
"""

from __future__ import annotations

from typing import Any, ClassVar


class BusagentError(Exception):
    """Base class of every busagent error. ``server`` and ``traceback`` are set when the error
    was raised on a worker and travelled back."""

    #: the name a worker sends on the wire, so the caller can re-raise the same class.
    code: ClassVar[str] = "BusagentError"
    server: str = ""
    traceback: str = ""

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        cls.code = cls.__name__
        _BY_CODE[cls.code] = cls


_BY_CODE: dict[str, type[BusagentError]] = {"BusagentError": BusagentError}


class UsageError(BusagentError):
    """The calling code or the configuration is wrong; retrying will not help."""


class ConfigError(UsageError, ValueError):
    pass


class NotSerializable(UsageError, TypeError):
    pass


class MessageTooLarge(UsageError):
    pass


class UnknownClass(UsageError):
    pass


class UnknownName(UsageError, LookupError):
    """No hub, server (nor its log lines) by that name: check the name (``busagent servers``,
    ``GET /api/hubs``). The studio answers it with 404."""


class CallCycle(UsageError):
    """A call to an agent that is waiting up the caller's own call chain (a self-call or a
    cycle A -> B -> A): it would wait for itself. The message names the cycle."""


class NameTaken(UsageError, ValueError):
    """``DistConf(name=...)``: another agent already holds the name in its namespace. Pick
    another name, ``get_if_exists=True`` to attach to it, or ``busagent.get_agent(name)``."""


class BusError(BusagentError):
    """Redis or the bus's data failed; fix the deployment and retry."""


class RedisUnavailable(BusError, ConnectionError):
    pass


class ProtocolError(BusError):
    pass


class AgentError(BusagentError):
    """The agent is not there to run the call."""


class UnknownAgent(AgentError):
    pass


class PlacementError(AgentError):
    pass


class ConstructorError(AgentError):
    """The agent's constructor raised on its worker; the message starts with the original
    exception's type, ``traceback`` holds its frames."""


class DeadLettered(AgentError):
    """The call was delivered ``max_deliveries`` times and each worker died running it; it waits
    in the dead-letter stream (``busagent deadletter``, ``busagent.replay``)."""


class CallTimeout(BusagentError, TimeoutError):
    pass


class Cancelled(BusagentError):
    """The call was cancelled with ``busagent.cancel`` (or by Ctrl-C in ``gather``): before
    it started, or while it ran (its reply, if it still produced one, was discarded)."""


class ModelError(BusagentError):
    pass


class SkipStatement(BusagentError):
    """Raised inside a worker that is loading a user's script, for statements with effects
    (``busagent.init()``, creating distributed agents): the loader skips that statement. Never
    reaches user code."""


class RemoteError(BusagentError):
    """The remote side raised. ``type`` is the remote exception's class name, ``traceback`` its
    formatted traceback, ``server`` the worker it ran on."""

    def __init__(self, type: str, message: str, traceback: str = "", server: str = "") -> None:
        self.type = type
        self.message = message
        self.traceback = traceback
        self.server = server
        where = f" on server {server!r}" if server else ""
        text = f"{type}: {message}{where}"
        if traceback:
            text += "\n--- remote traceback ---\n" + traceback.rstrip()
        super().__init__(text)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.type, self.message, self.traceback, self.server))


def code_of(err: BaseException) -> str:
    """The type name an error travels under: busagent's own code, else the class name."""
    return err.code if isinstance(err, BusagentError) else type(err).__name__


def from_wire(type_: str, message: str, traceback: str, server: str) -> BusagentError:
    """The local exception for an error reply: busagent's own errors keep their class; anything
    the user's code raised becomes a RemoteError."""
    cls = _BY_CODE.get(type_)
    if cls is None or cls is RemoteError:
        return RemoteError(type_, message, traceback, server)
    err = cls(message + (f" (server {server!r})" if server else ""))
    err.server, err.traceback = server, traceback
    return err
