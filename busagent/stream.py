"""Streamed replies: an agent whose ``reply`` is a generator (sync or async) streams its pieces.

Each piece travels as an event on ``{p}:chunks:{call}``, a Redis stream that expires like the
reply: ``start``, then ``chunk`` events with sequence numbers 1, 2, ..., then ``end`` or
``error``. Control events are never mixed into the text: a chunk is only ever the agent's data.
Any process holding the call id follows the stream from its start, any number of times:

    p = writer.stream(Msg("user", "a story"))     # or writer(...): the same placeholder
    for event in p.stream():                      # start, chunk, chunk, ..., end
        if event.type == "chunk":
            print(event.data, end="")
    p.result()                                    # the joined text, as a normal reply

A call to a non-streaming reply made with ``agent.stream(...)`` also gets the events: ``start``,
one ``chunk`` holding the whole value, ``end``. So a follower never needs to know which it was.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from typing import Any, Literal

from pydantic import BaseModel

from . import bus as _bus
from .errors import CallTimeout, NotSerializable, code_of
from .protocol import pack, safe_text, unpack

EventType = Literal["start", "chunk", "end", "error"]


class Event(BaseModel):
    """One event of a streamed reply. ``seq`` counts from 0 (``start``); ``data`` is the piece
    for ``chunk``, ``{agent, name}`` for ``start``, ``{type, message}`` for ``error``."""

    call: str
    seq: int
    type: EventType
    data: Any = None


class Emitter:
    """Numbers one reply's events and keeps its pieces, so a worker writing them to Redis and
    the task center running a local agent produce the same sequence."""

    def __init__(self, call: str) -> None:
        self.call = call
        self.pieces: list[Any] = []

    def start(self, agent_id: str, name: str) -> Event:
        return Event(call=self.call, seq=0, type="start", data={"agent": agent_id, "name": name})

    def chunk(self, piece: Any) -> Event:
        self.pieces.append(piece)
        return Event(call=self.call, seq=len(self.pieces), type="chunk", data=piece)

    def end(self) -> Event:
        return Event(call=self.call, seq=len(self.pieces) + 1, type="end")

    def error(self, err: BaseException) -> Event:
        return Event(call=self.call, seq=len(self.pieces) + 1, type="error",
                     data={"type": safe_text(code_of(err)), "message": safe_text(err)})

    def joined(self) -> Any:
        return joined(self.pieces)


def fields(ev: Event) -> dict[Any, Any]:
    """An event as the fields of its stream entry (NotSerializable if its data cannot travel)."""
    return {"seq": str(ev.seq).encode(), "type": ev.type.encode(), "data": pack(ev.data)}


def checked(ev: Event) -> tuple[dict[Any, Any], NotSerializable | None]:
    """:func:`fields`, or for a chunk that cannot travel the fields of an ``error`` event in its
    place and the error to fail the call with: followers see the stream end with the reason
    at once, instead of waiting for an ``end`` that never comes."""
    try:
        return fields(ev), None
    except NotSerializable as e:
        err = NotSerializable(f"streamed chunk {ev.seq} cannot travel on the bus: {e}")
        return fields(Event(call=ev.call, seq=ev.seq, type="error",
                            data={"type": err.code, "message": str(err)})), err


def joined(pieces: Sequence[Any]) -> Any:
    """The whole reply of a stream: the text if every piece was text, else the list."""
    if all(isinstance(p, str) for p in pieces):
        return "".join(pieces)
    return list(pieces)


def follow(call_ids: Sequence[str], timeout: float | None = None,
           block_ms: int = 1000) -> Iterator[Event]:
    """The events of several calls' streams as they come, each stream from its start, until
    every one has ended (``end`` or ``error``). Raises CallTimeout when ``timeout`` passes."""
    b = _bus.current()
    cursors = {b.keys.chunks(c): "0-0" for c in call_ids}
    calls = {b.keys.chunks(c): c for c in call_ids}
    deadline = None if timeout is None else time.monotonic() + timeout
    while cursors:
        wait = block_ms
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise CallTimeout(f"stream(s) {sorted(calls[k] for k in cursors)} did not end "
                                  f"within {timeout} s; pass a longer timeout")
            wait = max(1, min(block_ms, int(left * 1000)))
        with b.errors():
            got: Any = b.redis.xread(dict[Any, Any](cursors), block=wait, count=500)
        for key_raw, entries in got or []:
            key = key_raw.decode() if isinstance(key_raw, bytes) else key_raw
            for entry_id, f in entries:
                cursors[key] = entry_id
                ev = Event(call=calls[key], seq=int(f[b"seq"]), type=f[b"type"].decode(),
                           data=unpack(f[b"data"]))
                yield ev
                if ev.type in ("end", "error"):
                    cursors.pop(key, None)
                    break
