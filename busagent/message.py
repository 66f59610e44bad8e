"""``Msg``: what agents say to each other."""

from __future__ import annotations

import time
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from .ids import new_id

_second: tuple[int, str] = (0, "")


def _now() -> str:
    """Local time with milliseconds; the formatted second is cached (strftime is slow)."""
    global _second
    t = time.time()
    s = int(t)
    if _second[0] != s:
        _second = (s, time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s)))
    return f"{_second[1]}.{int((t - s) * 1000):03d}"


class Msg(BaseModel):
    """A message: ``Msg(name, content, role="user", metadata=None, url=None)``.

    ``content`` is any value msgpack can carry (None, bool, int, float, str, bytes, lists, dicts)
    and may nest other Msgs or placeholders.
    """

    model_config = ConfigDict(ser_json_bytes="base64", val_json_bytes="base64")

    name: str
    content: Any = None
    role: str = "user"
    metadata: dict[str, Any] | None = None
    url: str | list[str] | None = None
    id: str = Field(default_factory=new_id)
    timestamp: str = Field(default_factory=_now)

    def __init__(
        self,
        name: str,
        content: Any = None,
        role: str = "user",
        metadata: dict[str, Any] | None = None,
        url: str | list[str] | None = None,
        **data: Any,
    ) -> None:
        super().__init__(
            name=name, content=content, role=role, metadata=metadata, url=url, **data
        )

    def to_wire(self) -> dict[str, Any]:
        """The fields as a plain dict, content untouched (the codec encodes what it holds)."""
        return {
            "name": self.name,
            "content": self.content,
            "role": self.role,
            "metadata": self.metadata,
            "url": self.url,
            "id": self.id,
            "timestamp": self.timestamp,
        }
