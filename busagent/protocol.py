"""The protocol: every message on the bus as one model, used by the sender and the receiver.

What travels on the bus, and the only module that spells it:

* a **stream entry** (:class:`Entry`) in a server's inbox: plain-string header fields, so
  ``XRANGE`` in redis-cli is readable, and a msgpack ``body``. Senders XADD ``Entry.fields()``;
  the worker parses ``Entry.from_fields()``, which raises ProtocolError for a malformed entry.
* a **body** (:class:`CallBody`, :class:`CreateBody`, :class:`CreateBatch`,
  :class:`ControlBody`): built by the sender, ``.pack()``-ed into ``Entry.body``, read back with
  ``.unpack()``.
* a **reply** (:class:`Reply`): ``Reply.ok(value)`` / ``Reply.fail(err)`` give the bytes a worker,
  recovery or a script writes to ``{p}:reply:{call}``; ``Reply.parse`` reads them.

Nothing here unpickles: a Msg, a placeholder reference, a distributed agent's handle and a
pydantic model are msgpack extension types, at any depth of a value; a pydantic model is rebuilt
only from a class the receiving process has already imported (its own code, a module it was
told to load, or the user's script), and a handle's class is only looked up, never imported.
A value that cannot travel raises NotSerializable naming where in the value it is.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
from collections.abc import Mapping
from typing import Any, ClassVar, Literal, TypeVar

import msgpack
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .classpath import class_path, find
from .errors import (
    BusagentError,
    ConfigError,
    MessageTooLarge,
    NotSerializable,
    ProtocolError,
    RemoteError,
    code_of,
    from_wire,
)
from .message import Msg

#: Version 2 (was 1): the kinds ``create_many`` and ``restore`` and call-less entries are new;
#: a v1 worker would misread them, and a v2 worker a v1 bulk create or rebuild (a v1 restore
#: read as a plain create would drop the agent). The version check refuses either clearly.
#: Version 3 (was 2): a call's deadline is a relative ``timeout`` counted by the Redis clock
#: (a v2 worker would ignore it, a v3 worker a v2 absolute ``deadline``), a create's memory is
#: a list of exact-JSON items, and calls may carry ``chain`` and ``trace``.
#: Version 4 (was 3): tuples, sets and frozensets travel as extension types 5-7 (a v3 reader
#: would refuse them as unknown extensions, and a v4 reader take a v3 tuple for a list).
VERSION = 4

EXT_MSG = 1
EXT_REF = 2
EXT_MODEL = 3
#: a distributed agent's handle (:class:`~busagent.proxy.RemoteAgent`): ``[id, name, class,
#: server]``, so an agent built with a list of other agents gets usable handles.
EXT_AGENT = 4
#: a tuple, a set, a frozenset: their items as a msgpack array. msgpack alone writes all three
#: as arrays, read back as lists, which changes the value and, as a dict key (``{(1, 2): x}``)
#: or an item of a frozenset, cannot be read back at all (a list is unhashable).
EXT_TUPLE = 5
EXT_SET = 6
EXT_FROZENSET = 7
#: not on the wire: what ``__busagent_wire__`` returns for an object that travels as a value.
EXT_VALUE = -1

#: call: ``reply``; method: a ``@remote`` method; observe: ``observe``; create: build one agent;
#: create_many: build the agents a :class:`CreateBatch` names (their specs are in ``{p}:specs``);
#: restore: rebuild an agent from its spec and stored memory (recovery, nobody waits);
#: control: a server operation (:class:`ControlBody`); deliver: a hub's notice or turn, a
#: worker built-in (:class:`DeliverBody`); cancel: ``busagent.cancel`` of some of the agent's
#: calls (:class:`CancelBody`), routed like a call so it lands behind them in the same inbox,
#: and handled as soon as it is read, never queued behind the calls it cancels.
Kind = Literal["call", "method", "observe", "create", "create_many", "restore", "control",
               "deliver", "cancel"]
ControlOp = Literal["stop", "drain", "delete", "delete_all", "list", "ping", "wake", "state"]
#: kinds addressed to one agent (``agent`` must be set).
AGENT_KINDS = frozenset({"call", "method", "observe", "create", "restore", "deliver",
                         "cancel"})
#: kinds ``busagent.cancel`` can cancel (a hub's deliver is the hub's, not a caller's).
CANCELLABLE_KINDS = frozenset({"call", "method", "observe"})
#: kinds whose sender never waits: they carry no call id and are never answered.
UNANSWERED_KINDS = frozenset({"restore"})


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


# --- stream entries ------------------------------------------------------------------------------


class Entry(BaseModel):
    """One stream entry in a server's inbox. The field names below are the entry's field names
    on the wire, here and nowhere else in Python.

    ``call`` is empty for an entry nobody waits on: a ``restore`` (always) and the worker's own
    ``wake`` control op. Such an entry is never answered (:meth:`reply_to`).

    Lua scripts that write or read entries (checked against this model by a unit test):

    * ``route.lua`` XADDs ``v, call, agent, caller, kind, body`` and ``sig`` when signed.
    * ``move.lua`` XADDs the restore entries Python built (``Entry.fields()``, passed flat),
      re-XADDs moved entries with ``tries`` counted, and reads ``tries``, ``call``, ``kind`` and
      ``agent``; dead-lettered entries get a ``reason`` (see :data:`DEADLETTER_FIELDS`).
    """

    model_config = ConfigDict(frozen=True)

    v: int
    kind: Kind
    #: the call id whose reply the caller waits on; "" when nobody waits.
    call: str = Field(default="", max_length=128)
    agent: str = Field(default="", max_length=256)
    caller: str = Field(default="", max_length=256)
    body: bytes = b""
    #: how many workers died holding this call (set when recovery moves it).
    tries: int = 0
    #: HMAC of the signed fields when a secret is configured.
    sig: str = ""

    #: the field names as the bytes redis-py returns, for :meth:`from_fields`.
    _NAMES: ClassVar[dict[bytes, str]]

    @model_validator(mode="after")
    def _addressed(self) -> Entry:
        if self.v != VERSION:
            return self  # another version's rules: the worker refuses it, naming the version
        if self.kind in AGENT_KINDS and not self.agent:
            raise ValueError(f"a {self.kind} entry needs an agent id")
        if self.kind in UNANSWERED_KINDS:
            if self.call:
                raise ValueError(f"a {self.kind} entry has no call id (nobody waits on it)")
        elif not self.call and self.kind != "control":
            raise ValueError(f"a {self.kind} entry needs a call id")
        return self

    @classmethod
    def new(cls, secret: str | None, kind: Kind, body: bytes, call: str = "", agent: str = "",
            caller: str = "") -> Entry:
        """An entry signed with ``secret`` (unsigned without one)."""
        return cls(v=VERSION, kind=kind, call=call, agent=agent, caller=caller, body=body,
                   sig=signature(secret, VERSION, call, agent, kind, body))

    def fields(self) -> dict[str, Any]:
        """What is XADDed: fields at their defaults are left out (a reader fills them in)."""
        return self.model_dump(exclude_defaults=True)

    @classmethod
    def from_fields(cls, fields: Mapping[bytes, bytes]) -> Entry:
        """Parse an entry as redis-py returns it; ProtocolError if it is malformed."""
        names = cls._NAMES
        try:
            # Header fields are text; only the body stays bytes.
            return cls.model_validate({n: v if n == "body" else v.decode()
                                       for k, v in fields.items() if (n := names.get(k))})
        except ValidationError as e:
            # One readable line (it becomes a dead letter's reason): what is wrong with which
            # field, without pydantic's multi-line dump or the raw input's repr.
            wrong = "; ".join(f"{'.'.join(map(str, x['loc'])) or 'entry'}: {x['msg']}"
                              for x in e.errors())
            raise ProtocolError(f"malformed call entry: {wrong}") from None
        except UnicodeDecodeError as e:
            raise ProtocolError("malformed call entry: a header field is not UTF-8 text "
                                f"({e.reason} at byte {e.start})") from None

    @staticmethod
    def reply_to(fields: Mapping[bytes, bytes]) -> str:
        """The call id to answer for an entry read raw (possibly malformed), "" when nobody
        waits: decided by the kind, never by the shape of the id."""
        if fields.get(b"kind", b"").decode(errors="replace") in UNANSWERED_KINDS:
            return ""
        return fields.get(b"call", b"").decode(errors="replace")

    @staticmethod
    def agent_of(fields: Mapping[bytes, bytes]) -> str:
        """The agent id of an entry read raw (possibly malformed), "" if none."""
        return fields.get(b"agent", b"").decode(errors="replace")


Entry._NAMES = {name.encode(): name for name in Entry.model_fields}

#: the entry field names each Lua script spells (writes or reads), beside the model they must
#: match: ``tests/test_protocol.py`` reads the scripts and checks both ways.
LUA_ENTRY_FIELDS: dict[str, frozenset[str]] = {
    "route.lua": frozenset({"v", "call", "agent", "caller", "kind", "body", "sig"}),
    "move.lua": frozenset({"tries", "call", "kind", "agent", "reason", "server"}),
}

#: what a dead-lettered entry carries beside its own fields: why (move.lua, the worker) and the
#: server that gave up on it (the worker).
DEADLETTER_FIELDS = ("reason", "server")


def deadletter(fields: Mapping[bytes, bytes], reason: str, server: str,
               tries: int | None = None) -> dict[bytes, bytes]:
    """The fields a worker keeps in the dead-letter stream for an entry it cannot answer
    (``tries``: the deliveries that ended in a dead worker, when that is why)."""
    out = {**fields, b"reason": reason.encode(), b"server": server.encode()}
    if tries is not None:
        out[b"tries"] = str(tries).encode()
    return out


def describe(fields: Mapping[bytes, bytes]) -> dict[str, str]:
    """The readable header fields of an entry (a dead letter's included), for people."""
    wanted = {"call", "agent", "kind", "caller", "tries", *DEADLETTER_FIELDS}
    return {k.decode(): v.decode(errors="replace") for k, v in fields.items()
            if k.decode(errors="replace") in wanted}


def sign_input(v: int, call: str, agent: str, kind: str, body: bytes) -> bytes:
    return f"{v}|{call}|{agent}|{kind}|".encode() + body


def signature(secret: str | None, v: int, call: str, agent: str, kind: str, body: bytes) -> str:
    """The hex HMAC-SHA256 of a call's identifying fields and body ("" without a secret)."""
    if not secret:
        return ""
    return hmac.new(secret.encode(), sign_input(v, call, agent, kind, body),
                    hashlib.sha256).hexdigest()


def check_size(data: bytes, limit: int, what: str) -> None:
    """Refuse an encoded message over ``max_message_bytes`` (``limit``), before it travels."""
    if len(data) > limit:
        raise MessageTooLarge(
            f"{what} is {len(data):,} bytes encoded, over max_message_bytes={limit:,}; send a "
            "reference (a URL or a Redis key) instead, or raise BUSAGENT_MAX_MESSAGE_BYTES on "
            "callers and workers alike"
        )


# --- bodies --------------------------------------------------------------------------------------


class Body(BaseModel):
    """An entry's body: a sender builds the model and ``pack()``s it; the receiver ``unpack``s."""

    #: each field's default: left out of the packed map, so bodies stay small.
    _DEFAULTS: ClassVar[dict[str, Any]] = {}

    @classmethod
    def __pydantic_init_subclass__(cls, **kw: Any) -> None:
        super().__pydantic_init_subclass__(**kw)
        cls._DEFAULTS = {n: f.get_default(call_default_factory=True)
                         for n, f in cls.model_fields.items() if not f.is_required()}

    def pack(self) -> bytes:
        """The msgpack map of the fields (not a model dump: user values inside ``args`` keep
        their own ext types, a pydantic model stays a model)."""
        d = self._DEFAULTS
        return pack({k: v for k, v in self.__dict__.items() if k not in d or v != d[k]})

    @classmethod
    def unpack(cls: type[_B], data: bytes, refs: list[Ref] | None = None) -> _B:
        """Decode a body (refs collected as :func:`unpack` does); ProtocolError if malformed."""
        try:
            return cls.model_validate(unpack(data, refs))
        except ValidationError as e:
            raise ProtocolError(f"malformed {cls.__name__}: {e}") from None


_B = TypeVar("_B", bound=Body)


# Mutable defaults are factories: pydantic would copy a literal [] for every body built.


class CallBody(Body):
    args: list[Any] = Field(default_factory=list)
    kwargs: dict[str, Any] = Field(default_factory=dict)
    #: for kind "method": which method.
    method: str | None = None
    #: seconds the caller waits, counted from when Redis queued the call (the time in its inbox
    #: entry id, by Redis's clock); past it the worker skips the call. Relative, so that no two
    #: hosts' clocks are ever compared (an absolute deadline from a host whose clock is ahead
    #: or behind would skip every call or none).
    timeout: float | None = None
    #: write the reply as stream events even if ``reply`` is not a generator
    stream: bool = False
    #: the caller's W3C trace context (``traceparent``, ``tracestate``) when tracing is on;
    #: left out of the packed body otherwise (:mod:`busagent.tracing`).
    trace: dict[str, str] | None = None
    #: the agents up the stack of this call, ``[agent id, name, call id]`` outermost first
    #: (:mod:`busagent.callchain`; ``[agent id, name]`` from an older sender, the call
    #: unknown); empty from a program's own code, so left out of the body.
    chain: list[tuple[str, str, str] | tuple[str, str]] = Field(default_factory=list)


class CreateBody(Body):
    cls: str = Field(pattern=r"^[\w.]+:[\w.]+$")
    name: str
    args: list[Any] = Field(default_factory=list)
    kwargs: dict[str, Any] = Field(default_factory=dict)
    #: memory to start with (``agent.to_dist()`` carries the local agent's memory over), in
    #: memory's own exact encoding (:func:`busagent.memory.to_json`), one JSON text an item.
    memory: list[str] = Field(default_factory=list)
    #: declared state to load after the constructor (``to_dist()``), as
    #: :func:`busagent.memory.to_json` encodes ``Agent.state_dict()``.
    state: str | None = None


class CreateBatch(Body):
    """``busagent.create_many``: the agents to build; their specs are in ``{p}:specs``."""

    agents: list[str]


class DeliverBody(Body):
    """Kind ``deliver``, a worker built-in: the agent observes what ``hub`` holds for it
    (``busagent.hub.deliver``); with ``speak`` it then takes a turn, ``reply()`` from memory,
    written as stream events for the task center. The reply is the count of messages
    observed, or the turn's reply."""

    hub: str
    speak: bool = False


class CancelBody(Body):
    """Kind ``cancel``: the call ids of the addressed agent's calls to cancel. Its own call id
    is fresh (nobody waits on it; routing needs one for its sent mark)."""

    calls: list[str]


class ControlBody(Body):
    """A server operation. ``wake`` ends the worker's own blocking read; it has no call id."""

    op: ControlOp
    agent: str | None = None


# --- replies -------------------------------------------------------------------------------------


class ErrorInfo(BaseModel):
    type: str
    message: str
    traceback: str = ""
    server: str = ""


class Reply(BaseModel):
    """A reply as it lies in ``{p}:reply:{call}``: ``{ok, value, error}`` in msgpack.

    Written by the worker and recovery through :meth:`ok` / :meth:`fail`, and by two scripts
    by hand, with error types checked against ``errors`` by a unit test: ``route.lua``
    (``UnknownAgent``) and ``move.lua`` (``DeadLettered``)."""

    success: bool = Field(alias="ok")
    value: Any = None
    error: ErrorInfo | None = None

    @staticmethod
    def ok(value: Any) -> bytes:
        """The encoded reply carrying ``value`` (NotSerializable, naming where in ``value``,
        if it cannot travel)."""
        try:
            return pack({"ok": True, "value": value, "error": None})
        except NotSerializable:
            pack(value)  # raises again, with the path inside the value rather than the reply
            raise

    @staticmethod
    def fail(err: BaseException, server: str = "", traceback: str = "") -> bytes:
        """The encoded error reply for ``err``: its code (busagent's class name survives the
        bus) and message, with where it happened. Never raises: texts that do not encode are
        made to (:func:`safe_text`), since a caller left without its error would wait out its
        deadline."""
        type_, message = code_of(err), safe_text(err)
        if isinstance(err, RemoteError):
            # Passed on (a failed input): the original type, message, traceback and server.
            type_, message = err.type, err.message
            traceback, server = err.traceback or traceback, err.server or server
        elif isinstance(err, BusagentError) and err.traceback and not traceback:
            traceback = err.traceback
        return pack({"ok": False, "value": None, "error": {
            "type": safe_text(type_), "message": safe_text(message),
            "traceback": safe_text(traceback), "server": safe_text(server)}})

    @classmethod
    def parse(cls, data: bytes) -> Reply:
        try:
            return cls.model_validate(unpack(data))
        except ValidationError as e:
            raise ProtocolError(f"malformed reply on the bus: {e}") from None

    def value_or_raise(self) -> Any:
        """The value, or the error raised as busagent's own class (or a RemoteError)."""
        if self.success:
            return self.value
        e = self.error
        if e is None:
            raise ProtocolError("an error reply without an error")
        raise from_wire(e.type, e.message, e.traceback, e.server)


# --- msgpack codec -----------------------------------------------------------------------------


def safe_text(value: Any) -> str:
    """``str(value)`` as text that always encodes as UTF-8: an error message or traceback must
    reach its caller whatever it holds (a lone surrogate from ``os.fsdecode`` is written as
    ``\\udcff``; a ``__str__`` that raises gives the type's name)."""
    try:
        text = str(value)
    except Exception:  # noqa: BLE001 - any __str__ may raise; the reply must still go out
        return f"<{type(value).__name__} whose str() raised>"
    try:
        text.encode()
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode()
    return text


@functools.cache  # per class: naming a script's class resolves a path on disk
def class_name(cls: type) -> str:
    """``module:qualname`` of a class whose instances travel (a pydantic model, an agent's
    class), named as :func:`busagent.classpath.class_path` names it: a class in the user's
    script goes by the script's file name, so a worker that loaded the script finds it."""
    if cls.__module__ == "__main__" and "<locals>" not in cls.__qualname__:
        try:
            return class_path(cls)[0]
        except ConfigError:
            pass  # an interactive session: the name below fails to resolve at the receiver
    return f"{cls.__module__}:{cls.__qualname__}"


#: what msgpack encodes itself (``default`` is not called for these exact types: the packer
#: runs with ``strict_types``, so that a tuple reaches ``default`` instead of becoming a list).
_NATIVE = (type(None), bool, int, float, str, bytes, list, dict)

#: a subclass of a built-in type travels as its base type (an IntEnum as its int, an
#: OrderedDict or defaultdict as a dict, a namedtuple as a tuple), as JSON would: the receiver
#: may not have the subclass, and a pydantic model is the way to send a type.
_BASES: tuple[tuple[type, Any], ...] = (
    (str, str.__str__), (int, int.__int__), (float, float.__float__), (bytes, bytes),
    (bytearray, bytes), (memoryview, bytes), (list, list), (dict, dict))


def _items(code: int, obj: Any) -> msgpack.ExtType:
    return msgpack.ExtType(code, pack(list(obj)))


def _default(obj: Any) -> Any:
    if isinstance(obj, tuple):
        return _items(EXT_TUPLE, obj)
    if isinstance(obj, frozenset):
        return _items(EXT_FROZENSET, obj)
    if isinstance(obj, set):
        return _items(EXT_SET, obj)
    if isinstance(obj, Msg):
        return msgpack.ExtType(EXT_MSG, pack(obj.to_wire()))
    wire = getattr(obj, "__busagent_wire__", None)
    if wire is not None:  # a placeholder or an agent handle (they know how they travel)
        code, payload = wire()
        if code == EXT_VALUE:  # a resolved placeholder travels as its value (see Placeholder)
            # msgpack applies ``default`` once per object: convert the value here if need be.
            return payload if type(payload) in _NATIVE else _default(payload)
        return msgpack.ExtType(code, pack(payload) if code == EXT_AGENT else payload.encode())
    if isinstance(obj, Ref):
        return msgpack.ExtType(EXT_REF, obj.call_id.encode())
    if isinstance(obj, BaseModel):
        return msgpack.ExtType(EXT_MODEL, pack([class_name(type(obj)),
                                                obj.model_dump(mode="python")]))
    for base, convert in _BASES:
        if isinstance(obj, base):
            return convert(obj)
    raise NotSerializable(
        f"a value of type {type(obj).__name__} cannot travel on the bus; use msgpack-able "
        "values (None, bool, int, float, str, bytes, list, dict), Msg, a pydantic model, a "
        "placeholder or a distributed agent"
    )


def pack(obj: Any) -> bytes:
    """Encode a value for the bus. Raises NotSerializable naming where in ``obj`` the first
    value that cannot travel is (``[2].content['k']``) and why."""
    try:
        return msgpack.packb(obj, default=_default, use_bin_type=True,  # type: ignore[no-any-return]
                             strict_types=True)
    except Exception as e:  # noqa: BLE001 - whatever a value's own code raises, it cannot travel
        # Only on failure: walk the value again to say where (no cost on the hot path).
        where, why = _locate(obj, "", e)
        at = f" at {where}" if where else ""
        raise NotSerializable(f"cannot encode the value{at}: {why}") from None


def _locate(obj: Any, where: str, err: BaseException) -> tuple[str, str]:
    """(path, reason) of the first part of ``obj`` that does not encode."""
    if isinstance(obj, Msg):
        parts: list[tuple[str, Any]] = [(f".{k}", v) for k, v in obj.to_wire().items()]
    elif isinstance(obj, list | tuple | set | frozenset):
        parts = [(f"[{i}]", v) for i, v in enumerate(obj)]
    elif isinstance(obj, dict):
        parts = [(f"[{k!r}] (key)", k) for k in obj] + [(f"[{k!r}]", v) for k, v in obj.items()]
    elif isinstance(obj, BaseModel):
        parts = [(f".{k}", v) for k, v in obj.__dict__.items()]
    else:
        parts = []
    for sub, value in parts:
        try:
            msgpack.packb(value, default=_default, use_bin_type=True, strict_types=True)
        except Exception as e:  # noqa: BLE001 - any failure is the one we are looking for
            return _locate(value, where + sub, e)
    if isinstance(err, UnicodeEncodeError):
        return where, f"text that is not valid Unicode ({safe_text(err)})"
    if isinstance(err, NotSerializable):
        return where, str(err).removeprefix("cannot encode the value: ")
    return where, safe_text(err)


def _model_class(path: str) -> type[BaseModel]:
    # Only classes already imported here: decoding must never import code on a sender's word.
    found, obj = find(path)
    if not found:
        raise ProtocolError(
            f"pydantic model {path!r} is not loaded in this process; load its module in the worker "
            "(--agents MODULE)"
        )
    if not (isinstance(obj, type) and issubclass(obj, BaseModel)):
        raise ProtocolError(f"{path!r} is not a pydantic model")
    return obj


def unpack(data: bytes, refs: list[Ref] | None = None) -> Any:
    """Decode bytes from the bus. A placeholder reference becomes a
    :class:`~busagent.placeholder.Placeholder`, and an agent handle a
    :class:`~busagent.proxy.RemoteAgent`, at any depth; with ``refs`` given (a worker reading
    a call's inputs) references become :class:`Ref` objects instead and are appended to
    ``refs``, so the worker can resolve them before the call runs."""

    def ext_hook(code: int, payload: bytes) -> Any:
        if code == EXT_MSG:
            fields = unpack(payload, refs)
            if not isinstance(fields, dict):
                raise ProtocolError("a Msg on the bus must be a map")
            return Msg.model_validate(fields)
        if code == EXT_REF:
            if refs is None:
                return _placeholder(payload.decode())
            ref = Ref(payload.decode())
            refs.append(ref)
            return ref
        if code == EXT_MODEL:
            path, fields = unpack(payload, refs)
            return _model_class(path).model_validate(fields)
        if code == EXT_AGENT:
            return _agent(unpack(payload))
        if code in _COLLECTIONS:
            items = unpack(payload, refs)
            if not isinstance(items, list):
                raise ProtocolError(f"extension type {code} on the bus must be an array")
            return _COLLECTIONS[code](items)
        raise ProtocolError(f"unknown msgpack extension type {code}")

    try:
        return msgpack.unpackb(data, ext_hook=ext_hook, raw=False, strict_map_key=False)
    except (ProtocolError, NotSerializable):
        raise
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError,
            msgpack.StackError, ValidationError) as e:
        raise ProtocolError(f"malformed data on the bus: {e}") from None


