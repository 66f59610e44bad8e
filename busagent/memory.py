"""An agent's memory: an ordered list of messages.

On a worker the memory is persisted to ``{prefix}:memory:{agent}`` (a Redis list, one JSON
element per item, readable with ``LRANGE``) in the same transaction that writes the call's reply,
so what is in Redis is always the memory as of the last completed call. To make that cheap the
memory records what changed since the last save instead of rewriting the whole list.

The encoding is JSON, exact first: what ``memory.get()`` returns on any process, and after
recovery, equals what was added. A Msg is stored as its plain fields (readable in redis-cli);
JSON-native values stay as they are; everything JSON would change or cannot hold is tagged
with a one-key object whose key starts with ``$``:

* ``{"$b64": ...}`` bytes, ``{"$tuple": [...]}``, ``{"$set": [...]}``, ``{"$frozenset": [...]}``,
  ``{"$msg": {...}}`` a
  nested Msg, ``{"$model": "module:Class", "data": {...}}`` a pydantic model, ``{"$agent":
  [id, name, class, server]}`` a distributed agent's handle;
* ``{"$map": [[key, value], ...]}`` a dict whose keys are not all strings, or whose keys include
  one starting with ``$`` (so a user's ``{"$b64": "aGk="}`` comes back as that dict, not bytes);
* ``{"$dict": {...}}`` a dict stored as an item itself (a bare object is a Msg's fields).

A placeholder is stored as its value (resolved first where blocking is allowed). Anything else is
refused with NotSerializable naming where it is: memory never holds a repr.

``Memory.add`` applies both rules when the item is added, local agent or distributed alike: a
placeholder at any depth is replaced by its value, and an item that cannot be stored is refused
then, not at ``to_dist()`` or at the call's commit. It costs one JSON encoding of each item
added (the commit encodes it again, as it is then: an item changed in place after ``add`` is
stored as changed).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable, Sequence
from typing import Any

from pydantic import BaseModel

from .errors import NotSerializable, UsageError
from .message import Msg

_MSG_FIELDS = ("name", "content", "role", "metadata", "url", "id", "timestamp")
_MSG_KEYS = frozenset(("name", "id", "timestamp"))


def _enc(v: Any, where: str) -> Any:
    """``v`` as JSON-able data that :func:`_dec` turns back into ``v`` exactly."""
    if v is None or isinstance(v, str | bool | int | float):
        return v
    if isinstance(v, list):
        return [_enc(x, f"{where}[{i}]") for i, x in enumerate(v)]
    if isinstance(v, dict):
        if all(isinstance(k, str) and not k.startswith("$") for k in v):
            return {k: _enc(x, f"{where}[{k!r}]") for k, x in v.items()}
        return {"$map": [[_enc(k, f"{where} (key {k!r})"), _enc(x, f"{where}[{k!r}]")]
                         for k, x in v.items()]}
    if isinstance(v, Msg):
        return {"$msg": _msg_fields(v, where)}
    if isinstance(v, bytes):
        return {"$b64": base64.b64encode(v).decode()}
    if isinstance(v, tuple):
        return {"$tuple": [_enc(x, f"{where}[{i}]") for i, x in enumerate(v)]}
    if isinstance(v, frozenset):
        return {"$frozenset": [_enc(x, f"{where}[{i}]") for i, x in enumerate(v)]}
    if isinstance(v, set):
        return {"$set": [_enc(x, f"{where}[{i}]") for i, x in enumerate(v)]}
    if isinstance(v, BaseModel):
        from .protocol import class_name

        return {"$model": class_name(type(v)),
                "data": _enc(dict(v.__dict__), where)}
    wire = getattr(v, "__busagent_wire__", None)
    if wire is not None:
        from .protocol import EXT_AGENT

        code, _ = wire()
        if code == EXT_AGENT:
            return {"$agent": wire()[1]}
        return _enc(_resolved(v, where), where)
    raise NotSerializable(
        f"memory cannot store a {type(v).__name__} (at {where or 'the item'}); store data "
        "(None, bool, int, float, str, bytes, list, tuple, set, dict), a Msg, a pydantic model, "
        "a placeholder or a distributed agent"
    )


def _values(v: Any, where: str) -> Any:
    """``v`` with every placeholder in it replaced by its value (``v`` itself if it holds none):
    memory keeps values, as Redis does, never a placeholder object."""
    if type(v) in _PLAIN:
        return v
    wire = getattr(v, "__busagent_wire__", None)
    if wire is not None:
        from .protocol import EXT_AGENT

        if wire()[0] == EXT_AGENT:
            return v
        return _values(_resolved(v, where), where)
    if isinstance(v, list | tuple | set | frozenset):
        out = [_values(x, f"{where}[{i}]") for i, x in enumerate(v)]
        if all(a is b for a, b in zip(out, v, strict=False)):
            return v
        return out if isinstance(v, list) else _rebuilt(type(v), out, where)
    if isinstance(v, dict):
        pairs = [(_values(k, f"{where} (key {k!r})"), _values(x, f"{where}[{k!r}]"))
                 for k, x in v.items()]
        if all(k2 is k and x2 is x for (k2, x2), (k, x) in zip(pairs, v.items(), strict=True)):
            return v
        return _rebuilt(dict, pairs, where)
    if isinstance(v, BaseModel):  # a Msg's content and metadata, a user's model's fields
        changed = {k: x2 for k, x in v.__dict__.items()
                   if (x2 := _values(x, f"{where}.{k}")) is not x}
        return v.model_copy(update=changed) if changed else v
    return v


_PLAIN = frozenset({type(None), str, bool, int, float, bytes})


def _rebuilt(kind: type, items: list[Any], where: str) -> Any:
    try:
        return kind(items)
    except TypeError:  # a placeholder as a set item or dict key, whose value is unhashable
        raise NotSerializable(
            f"memory cannot store {where or 'the item'}: a placeholder in a {kind.__name__} "
            "resolved to an unhashable value"
        ) from None


def _resolved(p: Any, where: str) -> Any:
    """A placeholder's value for memory: memory stores values, never a call id that expires."""
    try:
        return p.result()
    except UsageError as e:  # a blocking read inside an event loop (an async reply)
        raise NotSerializable(
            f"memory cannot store the pending placeholder at {where or 'the item'} from async "
            f"code: `await` it and add its value ({e})"
        ) from None


