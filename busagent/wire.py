"""What travels on the bus: pydantic models for every structure, msgpack for the bytes.

Nothing here unpickles: a Msg, a placeholder reference and a pydantic model are msgpack
extension types, and a pydantic model is rebuilt only from a class the receiving process has
already imported (its own code or a module it was told to load).
"""

from __future__ import annotations

import hashlib
import hmac
import sys
from typing import Any, Literal

import msgpack
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .classpath import lookup
from .errors import NotSerializable, ProtocolError
from .message import Msg

VERSION = 1

EXT_MSG = 1
EXT_REF = 2
EXT_MODEL = 3

Kind = Literal["call", "method", "observe", "create", "control", "deliver"]


class Ref:
    """A placeholder as a receiving process sees it: the call id whose reply stands for a value."""

    __slots__ = ("call_id",)

    def __init__(self, call_id: str) -> None:
        self.call_id = call_id

    def __repr__(self) -> str:
        return f"Ref({self.call_id!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Ref) and other.call_id == self.call_id

    def __hash__(self) -> int:
        return hash(self.call_id)


class Entry(BaseModel):
    """One stream entry. The header fields are plain strings so ``XRANGE`` in redis-cli is
    readable; the arguments are msgpack in ``body``."""

    model_config = ConfigDict(frozen=True)

    v: int
    call: str = Field(min_length=1, max_length=128)
    agent: str = Field(max_length=256)
    caller: str = Field(max_length=256)
    kind: Kind
    body: bytes
    #: how many workers died holding this call (set when recovery moves it).
    tries: int = 0
    #: a create that rebuilds the agent from its spec and stored memory (recovery).
    restore: bool = False
    #: HMAC of the signed fields when a secret is configured.
    sig: str = ""


def sign_input(v: int, call: str, agent: str, kind: str, body: bytes) -> bytes:
    return f"{v}|{call}|{agent}|{kind}|".encode() + body


def signature(secret: str | None, v: int, call: str, agent: str, kind: str, body: bytes) -> str:
    """The hex HMAC-SHA256 of a call's identifying fields and body ("" without a secret)."""
    if not secret:
        return ""
    return hmac.new(secret.encode(), sign_input(v, call, agent, kind, body),
                    hashlib.sha256).hexdigest()


class CallBody(BaseModel):
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    #: for kind "method": which method.
    method: str | None = None
    #: epoch seconds after which the caller no longer waits; the worker then skips the call.
    deadline: float | None = None
    #: write the reply as stream events even if ``reply`` is not a generator
    stream: bool = False


class CreateBody(BaseModel):
    cls: str = Field(pattern=r"^[\w.]+:[\w.]+$")
    name: str
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    #: memory to start with (``agent.to_dist()`` carries the local agent's memory over).
    memory: list[Any] = []


class CreateBatch(BaseModel):
    """``busagent.create_many``: the agents to build; their specs are in ``{p}:specs``."""

    agents: list[str]


class ControlBody(BaseModel):
    op: Literal["stop", "drain", "delete", "delete_all", "list", "ping", "wake", "state"]
    agent: str | None = None


class DeliverBody(BaseModel):
    """Kind ``deliver``, a worker built-in: the agent observes what ``hub`` holds for it
    (``busagent.hub.deliver``); with ``speak`` it then takes a turn, ``reply()`` from memory,
    written as stream events for the task center. The reply is the count of messages
    observed, or the turn's reply."""

    hub: str
    speak: bool = False


class ErrorInfo(BaseModel):
    type: str
    message: str
    traceback: str = ""
    server: str = ""


class Reply(BaseModel):
    ok: bool
    value: Any = None
    error: ErrorInfo | None = None


# --- msgpack codec -----------------------------------------------------------------------------


def _default(obj: Any) -> Any:
    if isinstance(obj, Msg):
        return msgpack.ExtType(EXT_MSG, pack(obj.to_wire()))
    ref = getattr(obj, "__busagent_ref__", None)
    if ref is not None:
        return msgpack.ExtType(EXT_REF, ref().encode())
    if isinstance(obj, Ref):
        return msgpack.ExtType(EXT_REF, obj.call_id.encode())
    if isinstance(obj, BaseModel):
        cls = type(obj)
        path = f"{cls.__module__}:{cls.__qualname__}"
        return msgpack.ExtType(EXT_MODEL, pack([path, obj.model_dump(mode="python")]))
    if isinstance(obj, tuple | set | frozenset):
        return list(obj)
    raise NotSerializable(
        f"a value of type {type(obj).__name__} cannot travel on the bus; use msgpack-able "
        "values (None, bool, int, float, str, bytes, list, dict), Msg or a pydantic model"
    )


def pack(obj: Any) -> bytes:
    try:
        return msgpack.packb(obj, default=_default, use_bin_type=True)  # type: ignore[no-any-return]
    except NotSerializable:
        raise
    except (TypeError, ValueError, OverflowError) as e:
        raise NotSerializable(f"cannot encode value for the bus: {e}") from None


def _model_class(path: str) -> type[BaseModel]:
    # Only classes already imported here: decoding must never import code on a sender's word.
    found, obj = lookup(path, sys.modules)
    if not found:
        raise ProtocolError(
            f"pydantic model {path!r} is not loaded in this process; load its module in the worker "
            "(--agents MODULE)"
        )
    if not (isinstance(obj, type) and issubclass(obj, BaseModel)):
        raise ProtocolError(f"{path!r} is not a pydantic model")
    return obj


def unpack(data: bytes, refs: list[Ref] | None = None) -> Any:
    """Decode bytes from the bus. Placeholder references become :class:`Ref` objects and are
    appended to ``refs`` when given, so the caller can resolve them."""

    def ext_hook(code: int, payload: bytes) -> Any:
        if code == EXT_MSG:
            fields = unpack(payload, refs)
            if not isinstance(fields, dict):
                raise ProtocolError("a Msg on the bus must be a map")
            return Msg.model_validate(fields)
        if code == EXT_REF:
            ref = Ref(payload.decode())
            if refs is not None:
                refs.append(ref)
            return ref
        if code == EXT_MODEL:
            path, fields = unpack(payload, refs)
            return _model_class(path).model_validate(fields)
        raise ProtocolError(f"unknown msgpack extension type {code}")

    try:
        return msgpack.unpackb(data, ext_hook=ext_hook, raw=False, strict_map_key=False)
    except (ProtocolError, NotSerializable):
        raise
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError,
            msgpack.StackError, ValidationError) as e:
        raise ProtocolError(f"malformed data on the bus: {e}") from None


def pack_reply(ok: bool, value: Any = None, error: ErrorInfo | None = None) -> bytes:
    return pack({"ok": ok, "value": value, "error": error.model_dump() if error else None})


def unpack_reply(data: bytes) -> Reply:
    raw = unpack(data)
    try:
        return Reply.model_validate(raw)
    except ValidationError as e:
        raise ProtocolError(f"malformed reply on the bus: {e}") from None


def substitute(obj: Any, values: dict[str, Any]) -> Any:
    """``obj`` with every Ref replaced by its resolved value (Msgs and containers walked)."""
    if isinstance(obj, Ref):
        return values[obj.call_id]
    if isinstance(obj, list):
        return [substitute(x, values) for x in obj]
    if isinstance(obj, dict):
        return {k: substitute(v, values) for k, v in obj.items()}
    if isinstance(obj, Msg):
        content = substitute(obj.content, values)
        if content is not obj.content:
            return obj.model_copy(update={"content": content})
        return obj
    return obj