_COLLECTIONS: dict[int, type] = {EXT_TUPLE: tuple, EXT_SET: set, EXT_FROZENSET: frozenset}


def _placeholder(call_id: str) -> Any:
    # Imported here: placeholders are built on replies, which are built on this module.
    from .placeholder import Placeholder

    return Placeholder(call_id)


def _agent(fields: Any) -> Any:
    from .proxy import RemoteAgent

    if not (isinstance(fields, list) and len(fields) == 4 and all(isinstance(f, str)
                                                                   for f in fields)):
        raise ProtocolError("an agent handle on the bus must be [id, name, class, server]")
    return RemoteAgent.from_wire(*fields)


def _rebuilt(kind: type, items: list[Any]) -> Any:
    # A placeholder can be a set's item or a dict's key (it hashes by identity); its value
    # may not hash at all, and the agent must get a clear error rather than a TypeError.
    try:
        return kind(items)
    except TypeError:
        raise NotSerializable(
            f"a placeholder inside a {kind.__name__} (an item of a set or a key of a dict) "
            "resolved to a value that cannot be one (it is unhashable); pass its value instead"
        ) from None


def substitute(obj: Any, values: dict[str, Any]) -> Any:
    """``obj`` with every Ref replaced by its resolved value (Msgs and containers walked)."""
    if isinstance(obj, Ref):
        return values[obj.call_id]
    if isinstance(obj, list | tuple | set | frozenset):
        out = [substitute(x, values) for x in obj]
        if all(a is b for a, b in zip(out, obj, strict=False)):
            return obj
        return out if isinstance(obj, list) else _rebuilt(type(obj), out)
    if isinstance(obj, dict):
        pairs = [(substitute(k, values), substitute(v, values)) for k, v in obj.items()]
        if all(k2 is k and v2 is v for (k2, v2), (k, v) in zip(pairs, obj.items(), strict=True)):
            return obj
        return _rebuilt(dict, pairs)
    if isinstance(obj, Msg):
        content = substitute(obj.content, values)
        if content is not obj.content:
            return obj.model_copy(update={"content": content})
        return obj
    if isinstance(obj, BaseModel):  # a user's model with a placeholder in a field
        changed = {k: v2 for k, v in obj.__dict__.items()
                   if (v2 := substitute(v, values)) is not v}
        return obj.model_copy(update=changed) if changed else obj
    return obj
