"""Placeholders: what calling a distributed agent returns at once.

A placeholder is a call id. Its reply lives in Redis at ``{prefix}:reply:<call id>`` for
``reply_ttl`` seconds, so any process that holds the id (the caller, or an agent it was passed
to) can resolve it, any number of times. Passed to another agent it travels as a reference and
the receiving worker reads the value from Redis itself.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Generator, Iterable, Iterator, Mapping, Sequence
from typing import Any

from . import bus as _bus
from . import replies
from .errors import BusagentError, UsageError
from .protocol import EXT_REF, EXT_VALUE, Reply, pack

_UNSET: Any = object()


class Placeholder:
    """Reading any field (``.content``, ``.name``...) blocks until the reply is there;
    ``.result(timeout=)`` too; ``await placeholder`` in asyncio code."""

    __slots__ = ("_error", "_raw", "_value", "agent_id", "call_id")

    _value: Any
    _error: BaseException | None
    #: the reply as read, to tell whether the value was changed since (None: no such reply).
    _raw: bytes | None

    def __init__(self, call_id: str, agent_id: str = "") -> None:
        # object.__setattr__: not through __setattr__ below (a fan-out builds thousands).
        init = object.__setattr__
        init(self, "call_id", call_id)
        init(self, "agent_id", agent_id)
        init(self, "_value", _UNSET)
        init(self, "_error", None)
        init(self, "_raw", None)

    @classmethod
    def from_id(cls, call_id: str) -> Placeholder:
        """A placeholder for a call id received from elsewhere (another process, a log)."""
        return cls(call_id)

    def __busagent_wire__(self) -> tuple[int, Any]:
        """How this placeholder travels (:mod:`busagent.protocol`): by reference, so the
        receiver gets a placeholder and reads the reply (or its error) from Redis itself;
        but as its value when it was resolved here and its value was changed since
        (``p.content += 1``, or changed in place), or its reply was released: by reference
        the receiver would read the original reply, and the change would be lost without a
        word. Checking costs encoding the value twice, only for a resolved placeholder that
        is passed on."""
        if self._value is not _UNSET and (self._raw is None or self._changed()):
            return EXT_VALUE, self._value
        return EXT_REF, self.call_id

    def _changed(self) -> bool:
        try:
            return pack(self._value) != pack(Reply.parse(self._raw or b"").value)
        except BusagentError:
            return True  # the value cannot be compared: send it (pack says why if it fails)

    def __setattr__(self, name: str, value: Any) -> None:
        # A field set on a placeholder (``p.content = ...``, ``p.content += 1``) is set on its
        # value, which it waits for; the value then travels on (see __busagent_wire__).
        if name in Placeholder.__slots__:
            object.__setattr__(self, name, value)
        else:
            setattr(self.result(), name, value)

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickled (multiprocessing, a task queue): a pending placeholder pickles as its call id
        # and resolves from Redis in the process that unpickles it, as the original would; a
        # resolved one carries its value or error. The unset marker must never be pickled: a
        # copy of it is not the marker, and the copy would look resolved.
        state: tuple[Any, ...]
        if self._value is not _UNSET:
            state = ("value", self._value)
        elif self._error is not None:
            state = ("error", self._error)
        else:
            state = ("pending",)
        return (_restore, (self.call_id, self.agent_id, state))

    def _fail(self, err: BaseException) -> None:
        if self._value is _UNSET:
            self._error = err

    def _settle(self, data: bytes, kept: bool = True) -> None:
        """Take the reply's bytes; ``kept``: the reply stays in Redis (not released)."""
        try:
            self._value = replies.decode(data)
            self._raw = data if kept else None
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
                agents = {self.call_id: self.agent_id} if self.agent_id else None
                self._settle(replies.fetch(b, [self.call_id], timeout,
                                           agents=agents)[self.call_id])
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


def _restore(call_id: str, agent_id: str, state: tuple[Any, ...]) -> Placeholder:
    """A placeholder from its pickle (:meth:`Placeholder.__reduce__`)."""
    p = Placeholder(call_id, agent_id)
    if state[0] == "value":
        p._value = state[1]
    elif state[0] == "error":
        p._error = state[1]
    return p


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


