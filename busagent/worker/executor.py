"""Running one call (kinds ``call``, ``observe``, ``method``, ``deliver``) on its agent.

:meth:`Executor.run` turns a :class:`.jobs.Job` into a :class:`.jobs.Done`, or into an awaitable
when the call must wait (an ``async`` reply, or forwarded placeholders whose replies are not
there yet). It never parks, creates or commits: the worker parks what it returns and commits
the outcome. What it needs from Redis and hubs comes through :class:`CallIO` (on a real bus:
:class:`.busio.BusIO`), so it runs in tests with neither.
"""

from __future__ import annotations

import asyncio
import hmac
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from typing import Any, Protocol

from pydantic import BaseModel

from busagent import callchain, tracing
from busagent.agent import Agent, is_remote
from busagent.cancel import CallFlag, _current
from busagent.errors import BusagentError, CallTimeout, Cancelled, ProtocolError, RemoteError
from busagent.protocol import (
    CANCELLABLE_KINDS,
    VERSION,
    CallBody,
    DeliverBody,
    Entry,
    Ref,
    Reply,
    signature,
    substitute,
)
from busagent.stream import Emitter, Event

from .cancels import Cancels
from .jobs import Done, Job, Replies

#: what a call becomes: finished, or waiting. A waiting call ends as a Done, or as its Job with
#: its inputs resolved, to run again on a runner thread (a sync reply must not block the loop).
Outcome = Done | Awaitable[Done | Job]


class CallIO(Protocol):
    """What running a call needs from the bus."""

    def check_size(self, body: bytes, what: str) -> None:
        """Raise MessageTooLarge if ``body`` is over ``max_message_bytes``."""

    def peek(self, call_ids: list[str]) -> list[bytes | None]:
        """The replies of ``call_ids`` as they are now (None: not there yet)."""

    async def fetch(self, call_ids: list[str], timeout: float | None) -> dict[str, bytes]:
        """Wait for the replies of ``call_ids``, up to ``timeout`` seconds (CallTimeout)."""

    def stream(self, call: str, events: Iterable[Event]) -> None:
        """Write a reply's stream events as they come; the first is ``start``."""

    async def astream(self, call: str, events: AsyncIterator[Event]) -> None:
        """:meth:`stream` on the loop thread."""

    def deliver(self, agent: Agent, hub: str) -> int:
        """Have ``agent`` observe what ``hub`` holds for it (``busagent.hub.deliver``); how
        many messages it observed."""