def _dec(v: Any) -> Any:
    if isinstance(v, list):
        return [_dec(x) for x in v]
    if not isinstance(v, dict):
        return v
    if len(v) == 1:
        (tag, x), = v.items()
        if tag == "$msg":
            return _msg(x)
        if tag == "$b64":
            return base64.b64decode(x)
        if tag == "$tuple":
            return tuple(_dec(i) for i in x)
        if tag == "$set":
            return {_dec(i) for i in x}
        if tag == "$frozenset":
            return frozenset(_dec(i) for i in x)
        if tag == "$map":
            return {_dec(k): _dec(i) for k, i in x}
        if tag == "$dict":
            return _dec(x)
        if tag == "$agent":
            from .proxy import RemoteAgent

            return RemoteAgent.from_wire(*x)
    if len(v) == 2 and "$model" in v:
        from .protocol import _model_class

        return _model_class(v["$model"]).model_validate(_dec(v["data"]))
    return {k: _dec(x) for k, x in v.items()}


def _msg_fields(m: Msg, where: str) -> dict[str, Any]:
    return {"name": m.name, "content": _enc(m.content, f"{where}.content"), "role": m.role,
            "metadata": _enc(m.metadata, f"{where}.metadata"), "url": m.url, "id": m.id,
            "timestamp": m.timestamp}


def _msg(d: dict[str, Any]) -> Msg:
    return Msg.model_validate({k: _dec(d.get(k)) for k in _MSG_FIELDS if k in d})


def to_json(item: Any, where: str = "") -> str:
    """One memory item as JSON (see the module's docstring); a Msg as its plain fields.
    Raises NotSerializable naming where in ``item`` a value cannot be stored."""
    if isinstance(item, Msg):
        data: Any = _msg_fields(item, where)
    elif isinstance(item, dict):
        data = {"$dict": _enc(item, where)}
    else:
        data = _enc(item, where)
    try:
        text = json.dumps(data, ensure_ascii=False, allow_nan=True)
        text.encode()
    except UnicodeEncodeError:
        # Text that is not valid Unicode (a lone surrogate from os.fsdecode): JSON's \u
        # escapes keep it exactly, at the price of escaping this item's other non-ASCII text.
        text = json.dumps(data, ensure_ascii=True)
    return text


def from_json(text: str | bytes) -> Any:
    data = json.loads(text)
    if isinstance(data, dict) and data.keys() >= _MSG_KEYS:
        return _msg(data)
    return _dec(data)


