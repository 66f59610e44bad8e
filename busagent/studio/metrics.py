"""``/metrics``: the registry's figures in Prometheus' text format, written by prometheus_client.

Read from Redis at each scrape (a custom collector, so the studio holds no state of its own and
any number of studios can be scraped): per server, from its heartbeat record, the counters
``busagent_calls_total``, ``busagent_call_errors_total`` and the histogram
``busagent_call_duration_seconds``, and the gauges ``busagent_server_up`` (1 while up or late),
``busagent_calls_inflight``, ``busagent_server_cpu_percent``, ``busagent_server_memory_bytes``,
``busagent_agents`` and ``busagent_inbox_length``; for the bus, ``busagent_deadletters``,
``busagent_registered_agents`` and ``busagent_redis_used_memory_bytes``. Labels: ``server``.
Names follow dramatiq's and Flower's (``_total`` counters, seconds, bytes).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from busagent import bus as _bus
from busagent.records import LATENCY_BOUNDS

from . import data


class BusCollector(Collector):
    """Collects on every scrape from the process-wide bus."""

    def collect(self) -> Iterator[Metric]:
        b = _bus.current()
        rows = data.servers()
        summ = data.summary(rows)
        with b.errors():
            pipe = b.redis.pipeline(transaction=False)
            for s in rows:
                pipe.xlen(b.keys.inbox(s["name"]))
            inbox = pipe.execute() if rows else []
        lab = ["server"]

        def gauge(name: str, doc: str, key: str, scale: float = 1.0) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, doc, labels=lab)
            for s in rows:
                g.add_metric([s["name"]], float(s[key]) * scale)
            return g

        up = GaugeMetricFamily("busagent_server_up", "1 while the server serves (up or late)",
                               labels=lab)
        calls = CounterMetricFamily("busagent_calls", "calls answered since the worker started",
                                    labels=lab)
        errors = CounterMetricFamily("busagent_call_errors",
                                     "calls answered with an error", labels=lab)
        hist = HistogramMetricFamily("busagent_call_duration_seconds",
                                     "call time from start of run to commit", labels=lab)
        ib = GaugeMetricFamily("busagent_inbox_length", "entries in the server's inbox stream",
                               labels=lab)
        for s, n in zip(rows, inbox, strict=True):
            name = [s["name"]]
            up.add_metric(name, 1.0 if s["alive"] else 0.0)
            calls.add_metric(name, s["calls"])
            errors.add_metric(name, s["errors"])
            hist.add_metric(name, _cumulative(s["latency"]), s["latency_sum"])
            ib.add_metric(name, n)
        yield from (up, calls, errors, hist, ib)
        yield gauge("busagent_calls_inflight", "calls read and not yet answered", "inflight")
        yield gauge("busagent_server_cpu_percent", "CPU use, percent of one core", "cpu")
        yield gauge("busagent_server_memory_bytes", "resident memory", "mem", 2**20)
        yield gauge("busagent_agents", "agents hosted", "agents")
        yield GaugeMetricFamily("busagent_deadletters", "entries in the dead-letter stream",
                                value=summ["deadletters"])
        yield GaugeMetricFamily("busagent_registered_agents", "agents in the registry",
                                value=summ["agents"])
        yield GaugeMetricFamily("busagent_redis_used_memory_bytes", "Redis used_memory",
                                value=summ["redis"]["used_memory"] or 0)


def _cumulative(buckets: list[Any]) -> list[tuple[str, float]]:
    """Prometheus buckets (cumulative, ``le`` bounds, ending with ``+Inf``) from a worker's
    per-bucket counts (an old record without counts gives zeros)."""
    counts = list(buckets) or [0] * (len(LATENCY_BOUNDS) + 1)
    out, seen = [], 0.0
    for bound, n in zip([*map(str, LATENCY_BOUNDS), "+Inf"], counts, strict=False):
        seen += n
        out.append((bound, seen))
    return out


def render() -> bytes:
    """The metrics text (``text/plain; version=0.0.4``)."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(BusCollector())
    return generate_latest(reg)
