"""OpenTelemetry tracing across real worker processes: the W3C context travels in the call's
body, each process records its spans with the SDK's in-memory exporter, and the spans of a
flow ``caller -> a -> b`` form one trace. Off by default, with nothing added to a call."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

import busagent
from busagent import DistConf, Msg, tracing
from busagent.protocol import CallBody, unpack

from .conftest import Workers, wait_for
from .trace_agents import Hop, finished

MODULES = ("tests.agents", "tests.trace_agents")
ON = {"BUSAGENT_TRACING": "1"}


@pytest.fixture
def traced(bus: busagent.bus.Bus, redis_url: str, prefix: str) -> Iterator[None]:
    busagent.init(redis_url, prefix=prefix, tracing=True)
    yield
    tracing.configure(False)


def _worker_spans(probe: Any, trace_id: str, want: set[str]) -> list[dict[str, Any]]:
    """The probe's worker's spans of ``trace_id`` once the ``want`` names are all there (the
    commit span ends just after the reply is visible)."""
    def got() -> list[dict[str, Any]] | None:
        spans = [s for s in probe.spans().result(timeout=30) if s["trace"] == trace_id]
        return spans if want <= {s["name"].split(" ")[0] for s in spans} else None
    return list(wait_for(got, 15, f"spans {want}"))


def test_a_forwarded_flow_is_one_trace_across_processes(workers: Workers, traced: None) -> None:
    from opentelemetry import trace

    workers.start("s1", *MODULES, env=ON)
    workers.start("s2", *MODULES, env=ON)
    c = Hop("c", to_dist=DistConf(server="s2"))
    a = Hop("a", via=c.agent_id, to_dist=DistConf(server="s1"))
    b = Hop("b", to_dist=DistConf(server="s2"))
    for x in (a, b, c):
        x.ready(timeout=30)
    probe1 = Hop("probe1", to_dist=DistConf(server="s1"))
    probe2 = Hop("probe2", to_dist=DistConf(server="s2"))

    tracer = trace.get_tracer("test")
    with tracer.start_as_current_span("flow") as flow:
        pa = a(Msg("user", "go"))
        pb = b(pa)                    # b's input forwarded from a by placeholder
    assert pb.result(timeout=30).content == "go>c>a>b"
    tid = format(flow.get_span_context().trace_id, "032x")

    mine = [s for s in finished() if s["trace"] == tid]
    on1 = _worker_spans(probe1, tid, {"queue", "run", "commit"})
    on2 = _worker_spans(probe2, tid, {"queue", "run", "commit"})
    names = {s["name"] for s in mine + on1 + on2}
    # Routing in the caller (and in a, for its nested call to c), queueing, running and
    # committing in each worker, all in the flow's one trace.
    for n in ("route a", "route b", "queue a", "run a", "commit a", "route c", "queue c",
              "run c", "commit c", "queue b", "run b", "commit b"):
        assert n in names, (n, sorted(names))
    by_id = {s["span"]: s for s in mine + on1 + on2}
    route_a = next(s for s in mine if s["name"] == "route a")
    run_a = next(s for s in on1 if s["name"] == "run a")
    assert route_a["parent"] == flow.get_span_context().span_id.to_bytes(8, "big").hex()
    assert run_a["parent"] == route_a["span"] and route_a["kind"] == "PRODUCER"
    assert run_a["kind"] == "CONSUMER" and run_a["attrs"]["messaging.destination.name"] == (
        a.agent_id)
    # The nested call to c is a child of a's run span (routed from inside a's reply).
    route_c = next(s for s in on1 if s["name"] == "route c")
    assert route_c["parent"] == run_a["span"]
    assert by_id[next(s for s in on2 if s["name"] == "run c")["parent"]] == route_c
    # Queueing ends where running starts.
    queue_b = next(s for s in on2 if s["name"] == "queue b")
    assert queue_b["end"] <= min(s["start"] for s in on2 if s["name"] in ("run b", "wait b"))


def test_off_by_default_adds_nothing(workers: Workers, bus: busagent.bus.Bus) -> None:
    assert not tracing.on()
    # The body a caller sends has no trace field at all (the envelope is unchanged).
    assert "trace" not in unpack(CallBody(args=[1]).pack())
    workers.start("s1", *MODULES)  # a worker without BUSAGENT_TRACING
    a = Hop("a", to_dist=DistConf(server="s1"))
    assert a(Msg("user", "x")).result(timeout=30).content == "x>a"
    assert a.spans().result(timeout=30) == []


def test_tracing_on_without_opentelemetry_is_a_clear_error(monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    import builtins

    real = builtins.__import__

    def no_otel(name: str, *a: Any, **kw: Any) -> Any:
        if name.startswith("opentelemetry"):
            raise ImportError(name)
        return real(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_otel)
    with pytest.raises(busagent.errors.ConfigError, match=r"pip install 'busagent\[otel\]'"):
        tracing.configure(True)
    assert not tracing.on()
