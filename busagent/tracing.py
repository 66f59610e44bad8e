"""Optional OpenTelemetry tracing of calls (``pip install busagent[otel]``, ``tracing=True``).

Off by default, and then free: the one check per call is a module global, and the call's body
carries no trace field. On, the caller's W3C trace context (``traceparent``, ``tracestate``)
travels in the call's body (:attr:`busagent.protocol.CallBody.trace`), so a flow
``caller -> a -> b`` opened under one span of the caller's is one trace, with these spans:

* ``route {agent}`` (PRODUCER) in the caller: the call being built and queued for routing;
  its context is what travels.
* ``queue {agent}`` in the worker: from the moment Redis appended the call to the inbox (the
  entry id's milliseconds, Redis' clock) until the worker started it.
* ``run {agent}`` (CONSUMER) in the worker: the agent's ``reply`` (or method), including a wait
  for forwarded placeholders' replies; calls an agent makes from its ``reply`` are its
  children, so nested flows stay in the trace.
* ``commit {agent}`` in the worker: from the reply being ready to the commit script having
  written it.

Attributes follow the OTel messaging conventions: ``messaging.system`` ``busagent``,
``messaging.operation.name``, ``messaging.destination.name`` (the agent id),
``messaging.message.id`` (the call id), plus ``gen_ai.agent.id``. Spans go to the process's
global tracer provider: configure it as for any OTel program (the SDK in code, or
``opentelemetry-instrument busagent worker ...``), in callers and workers alike.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from .errors import ConfigError

if TYPE_CHECKING:
    from opentelemetry.trace import Span, Tracer

_tracer: Tracer | None = None


def configure(on: bool) -> None:
    """Turn tracing on or off for this process. Raises ConfigError when on without the
    ``opentelemetry-api`` package."""
    global _tracer
    if not on:
        _tracer = None
        return
    try:
        from opentelemetry import trace
    except ImportError:
        raise ConfigError("tracing=True needs OpenTelemetry: pip install 'busagent[otel]'"
                          ) from None
    _tracer = trace.get_tracer("busagent")


def on() -> bool:
    return _tracer is not None


def _attrs(op: str, agent: str, call: str) -> dict[str, str]:
    return {"messaging.system": "busagent", "messaging.operation.name": op,
            "messaging.destination.name": agent, "messaging.message.id": call,
            "gen_ai.agent.id": agent}


def route(agent: str, call: str, name: str) -> dict[str, str] | None:
    """Caller side: a ``route`` span for a call to ``agent`` (shown as ``name``), and the
    carrier to put in the call's body (None when tracing is off)."""
    if _tracer is None:
        return None
    from opentelemetry import propagate, trace

    carrier: dict[str, str] = {}
    with _tracer.start_as_current_span(f"route {name}", kind=trace.SpanKind.PRODUCER,
                                       attributes=_attrs("send", agent, call)):
        propagate.inject(carrier)
    return carrier


class Running:
    """A traced call in a worker: the context it continues, and when its reply was ready."""

    __slots__ = ("agent", "call", "ctx", "name", "ready")

    def __init__(self, ctx: Any, agent: str, name: str, call: str) -> None:
        self.ctx = ctx
        self.agent = agent
        self.name = name
        self.call = call
        self.ready = 0


@contextmanager
def running(carrier: dict[str, str], agent: str, name: str, call: str, entry_id: bytes,
            resumed: bool = False) -> Iterator[Running | None]:
    """Worker side: the ``queue`` span (from the entry id's time to now; not for a call
    ``resumed`` once its inputs arrived) and the ``run`` span around the block, children of
    the caller's context. Yields None when tracing is off."""
    if _tracer is None:
        yield None
        return
    from opentelemetry import propagate, trace

    ctx = propagate.extract(carrier)
    now = time.time_ns()
    try:
        queued = int(entry_id.split(b"-")[0]) * 1_000_000
    except ValueError:
        queued = now
    if not resumed:
        _tracer.start_span(f"queue {name}", context=ctx, start_time=min(queued, now),
                           attributes=_attrs("receive", agent, call)).end(end_time=now)
    with _tracer.start_as_current_span(f"run {name}", context=ctx, kind=trace.SpanKind.CONSUMER,
                                       attributes=_attrs("process", agent, call)):
        run = Running(ctx, agent, name, call)
        yield run
        run.ready = time.time_ns()


async def awaiting(aw: Awaitable[Any], run: Running, name: str) -> Any:
    """A call that goes on on the event loop (an async reply, or waiting for forwarded
    placeholders): a ``wait {name}`` span until it finishes."""
    assert _tracer is not None
    from opentelemetry import trace

    with _tracer.start_as_current_span(f"wait {name}", context=run.ctx,
                                       kind=trace.SpanKind.CONSUMER,
                                       attributes=_attrs("process", run.agent, run.call)):
        out = await aw
    run.ready = time.time_ns()
    return out


def committed(runs: list[Running]) -> None:
    """The replies of ``runs`` were written: one ``commit`` span each."""
    if _tracer is None:
        return
    now = time.time_ns()
    for r in runs:
        span: Span = _tracer.start_span(f"commit {r.name}", context=r.ctx,
                                        start_time=r.ready or now,
                                        attributes=_attrs("settle", r.agent, r.call))
        span.end(end_time=now)
