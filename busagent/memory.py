"""An agent's memory: an ordered list of messages.

On a worker the memory is persisted to ``{prefix}:memory:{agent}`` (a Redis list, one JSON Msg per
element, readable with ``LRANGE``) in the same transaction that writes the call's reply, so what is
in Redis is always the memory as of the last completed call. To make that cheap the memory records
what changed since the last save instead of rewriting the whole list.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable, Sequence
from typing import Any

from pydantic import BaseModel

from .message import Msg

_MSG_FIELDS = ("name", "content", "role", "metadata", "url", "id", "timestamp")


def _enc(v: Any) -> Any:
    """JSON-able and still readable: bytes, nested Msgs and pydantic models are tagged so they
    come back as they were (a recovered agent must get its memory back exactly)."""
    if v is None or isinstance(v, str | int | float | bool):
        return v
    if isinstance(v, Msg):
        return {"$msg": _msg_fields(v)}
    if isinstance(v, bytes):
        return {"$b64": base64.b64encode(v).decode()}
    if isinstance(v, list | tuple):
        return [_enc(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _enc(x) for k, x in v.items()}
    if isinstance(v, BaseModel):
        cls = type(v)
        return {"$model": f"{cls.__module__}:{cls.__qualname__}", "data": _enc(v.model_dump())}
    return repr(v)


def _dec(v: Any) -> Any:
    if isinstance(v, list):
        return [_dec(x) for x in v]
    if not isinstance(v, dict):
        return v
    if len(v) == 1 and "$msg" in v:
        return _msg(v["$msg"])
    if len(v) == 1 and "$b64" in v:
        return base64.b64decode(v["$b64"])
    if len(v) == 2 and "$model" in v:
        from .protocol import _model_class

        return _model_class(v["$model"]).model_validate(_dec(v["data"]))
    return {k: _dec(x) for k, x in v.items()}


def _msg_fields(m: Msg) -> dict[str, Any]:
    return {"name": m.name, "content": _enc(m.content), "role": m.role,
            "metadata": _enc(m.metadata), "url": m.url, "id": m.id, "timestamp": m.timestamp}


def _msg(d: dict[str, Any]) -> Msg:
    return Msg.model_validate({k: _dec(d.get(k)) for k in _MSG_FIELDS if k in d})


def to_json(item: Any) -> str:
    """One memory element as JSON; a Msg is stored as its plain fields, readable in redis-cli."""
    if isinstance(item, Msg):
        return json.dumps(_msg_fields(item), ensure_ascii=False)
    return json.dumps(_enc(item), ensure_ascii=False)


def from_json(text: str | bytes) -> Any:
    data = json.loads(text)
    if isinstance(data, dict) and {"name", "id", "timestamp"} <= data.keys():
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

    def add(self, item: Any | Sequence[Any] | None) -> None:
        """Append a message (or each of a list of them). None is ignored, as in AgentScope."""
        if item is None:
            return
        if isinstance(item, list | tuple):
            self._items.extend(x for x in item if x is not None)
        else:
            self._items.append(item)

    def get(self, recent_n: int | None = None) -> list[Any]:
        if recent_n is None:
            return list(self._items)
        return self._items[-recent_n:] if recent_n > 0 else []

    def clear(self) -> None:
        self._items.clear()
        self._cleared = True
        self._saved = 0

    def size(self) -> int:
        return len(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def take_changes(self) -> tuple[bool, list[str]]:
        """(whether the list must be rewritten from scratch, JSON items to append), and mark
        everything saved."""
        cleared = self._cleared
        start = 0 if cleared else min(self._saved, len(self._items))
        new = [to_json(x) for x in self._items[start:]]
        self._cleared = False
        self._saved = len(self._items)
        return cleared, new
