"""busagent against the raw redis-py request/reply floor, side by side on one Redis.

    python benchmarks/bench.py [--seq 2000] [--inflight 64] [--fanout 10000] [--agents 1000]

Prints medians of --repeat runs and writes benchmarks/results/bench.json. Workers are child
processes (two, as on a 2-core machine); the floor's responder is one separate process doing by
hand what a worker does: XREADGROUP, write the reply, XACK+XDEL. Its caller does XADD then a
blocking read.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import redis

import busagent
from busagent import Agent, Msg


class Echo(Agent):
    def reply(self, x: Msg | None = None) -> Msg:
        return Msg(self.name, x.content if x is not None else None, role="assistant")


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * p))]


# --- the floor ----------------------------------------------------------------------------------


def _responder(url: str, stream: str, ready: Any) -> None:
    r = redis.Redis.from_url(url)
    with contextlib.suppress(redis.ResponseError):
        r.xgroup_create(stream, "g", id="0", mkstream=True)
    ready.set()
    while True:
        resp = r.xreadgroup("g", "c", {stream: ">"}, count=100, block=1000)
        for _, entries in resp or []:
            pipe = r.pipeline(transaction=False)
            for eid, f in entries:
                if f.get(b"stop"):
                    return
                key = b"floor:reply:" + f[b"call"]
                pipe.rpush(key, f[b"body"])
                pipe.expire(key, 60)
                pipe.xack(stream, "g", eid)
                pipe.xdel(stream, eid)
            pipe.execute()


def floor(url: str, n_seq: int, inflight: int, n_inflight: int) -> dict[str, Any]:
    stream = f"floor:{uuid.uuid4().hex}"
    ready = mp.Event()
    proc = mp.Process(target=_responder, args=(url, stream, ready), daemon=True)
    proc.start()
    ready.wait(10)
    r = redis.Redis.from_url(url)
    body = b"x" * 40
    lat = []
    t0 = time.perf_counter()
    for _ in range(n_seq):
        call = uuid.uuid4().hex.encode()
        t = time.perf_counter()
        r.xadd(stream, {"call": call, "body": body})
        r.blmove(b"floor:reply:" + call, b"floor:reply:" + call, 5, "RIGHT", "LEFT")
        lat.append(time.perf_counter() - t)
    seq_rate = n_seq / (time.perf_counter() - t0)
    # In flight: keep `inflight` requests outstanding, pipelined sends, one read per reply.
    t0 = time.perf_counter()
    sent = done = 0
    window: list[bytes] = []
    while done < n_inflight:
        pipe = r.pipeline(transaction=False)
        new = []
        while sent < n_inflight and len(window) + len(new) < inflight:
            call = uuid.uuid4().hex.encode()
            pipe.xadd(stream, {"call": call, "body": body})
            new.append(call)
            sent += 1
        if new:
            pipe.execute()
            window.extend(new)
        call = window.pop(0)
        r.blmove(b"floor:reply:" + call, b"floor:reply:" + call, 5, "RIGHT", "LEFT")
        done += 1
    inflight_rate = n_inflight / (time.perf_counter() - t0)
    r.xadd(stream, {"stop": 1})
    proc.join(5)
    r.delete(stream)
    return {"p50_ms": statistics.median(lat) * 1e3, "p99_ms": pct(lat, 0.99) * 1e3,
            "seq_per_s": seq_rate, "inflight_per_s": inflight_rate}


# --- busagent -----------------------------------------------------------------------------------


def bench_busagent(n_seq: int, inflight: int, n_inflight: int, n_fan: int,
                   n_agents: int) -> dict[str, Any]:
    a = Echo("echo", to_dist=True).ready()
    for _ in range(200):  # warm up
        a(Msg("user", 1)).result()
    lat = []
    t0 = time.perf_counter()
    for i in range(n_seq):
        t = time.perf_counter()
        a(Msg("user", i)).result()
        lat.append(time.perf_counter() - t)
    seq_rate = n_seq / (time.perf_counter() - t0)

    t0 = time.perf_counter()
    window: list[Any] = []
    sent = 0
    for _ in range(n_inflight):
        while sent < n_inflight and len(window) < inflight:
            window.append(a(Msg("user", sent)))
            sent += 1
        window.pop(0).result()
    inflight_rate = n_inflight / (time.perf_counter() - t0)

    t0 = time.perf_counter()
    agents = [Echo(f"e{i}", to_dist=True) for i in range(n_agents)]
    busagent.gather([x._created for x in agents if x._created is not None], timeout=120)
    create_rate = n_agents / (time.perf_counter() - t0)
    msg = Msg("user", "hi")
    t0 = time.perf_counter()
    ps = [agents[i % n_agents](msg) for i in range(n_fan)]
    busagent.gather(ps, timeout=120)
    fan_rate = n_fan / (time.perf_counter() - t0)
    return {"p50_ms": statistics.median(lat) * 1e3, "p99_ms": pct(lat, 0.99) * 1e3,
            "seq_per_s": seq_rate, "inflight_per_s": inflight_rate, "fanout_per_s": fan_rate,
            "create_per_s": create_rate}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=int, default=2000)
    ap.add_argument("--inflight", type=int, default=64)
    ap.add_argument("--inflight-calls", type=int, default=5000)
    ap.add_argument("--fanout", type=int, default=10000)
    ap.add_argument("--agents", type=int, default=1000)
    ap.add_argument("--redis", default=None)
    ap.add_argument("--repeat", type=int, default=3, help="runs; medians are reported")
    o = ap.parse_args()
    b = busagent.init(o.redis)
    runs = []
    for _ in range(o.repeat):
        runs.append((floor(b.url, o.seq, o.inflight, o.inflight_calls),
                     bench_busagent(o.seq, o.inflight, o.inflight_calls, o.fanout, o.agents)))
    # Medians over the repeats: this machine's neighbours make single runs noisy.
    fl = {k: statistics.median(r[0][k] for r in runs) for k in runs[0][0]}
    ba = {k: statistics.median(r[1][k] for r in runs) for k in runs[0][1]}
    rows = [
        ("sequential p50 (ms)", fl["p50_ms"], ba["p50_ms"]),
        ("sequential p99 (ms)", fl["p99_ms"], ba["p99_ms"]),
        ("sequential calls/s", fl["seq_per_s"], ba["seq_per_s"]),
        (f"{o.inflight} in flight calls/s", fl["inflight_per_s"], ba["inflight_per_s"]),
        (f"fan-out {o.fanout} calls to {o.agents} agents, calls/s", None, ba["fanout_per_s"]),
        (f"create {o.agents} agents, agents/s", None, ba["create_per_s"]),
    ]
    print(f"redis: {b.url_for_humans}   cpus: {os.cpu_count()}   python: {sys.version.split()[0]}"
          f"   medians of {o.repeat} runs")
    print(f"{'':48} {'raw floor':>10} {'busagent':>10} {'ratio':>7}")
    for name, f, v in rows:
        fs = f"{f:10.3f}" if f is not None else f"{'-':>10}"
        ratio = f"{v / f:7.2f}" if f else f"{'':>7}"
        print(f"{name:48} {fs} {v:10.3f} {ratio}")
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / "bench.json").write_text(json.dumps({"floor": fl, "busagent": ba, "args": vars(o),
                                                "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
