"""The errors busagent raises. Every one derives from :class:`BusagentError` and says how to fix
the problem.

    BusagentError
    ├── ConfigError            bad settings or arguments (also a ValueError)
    ├── RedisUnavailable       Redis cannot be reached (also a ConnectionError)
    ├── NotSerializable        a value cannot travel on the bus (also a TypeError)
    ├── MessageTooLarge        an encoded call exceeds ``max_message_bytes``
    ├── ProtocolError          an entry on the bus is malformed or of another version
    ├── PlacementError         no live server can host an agent
    ├── UnknownAgent           the agent id is not (or no longer) registered
    ├── UnknownClass           a worker was asked for a class it did not load
    ├── CallTimeout            a deadline passed (also a TimeoutError)
    ├── ModelError             a model endpoint failed after its retries
    └── RemoteError            the remote code raised; carries type, message, traceback, server
"""

from __future__ import annotations

from typing import Any


class BusagentError(Exception):
    """Base class of every busagent error."""

    #: the name a worker sends on the wire, so the caller can re-raise the same class.
    code = "BusagentError"


class ConfigError(BusagentError, ValueError):
    code = "ConfigError"


class RedisUnavailable(BusagentError, ConnectionError):
    code = "RedisUnavailable"


class NotSerializable(BusagentError, TypeError):
    code = "NotSerializable"


class MessageTooLarge(BusagentError):
    code = "MessageTooLarge"


class ProtocolError(BusagentError):
    code = "ProtocolError"


class PlacementError(BusagentError):
    code = "PlacementError"


class UnknownAgent(BusagentError):
    code = "UnknownAgent"


class UnknownClass(BusagentError):
    code = "UnknownClass"


class CallTimeout(BusagentError, TimeoutError):
    code = "CallTimeout"


class ModelError(BusagentError):
    code = "ModelError"


class RemoteError(BusagentError):
    """The remote side raised. ``type`` is the remote exception's class name, ``traceback`` its
    formatted traceback, ``server`` the worker it ran on."""

    code = "RemoteError"

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


# Errors a worker reports with a code the caller maps back to a local class, so that
# ``except UnknownAgent`` works across the bus.
_BY_CODE: dict[str, type[BusagentError]] = {
    c.code: c
    for c in (
        ConfigError,
        NotSerializable,
        MessageTooLarge,
        ProtocolError,
        PlacementError,
        UnknownAgent,
        UnknownClass,
        CallTimeout,
    )
}


def from_wire(type_: str, message: str, traceback: str, server: str) -> BusagentError:
    """The local exception for an error reply: busagent's own errors keep their class; anything
    the user's code raised becomes a RemoteError."""
    cls = _BY_CODE.get(type_)
    if cls is not None:
        err = cls(message + (f" (server {server!r})" if server else ""))
        return err
    return RemoteError(type_, message, traceback, server)
