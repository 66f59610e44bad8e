"""Placeholders: what calling a distributed agent returns at once.

A placeholder is a call id. Its reply lives in Redis at ``{prefix}:reply:<call id>`` for
``reply_ttl`` seconds, so any process that holds the id (the caller, or an agent it was passed
to) can resolve it, any number of times. Passed to another agent it travels as a reference and
the receiving worker reads the value from Redis itself.
"""

from __future__ import annotations

import asyncio
from collections.abc import Generator, Iterable, Iterator, Sequence
from typing import Any

from . import bus as _bus
from . import replies
from .errors import BusagentError, UsageError

_UNSET: Any = object()


class Placeholder:
    """Reading any field (``.content``, ``.name``...) blocks until the reply is there;
    ``.result(timeout=)`` too; ``await placeholder`` in asyncio code."""

    __slots__ = ("_error", "_value", "agent_id", "call_id")

    def __init__(self, call_id: str, agent_id: str = "") -> None:
        self.call_id = call_id
        self.agent_id = agent_id
        self._value: Any = _UNSET
        self._error: BaseException | None = None

    @classmethod
    def from_id(cls, call_id: str) -> Placeholder:
        """A placeholder for a call id received from elsewhere (another process, a log)."""
        return cls(call_id)

    def __busagent_ref__(self) -> str:
        return self.call_id

    def _fail(self, err: BaseException) -> None:
        if self._value is _UNSET:
            self._error = err

    def _settle(self, data: bytes) -> None:
        try:
            self._value = replies.decode(data)
        except BusagentError as e:
            self._error = e

    def done(self) -> bool:
        """True once the reply has been read (never blocks)."""
        return self._value is not _UNSET or self._error is not None

    def result(self, timeout: float | object | None = replies.DEFAULT) -> Any:
        """The reply's value; raises RemoteError if the remote code raised, CallTimeout (a
        TimeoutError) when ``timeout`` (default: the ``call_timeout`` setting) passes."""
        if not self.done():
            _forbid_blocking_in_loop()
            b = _bus.current()
            # A send Redis refused fails its placeholder during the flush: raise that now, not
            # a CallTimeout at the deadline. The flush spends the deadline, not its own.
            timeout = replies.flush(b, timeout)
            if not self.done():
                self._settle(replies.fetch(b, [self.call_id], timeout)[self.call_id])
        return self._unwrap()

    def stream(self, timeout: float | None = None) -> Iterator[Any]:
        """The call's stream events (:class:`busagent.stream.Event`) from the start: ``start``,
        ``chunk``..., then ``end`` or ``error``. Only calls whose reply streams (a generator, or
        a call made with ``agent.stream(...)``) have them; others time out."""
        from .stream import follow

        _forbid_blocking_in_loop()
        yield from follow([self.call_id], timeout)

    def _unwrap(self) -> Any:
        if self._error is not None:
            raise self._error
        return self._value

    def __await__(self) -> Generator[Any, None, Any]:
        return _agather_one(self).__await__()

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.result(), name)

    def __repr__(self) -> str:
        state = "done" if self.done() else "pending"
        return f"Placeholder(call_id={self.call_id!r}, agent={self.agent_id!r}, {state})"


def _forbid_blocking_in_loop() -> None:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return
    raise UsageError(
        "a placeholder was resolved with a blocking read inside a running event loop; "
        "use `await placeholder` or `await busagent.agather(...)` in async code"
    )


async def _agather_one(p: Placeholder) -> Any:
    return (await agather([p]))[0]


def _collect(placeholders: Sequence[Placeholder]) -> tuple[list[str], dict[str, BaseException]]:
    pending = [p.call_id for p in placeholders if not p.done()]
    errors: dict[str, BaseException] = {
        p.call_id: p._error for p in placeholders if p._error is not None
    }
    return pending, errors


def _finish(placeholders: Sequence[Placeholder], got: dict[str, bytes],
            return_exceptions: bool) -> list[Any]:
    out: list[Any] = []
    for p in placeholders:
        if not p.done() and p.call_id in got:
            p._settle(got[p.call_id])
        if p._error is not None and return_exceptions:
            out.append(p._error)
        else:
            out.append(p._unwrap())
    return out


def gather(placeholders: Iterable[Placeholder], timeout: float | object | None = replies.DEFAULT,
           return_exceptions: bool = False, release: bool = False) -> list[Any]:
    """Wait for many placeholders with batched reads; values in the given order. The first error
    is raised unless ``return_exceptions``, which puts exceptions in the list instead.
    ``release``: delete each reply from Redis as it is read (see :func:`release`)."""
    ps = list(placeholders)
    got: dict[str, bytes] = {}
    if not all(p.done() for p in ps):
        _forbid_blocking_in_loop()
        b = _bus.current()
        # refused sends fail their placeholders now (see Placeholder.result)
        timeout = replies.flush(b, timeout)
        pending, errors = _collect(ps)
        if pending:
            got = replies.fetch(b, pending, timeout, errors, take=release)
    return _finish(ps, got, return_exceptions)


async def agather(placeholders: Iterable[Placeholder],
                  timeout: float | object | None = replies.DEFAULT,
                  return_exceptions: bool = False, release: bool = False) -> list[Any]:
    """:func:`gather` for asyncio code."""
    ps = list(placeholders)
    got: dict[str, bytes] = {}
    if not all(p.done() for p in ps):
        b = _bus.current()
        if b.sender.queued():  # refused sends fail their placeholders now, off the loop
            timeout = await asyncio.get_running_loop().run_in_executor(
                None, replies.flush, b, timeout)
        pending, errors = _collect(ps)
        if pending:
            got = await replies.afetch(b, pending, timeout, errors, take=release)
    return _finish(ps, got, return_exceptions)


def release(placeholders: Iterable[Placeholder]) -> None:
    """Delete the replies of these calls from Redis now instead of after ``reply_ttl``: for a
    caller that is the only reader (a shard gathering its participants). Placeholders already
    resolved keep their values; any other holder can no longer resolve them."""
    replies.release(_bus.current(), [p.call_id for p in placeholders])
