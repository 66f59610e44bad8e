"""An agent's memory: an ordered list of messages.

On a worker the memory is persisted to ``{prefix}:memory:{agent}`` (a Redis list, one JSON Msg per
element, readable with ``LRANGE``) in the same transaction that writes the call's reply, so what is
in Redis is always the memory as of the last completed call. To make that cheap the memory records
what changed since the last save instead of rewriting the whole list.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

from .message import Msg


def to_json(item: Any) -> str:
    if isinstance(item, Msg):
        return item.model_dump_json()
    return json.dumps(item, default=repr)


def from_json(text: str | bytes) -> Any:
    data = json.loads(text)
    if isinstance(data, dict) and {"name", "id", "timestamp"} <= data.keys():
        return Msg.model_validate_json(text)
    return data


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
