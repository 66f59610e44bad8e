"""The executor's I/O on a real bus (:class:`.executor.CallIO`): peeking and waiting for the
replies of forwarded placeholders, writing streamed replies, and hub delivery. Kept apart from
:mod:`.executor` so that running a call depends on no Redis and no hub code."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable

from busagent import hub, replies, stream
from busagent.agent import Agent
from busagent.bus import Bus
from busagent.protocol import check_size
from busagent.sender import REDIS_DOWN
from busagent.stream import Event


class BusIO:
    """:class:`CallIO` on a :class:`busagent.bus.Bus`."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.r = bus.redis
        self.keys = bus.keys

    def check_size(self, body: bytes, what: str) -> None:
        check_size(body, self.bus.settings.max_message_bytes, what)

    def peek(self, call_ids: list[str]) -> list[bytes | None]:
        try:
            got = replies.peek(self.bus, call_ids)
        except REDIS_DOWN:
            # Redis closed the connection (down, or a reply over its output-buffer limit):
            # none is taken as there, and the wait (:meth:`fetch`) tells the two apart.
            got = {}
        return [got.get(c) for c in call_ids]

    async def fetch(self, call_ids: list[str], timeout: float | None) -> dict[str, bytes]:
        return await replies.afetch(self.bus, call_ids, timeout)

    def stream(self, call: str, events: Iterable[Event]) -> None:
        # A call run again after a crash starts its stream over (a new start): reset the key.
        key, it = self.keys.chunks(call), iter(events)
        pipe = self.r.pipeline(transaction=False)
        pipe.delete(key)
        pipe.xadd(key, stream.fields(next(it)))
        pipe.expire(key, self.bus.settings.reply_ttl)
        pipe.execute()
        for ev in it:
            f, err = stream.checked(ev)
            self.r.xadd(key, f)
            if err is not None:
                raise err

    async def astream(self, call: str, events: AsyncIterator[Event]) -> None:
        key, ar = self.keys.chunks(call), self.bus.async_client()
        async with ar.pipeline(transaction=False) as pipe:
            pipe.delete(key)
            pipe.xadd(key, stream.fields(await events.__anext__()))
            pipe.expire(key, self.bus.settings.reply_ttl)
            await pipe.execute()
        async for ev in events:
            f, err = stream.checked(ev)
            await ar.xadd(key, f)
            if err is not None:
                raise err

    def deliver(self, agent: Agent, hub_name: str) -> int:
        return hub.deliver(agent, hub_name)