class _Agents(Mapping[str, str]):
    """Which agent each call is for, for the wait's liveness check: built only if a wait
    lasts long enough to check (a gather of a million must not pay for it otherwise)."""

    def __init__(self, placeholders: Sequence[Placeholder]) -> None:
        self.ps = placeholders
        self._map: dict[str, str] | None = None

    def _built(self) -> dict[str, str]:
        if self._map is None:
            self._map = {p.call_id: p.agent_id for p in self.ps if p.agent_id}
        return self._map

    def __getitem__(self, call_id: str) -> str:
        return self._built()[call_id]

    def __iter__(self) -> Iterator[str]:
        return iter(self._built())

    def __len__(self) -> int:
        return len(self._built())


def _agents(placeholders: Sequence[Placeholder]) -> _Agents:
    return _Agents(placeholders)


def _finish(placeholders: Sequence[Placeholder], got: dict[str, bytes],
            return_exceptions: bool, released: bool = False) -> list[Any]:
    out: list[Any] = []
    for p in placeholders:
        if not p.done() and p.call_id in got:
            p._settle(got[p.call_id], kept=not released)
        if p._error is not None and return_exceptions:
            out.append(p._error)
        else:
            out.append(p._unwrap())
    return out


def gather(placeholders: Iterable[Placeholder], timeout: float | object | None = replies.DEFAULT,
           return_exceptions: bool = False, release: bool = False,
           cancel_on_interrupt: bool = True) -> list[Any]:
    """Wait for many placeholders with batched reads; values in the given order. The first error
    is raised unless ``return_exceptions``, which puts exceptions in the list instead.
    ``release``: delete each reply from Redis as it is read (see :func:`release`).
    ``cancel_on_interrupt``: on Ctrl-C (KeyboardInterrupt) while waiting, cancel the calls not
    answered yet (:func:`busagent.cancel`) before the interrupt goes on: nobody is left to read
    their replies, so the workers should not go on running them."""
    ps = list(placeholders)
    got: dict[str, bytes] = {}
    if not all(p.done() for p in ps):
        _forbid_blocking_in_loop()
        b = _bus.current()
        # refused sends fail their placeholders now (see Placeholder.result)
        timeout = replies.flush(b, timeout)
        pending, errors = _collect(ps)
        if pending:
            try:
                got = replies.fetch(b, pending, timeout, errors, take=release,
                                    agents=_agents(ps))
            except KeyboardInterrupt:
                if cancel_on_interrupt:
                    _cancel_unanswered(ps)
                raise
    return _finish(ps, got, return_exceptions, release)


async def agather(placeholders: Iterable[Placeholder],
                  timeout: float | object | None = replies.DEFAULT,
                  return_exceptions: bool = False, release: bool = False,
                  cancel_on_interrupt: bool = True) -> list[Any]:
    """:func:`gather` for asyncio code; ``cancel_on_interrupt`` also covers the awaiting task
    being cancelled (``asyncio.run`` cancels it on Ctrl-C)."""
    ps = list(placeholders)
    got: dict[str, bytes] = {}
    if not all(p.done() for p in ps):
        b = _bus.current()
        if b.sender.queued():  # refused sends fail their placeholders now, off the loop
            timeout = await asyncio.get_running_loop().run_in_executor(
                None, replies.flush, b, timeout)
        pending, errors = _collect(ps)
        if pending:
            try:
                got = await replies.afetch(b, pending, timeout, errors, take=release,
                                           agents=_agents(ps))
            except (KeyboardInterrupt, asyncio.CancelledError):
                if cancel_on_interrupt:
                    # Sending blocks briefly; the loop is being torn down anyway.
                    _cancel_unanswered(ps)
                raise
    return _finish(ps, got, return_exceptions, release)


def _cancel_unanswered(ps: Sequence[Placeholder]) -> None:
    """Cancel what an interrupted gather sent, quietly: the interrupt is what the user sees
    (issue 10's excepthook prints it as one line and stops child workers after this)."""
    from .cancel import cancel

    # Redis away: the interrupt matters more than the cancel.
    with contextlib.suppress(BusagentError):
        cancel([p for p in ps if p.agent_id and not p.done()])


def release(placeholders: Iterable[Placeholder]) -> None:
    """Delete the replies of these calls from Redis now instead of after ``reply_ttl``: for a
    caller that is the only reader (a shard gathering its participants). Placeholders already
    resolved keep their values; any other holder can no longer resolve them."""
    ps = list(placeholders)
    replies.release(_bus.current(), [p.call_id for p in ps])
    for p in ps:
        p._raw = None  # passed on, a resolved one now travels as its value