class Memory:
    """``add``, ``get``, ``clear``, ``size``: what AgentScope's TemporaryMemory offers that agents
    use."""

    def __init__(self, items: Iterable[Any] = ()) -> None:
        self._items: list[Any] = list(items)
        # Changes since the last save: (cleared, index of the first unsaved item).
        self._cleared = False
        self._saved = len(self._items)
        #: the items as last saved, kept from a clear until the next save.
        self._before: list[Any] | None = None

    def add(self, item: Any | Sequence[Any] | None) -> None:
        """Append a message (or each of a list of them). None is ignored, as in AgentScope.

        A placeholder, at any depth, is stored as its value (blocking until it is there).
        Raises NotSerializable naming where (``memory item 3.content['k']``) if an item cannot
        be stored or holds a placeholder still pending in async code, and a failed
        placeholder's error; then nothing of ``item`` is added."""
        item = _values(item, f"memory item {len(self._items)}")
        if item is None:
            return
        items = [x for x in item if x is not None] if isinstance(item, list | tuple) else [item]
        added = []
        for n, x in enumerate(items, len(self._items)):
            to_json(x, f"memory item {n}")  # refused now, not at the commit or to_dist()
            added.append(x)
        self._items.extend(added)

    def get(self, recent_n: int | None = None) -> list[Any]:
        if recent_n is None:
            return list(self._items)
        return self._items[-recent_n:] if recent_n > 0 else []

    def clear(self) -> None:
        if not self._cleared:
            self._before = self._items[: self._saved]  # what undo_changes goes back to
        self._items = []
        self._cleared = True
        self._saved = 0

    def size(self) -> int:
        return len(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def take_changes(self) -> tuple[bool, list[str]]:
        """(whether the list must be rewritten from scratch, JSON items to append), and mark
        everything saved. Raises NotSerializable, naming the item, if one cannot be stored;
        then nothing is marked saved (see :meth:`undo_changes`)."""
        cleared = self._cleared
        start = 0 if cleared else min(self._saved, len(self._items))
        new = [to_json(x, f"memory item {i}") for i, x in enumerate(self._items[start:], start)]
        self._cleared = False
        self._before = None
        self._saved = len(self._items)
        return cleared, new

    def undo_changes(self) -> None:
        """Go back to the memory as last saved: a call whose memory cannot be stored fails,
        and the agent must not keep in this process what Redis (and a rebuilt agent) lacks."""
        if self._before is not None:
            self._items = self._before
        else:
            del self._items[self._saved:]
        self._before = None
        self._cleared = False
        self._saved = len(self._items)


# --- reading memory without its classes (the CLI, the studio) -----------------------------------


def is_msg(data: Any) -> bool:
    """Whether a stored item (its JSON, decoded as JSON only) is a Msg's plain fields."""
    return isinstance(data, dict) and data.keys() >= _MSG_KEYS


def render(data: Any) -> str:
    """A stored item or value (its JSON, decoded as JSON only) as Python-like text, from its
    encoding alone, so a reader without the user's classes shows it exactly and never fails:
    ``{1: 'one'}``, ``(1, 2)``, ``frozenset({1})``, ``b'hi'``, ``t3:P(x=1)`` for a pydantic
    model, ``Msg(name='a', role='user', content=...)`` for a Msg."""
    if is_msg(data):
        return _render_msg(data)
    if isinstance(data, dict) and len(data) == 1 and "$dict" in data:
        return _r(data["$dict"])
    return _r(data)


def _render_msg(d: dict[str, Any]) -> str:
    return f"Msg(name={d.get('name')!r}, role={d.get('role')!r}, content={_r(d.get('content'))})"


def _r(v: Any) -> str:
    if isinstance(v, list):
        return "[" + ", ".join(_r(x) for x in v) + "]"
    if not isinstance(v, dict):
        return repr(v)
    if len(v) == 1:
        (tag, x), = v.items()
        try:
            if tag == "$msg":
                return _render_msg(x)
            if tag == "$b64":
                return repr(base64.b64decode(x))
            if tag == "$tuple":
                return "(" + ", ".join(_r(i) for i in x) + ("," if len(x) == 1 else "") + ")"
            if tag == "$set":
                return "{" + ", ".join(_r(i) for i in x) + "}" if x else "set()"
            if tag == "$frozenset":
                return "frozenset({" + ", ".join(_r(i) for i in x) + "})" if x else "frozenset()"
            if tag == "$map":
                return "{" + ", ".join(f"{_r(k)}: {_r(i)}" for k, i in x) + "}"
            if tag == "$dict":
                return _r(x)
            if tag == "$agent":
                return f"RemoteAgent(agent_id={x[0]!r}, name={x[1]!r}, cls={x[2]!r})"
        except (TypeError, ValueError, IndexError):
            pass  # not the shape memory writes (edited by hand): shown as the JSON it is
    if len(v) == 2 and "$model" in v and isinstance(v.get("data"), dict):
        fields = v["data"]
        if all(isinstance(k, str) for k in fields):
            return f"{v['$model']}(" + ", ".join(f"{k}={_r(x)}" for k, x in fields.items()) + ")"
    return "{" + ", ".join(f"{_r(k)}: {_r(x)}" for k, x in v.items()) + "}"