class Executor:
    """``agent(id)`` returns the hosted agent or raises UnknownAgent; ``secret`` is the bus's
    shared secret (None: calls are not signed); ``cancels``: where running calls register so
    ``busagent.cancel`` finds them (None: calls cannot be cancelled while they run)."""

    def __init__(self, io: CallIO, replies: Replies, agent: Callable[[str], Agent],
                 secret: str | None, clock: Callable[[], float] = time.time,
                 cancels: Cancels | None = None) -> None:
        self.io = io
        self.replies = replies
        self.agent = agent
        self.secret = secret
        #: Redis's time now, as this host estimates it (epoch seconds): what the callers'
        #: relative deadlines are measured against (see CallBody.timeout).
        self.clock = clock
        self.cancels = cancels

    def verify(self, e: Entry) -> None:
        """Raise ProtocolError for another protocol version or a bad signature, MessageTooLarge
        for an oversized body. Every kind of entry passes here first."""
        if e.v != VERSION:
            raise ProtocolError(f"protocol version {e.v} is not {VERSION}; upgrade busagent on "
                                "the caller or the worker so they match")
        self.io.check_size(e.body, "the call")
        if self.secret and not hmac.compare_digest(
                e.sig, signature(self.secret, e.v, e.call, e.agent, e.kind, e.body)):
            raise ProtocolError("the call is not signed with this bus's shared secret "
                                "(BUSAGENT_SECRET); refused")

    def run(self, job: Job) -> Outcome:
        """Run a call: its Done, or an awaitable to run on the loop thread (see
        :data:`Outcome`). Errors, the agent's or a refusal's (ProtocolError, MessageTooLarge,
        UnknownAgent, CallTimeout for a passed deadline), become the Done's error reply. A call
        cancelled while it ran is answered Cancelled (see :mod:`busagent.cancel`)."""
        cancels = self.cancels
        if cancels is None or job.entry.kind not in CANCELLABLE_KINDS:
            return self._run_safe(job)
        call = job.entry.call
        flag = cancels.begin(call)
        if flag.cancelled:
            cancels.end(call)
            return self.replies.failed(job, Cancelled(f"call {call} was cancelled before it "
                                                      "started"))
        token = _current.set(flag)  # busagent.cancelled() in a plain reply reads it
        try:
            out = self._run_safe(job)
        finally:
            _current.reset(token)
        if isinstance(out, Done):
            cancels.end(call)
            return self._cancelled(job, out) if flag.cancelled else out
        return self._cancellable(job, out, flag, cancels)

    def _run_safe(self, job: Job) -> Outcome:
        try:
            return self._run(job)
        except Exception as err:  # noqa: BLE001 - a worker survives whatever it runs
            return self.replies.failed(job, err)

    async def _cancellable(self, job: Job, aw: Awaitable[Done | Job], flag: CallFlag,
                           cancels: Cancels) -> Done | Job:
        """Await a waiting call in a task ``busagent.cancel`` can cancel (its flag names the
        task; both are touched only on the loop thread)."""
        call = job.entry.call
        flag.task = task = asyncio.current_task()
        _current.set(flag)  # this task's own context: busagent.cancelled() in async code
        try:
            if flag.cancelled:  # cancelled before the loop started it
                _close(aw)
                return self._cancelled(job, None)
            out = await aw
        except asyncio.CancelledError:
            if not flag.cancelled:
                raise  # not ours (the loop is shutting down)
            uncancel = getattr(task, "uncancel", None)  # Python 3.11+
            if uncancel is not None:
                uncancel()
            return self._cancelled(job, None)
        finally:
            flag.task = None
            cancels.end(call)
        if flag.cancelled:  # it caught CancelledError, or it was cancelled as it finished
            return self._cancelled(job, out if isinstance(out, Done) else None)
        return out

    def _cancelled(self, job: Job, done: Done | None) -> Done:
        """The call answered Cancelled, keeping the memory and state changes of ``done`` (or
        the agent's changes so far): the agent in this process has them either way."""
        err = Cancelled(f"call {job.entry.call} was cancelled after it was taken to run (while "
                        "it ran or waited for its inputs); any reply it made was discarded")
        if done is None:
            try:
                done = self.replies.done(job, self.agent(job.entry.agent), None)
            except Exception:  # noqa: BLE001 - the agent is gone: nothing of it to keep
                return self.replies.failed(job, err)
        done.reply = self.replies.error(err)
        done.failed = True
        return done

    def _run(self, job: Job) -> Outcome:
        e = job.entry
        self.verify(e)
        agent = self.agent(e.agent)
        if e.kind == "deliver":
            return self._deliver(job, agent)
        refs: list[Ref] = []
        body = CallBody.unpack(e.body, refs)
        if body.trace is not None and tracing.on():
            return self._traced(job, agent, body, refs)
        return self._call(job, agent, body, refs)

    def _traced(self, job: Job, agent: Agent, body: CallBody, refs: list[Ref]) -> Outcome:
        """:meth:`_call` in the spans of :func:`busagent.tracing.running`."""
        e = job.entry
        with tracing.running(body.trace or {}, e.agent, agent.name, e.call, job.entry_id,
                             job.resolved is not None) as run:
            out = self._call(job, agent, body, refs)
        if run is None:
            return out
        if isinstance(out, Done):
            out.trace = run
            return out
        return self._trace_later(tracing.awaiting(out, run, agent.name), run)

    @staticmethod
    async def _trace_later(aw: Awaitable[Done | Job], run: tracing.Running) -> Done | Job:
        out = await aw
        if isinstance(out, Done):
            out.trace = run
        return out

    def _call(self, job: Job, agent: Agent, body: CallBody, refs: list[Ref]) -> Outcome:
        e = job.entry
        # A sender that did not check (another version, hand-made entries): refused here too,
        # before it waits for anything.
        callchain.refuse(tuple(body.chain), [(agent.agent_id, agent.name)])
        deadline = _deadline(job, body)
        if deadline is not None and self.clock() > deadline:
            raise CallTimeout(f"the caller's deadline passed before the call started (it waits "
                              f"{body.timeout} s from when the call was queued)")
        if e.kind == "call":
            fn: Callable[..., Any] = agent.reply
        elif e.kind == "observe":
            fn = agent.observe
        else:
            name = body.method or ""
            if not is_remote(type(agent), name):
                raise ProtocolError(f"{type(agent).__name__}.{name} is not marked @busagent.remote")
            fn = getattr(agent, name)
        if job.resolved is not None:
            args, kwargs = job.resolved
        else:
            args, kwargs = body.args, body.kwargs
            if refs:
                ids = list(dict.fromkeys(r.call_id for r in refs))
                raw = self.io.peek(ids)
                if any(v is None for v in raw):
                    # Not all inputs are there: wait on the loop thread, not in this one.
                    return self._await_inputs(job, ids, deadline)
                values = _decode_inputs(zip(ids, raw, strict=True), body)  # type: ignore[arg-type]
                args, kwargs = substitute(args, values), substitute(kwargs, values)
        if inspect.iscoroutinefunction(fn):
            return self._finish_async(job, agent, fn(*args, **kwargs), body.stream,
                                      body.chain)
        # Calls the agent makes from here carry the chain with it appended.
        with callchain.running(body.chain, agent.agent_id, agent.name, e.call):
            value = fn(*args, **kwargs)
            if inspect.isawaitable(value) or inspect.isasyncgen(value):
                return self._finish_async(job, agent, value, body.stream, body.chain)
            if inspect.isgenerator(value):
                value = self._stream(e.call, agent, value)
            elif body.stream:
                self._stream(e.call, agent, [value])
        return self.replies.done(job, agent, value)

    def _deliver(self, job: Job, agent: Agent) -> Outcome:
        """A hub's notice (:func:`busagent.proxy.deliver`): the agent observes what the hub
        holds for it; with ``speak`` it then takes a turn, ``reply()`` from memory, always as
        stream events (the task center follows them)."""
        d = DeliverBody.unpack(job.entry.body)
        seen = self.io.deliver(agent, d.hub)
        if not d.speak:
            return self.replies.done(job, agent, seen)
        # a turn starts a chain
        with callchain.running((), agent.agent_id, agent.name, job.entry.call):
            turn = agent.reply()
            if inspect.isawaitable(turn) or inspect.isasyncgen(turn):
                return self._finish_async(job, agent, turn, True, [])
            if inspect.isgenerator(turn):
                turn = self._stream(job.entry.call, agent, turn)
            else:
                self._stream(job.entry.call, agent, [turn])
        return self.replies.done(job, agent, turn)

    async def _await_inputs(self, job: Job, ids: list[str], deadline: float | None
                            ) -> Done | Job:
        try:
            timeout = None if deadline is None else max(deadline - self.clock(), 0.001)
            got = await self.io.fetch(ids, timeout)
            body = CallBody.unpack(job.entry.body, [])
            values = _decode_inputs(((c, got[c]) for c in ids), body)
            job.resolved = (substitute(body.args, values), substitute(body.kwargs, values))
        except Exception as err:  # noqa: BLE001
            return self.replies.failed(job, err)
        return job

    async def _finish_async(self, job: Job, agent: Agent, aw: Any, stream: bool,
                            chain: Sequence[Sequence[str]]) -> Done:
        try:
            # Set inside the task that runs the coroutine: the chain travels in its context.
            with callchain.running(chain, agent.agent_id, agent.name, job.entry.call):
                if inspect.isasyncgen(aw):
                    value = await self._astream(job.entry.call, agent, aw)
                else:
                    value = await aw
                    if stream:
                        await self._astream(job.entry.call, agent, _once(value))
            return self.replies.done(job, agent, value)
        except Exception as err:  # noqa: BLE001
            return self.replies.failed(job, err)

    def _stream(self, call: str, agent: Agent, pieces: Iterable[Any]) -> Any:
        """Write a generator's pieces as events (:mod:`busagent.stream`); the joined reply."""
        em = Emitter(call)
        self.io.stream(call, _events(em, agent, pieces))
        return em.joined()

    async def _astream(self, call: str, agent: Agent, pieces: AsyncIterator[Any]) -> Any:
        em = Emitter(call)
        await self.io.astream(call, _aevents(em, agent, pieces))
        return em.joined()


