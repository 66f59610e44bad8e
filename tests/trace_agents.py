"""Agents for the tracing tests (``--agents tests.trace_agents``). Importing this module gives
the process an OpenTelemetry SDK provider with an in-memory exporter, so a test can read the
spans a worker process recorded through a remote method."""

from __future__ import annotations

from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import busagent
from busagent import Agent, Msg, RemoteAgent

EXPORTER = InMemorySpanExporter()
if not isinstance(trace.get_tracer_provider(), TracerProvider):
    _provider = TracerProvider()
    _provider.add_span_processor(SimpleSpanProcessor(EXPORTER))
    trace.set_tracer_provider(_provider)


def finished() -> list[dict[str, Any]]:
    """This process's finished spans as plain values."""
    out = []
    for s in EXPORTER.get_finished_spans():
        ctx = s.context
        assert ctx is not None
        out.append({"name": s.name, "trace": format(ctx.trace_id, "032x"),
                    "span": format(ctx.span_id, "016x"),
                    "parent": format(s.parent.span_id, "016x") if s.parent else None,
                    "kind": s.kind.name, "start": s.start_time, "end": s.end_time,
                    "attrs": dict(s.attributes or {})})
    return out


class Hop(Agent):
    """Appends its name; with ``via`` (an agent id) it first calls that agent from its reply."""

    def __init__(self, name: str, via: str | None = None) -> None:
        super().__init__(name)
        self.via = via

    def reply(self, x: Msg | None = None) -> Msg:
        text = str(x.content) if x else ""
        if self.via:
            text = str(RemoteAgent.by_id(self.via)(Msg("user", text)).result(timeout=30).content)
        return Msg(self.name, f"{text}>{self.name}")

    @busagent.remote
    def spans(self) -> list[dict[str, Any]]:
        return finished()