def _events(em: Emitter, agent: Agent, pieces: Iterable[Any]) -> Iterator[Event]:
    yield em.start(agent.agent_id, agent.name)
    try:
        for piece in pieces:
            yield em.chunk(piece)
    except Exception as err:
        yield em.error(err)
        raise
    yield em.end()


async def _aevents(em: Emitter, agent: Agent, pieces: AsyncIterator[Any]
                   ) -> AsyncIterator[Event]:
    yield em.start(agent.agent_id, agent.name)
    try:
        async for piece in pieces:
            yield em.chunk(piece)
    except Exception as err:
        yield em.error(err)
        raise
    yield em.end()


async def _once(value: Any) -> AsyncIterator[Any]:
    yield value


def _close(aw: Awaitable[Any]) -> None:
    """Drop an awaitable that will never run, without a "never awaited" warning."""
    close = getattr(aw, "close", None)
    if close is not None:
        close()


def _decode_inputs(raw: Iterable[tuple[str, bytes]], body: CallBody) -> dict[str, Any]:
    """The values of a call's input placeholders by call id. An input that failed fails the
    call with the original error, its remote type, message, traceback and server kept, and its
    message saying which input it was (the argument's path and the call id)."""
    values: dict[str, Any] = {}
    for call_id, data in raw:
        try:
            values[call_id] = Reply.parse(data).value_or_raise()
        except BusagentError as err:
            raise _input_failed(err, call_id, body) from None
    return values


def _input_failed(err: BusagentError, call_id: str, body: CallBody) -> BusagentError:
    where = _ref_path(body.args, call_id, "args") or _ref_path(body.kwargs, call_id, "kwargs")
    what = f"an input placeholder ({call_id}) failed (passed as {where or 'an argument'})"
    if isinstance(err, RemoteError):
        return RemoteError(err.type, f"{what}: {err.message}", err.traceback, err.server)
    # busagent's own error: the same class, so `except UnknownAgent` still works downstream.
    out = type(err)(f"{what}: {err}")
    out.server, out.traceback = err.server, err.traceback
    return out


def _ref_path(obj: Any, call_id: str, where: str) -> str:
    """Where the Ref of ``call_id`` is in ``obj`` (``args[1].content['x']``), "" if absent."""
    if isinstance(obj, Ref):
        return where if obj.call_id == call_id else ""
    parts: Iterable[tuple[str, Any]]
    if isinstance(obj, list):
        parts = ((f"{where}[{i}]", v) for i, v in enumerate(obj))
    elif isinstance(obj, dict):
        parts = ((f"{where}[{k!r}]", v) for k, v in obj.items())
    elif isinstance(obj, BaseModel):
        parts = ((f"{where}.{k}", v) for k, v in obj.__dict__.items())
    else:
        return ""
    for sub, v in parts:
        if found := _ref_path(v, call_id, sub):
            return found
    return ""


def _deadline(job: Job, body: CallBody) -> float | None:
    """When the caller stops waiting, by Redis's clock: the time Redis queued the entry (the
    milliseconds in its id) plus the caller's relative timeout. A call moved by recovery was
    queued again, so its time restarts there."""
    if body.timeout is None:
        return None
    try:
        queued = int(job.entry_id.split(b"-", 1)[0]) / 1000
    except ValueError:  # not a Redis-made id: nothing to measure from
        return None
    return queued + body.timeout
