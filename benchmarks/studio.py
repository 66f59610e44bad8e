"""How the studio answers with a million agents registered and 20 workers heart-beating.

    python benchmarks/studio.py [--agents 1000000] [--servers 20] [--repeat 5]

Fills a fresh embedded Redis with ``--agents`` registry records (as ``create_many`` writes
them) and ``--servers`` server records that a thread re-writes every heartbeat (2 s) with
counters, a latency histogram and running calls, starts ``busagent studio`` as its own process
on it, and times each API request the page makes (median and worst of ``--repeat``), plus a
name search that has to walk the whole registry page by page.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from typing import Any

import httpx
import redis

from busagent import embedded
from busagent.records import LATENCY_BOUNDS, AgentInfo, ServerInfo

PREFIX = "bench-studio"


def fill(r: redis.Redis, n: int, servers: int) -> None:
    now = time.time()
    pipe = r.pipeline(transaction=False)
    for i in range(n):
        aid = f"{i:08x}{'0' * 16}"
        pipe.hset(f"{PREFIX}:agents", aid, AgentInfo(
            id=aid, name=f"agent-{i:07d}", cls="examples.guess_two_thirds.agents:RandomParticipant",
            server=f"worker-{i % servers:02d}", created=now).model_dump_json())
        if i % 10_000 == 9_999:
            pipe.execute()
    pipe.execute()


def beat(r: redis.Redis, servers: int, n: int, stop: threading.Event) -> None:
    calls = 0
    while not stop.is_set():
        calls += 1000
        now = time.time()
        for s in range(servers):
            info = ServerInfo(
                name=f"worker-{s:02d}", host="bench", pid=1000 + s, started=now - 3600,
                heartbeat=now, cpu=35.0, mem=900.0, agents=n // servers, inflight=12,
                capacity=1_000_000, modules=["examples.guess_two_thirds.agents"],
                calls=calls, errors=calls // 1000, rate=500.0,
                latency=[calls // len(LATENCY_BOUNDS)] * (len(LATENCY_BOUNDS) + 1),
                latency_sum=calls * 0.01,
                running=[{"call": f"c{s}-{k}", "agent": f"{k:08x}", "kind": "call",
                          "since": now - k} for k in range(50)])
            r.hset(f"{PREFIX}:servers", info.name, info.model_dump_json())
        stop.wait(2.0)


def timed(client: httpx.Client, path: str, repeat: int, **params: Any) -> tuple[float, float, Any]:
    times, body = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        resp = client.get(path, params=params)
        times.append(time.perf_counter() - t)
        resp.raise_for_status()
        body = resp.json() if "json" in resp.headers["content-type"] else resp.text
    return statistics.median(times), max(times), body


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--agents", type=int, default=1_000_000)
    ap.add_argument("--servers", type=int, default=20)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    server = embedded.start()
    r = redis.Redis.from_url(server.url)
    stop = threading.Event()
    proc = None
    try:
        t0 = time.perf_counter()
        fill(r, args.agents, args.servers)
        print(f"filled {args.agents:,} agent records in {time.perf_counter() - t0:.1f} s; "
              f"Redis used memory {r.info('memory')['used_memory'] / 2**20:,.0f} MiB")
        threading.Thread(target=beat, args=(r, args.servers, args.agents, stop),
                         daemon=True).start()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        proc = subprocess.Popen([sys.executable, "-m", "busagent.cli", "studio", "--redis",
                                 server.url, "--prefix", PREFIX, "--port", str(port),
                                 "--token", "bench"], stdout=subprocess.DEVNULL,
                                env={**os.environ})
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)
        deadline = time.monotonic() + 60
        while True:
            try:
                client.get("/api/summary").raise_for_status()
                break
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        rows = []
        m, w, first = timed(client, "/api/agents", args.repeat, count=50)
        rows.append(("agents page 1 (50)", m, w))
        m, w, _ = timed(client, "/api/agents", args.repeat, count=50, cursor=first["cursor"])
        rows.append(("agents page 2 (cursor)", m, w))
        m, w, _ = timed(client, "/api/agents", args.repeat, count=50, server="worker-07")
        rows.append(("agents of one server (50)", m, w))
        m, w, _ = timed(client, "/api/agents", args.repeat, count=50, q="agent-00012")
        rows.append(("name search, one page (budget 20k records)", m, w))
        aid = first["items"][0]["id"]
        rows.append(("one agent", *timed(client, f"/api/agents/{aid}", args.repeat)[:2]))
        rows.append(("servers (20)", *timed(client, "/api/servers", args.repeat)[:2]))
        rows.append(("summary", *timed(client, "/api/summary", args.repeat)[:2]))
        rows.append(("calls now (20 x 50)", *timed(client, "/api/calls", args.repeat)[:2]))
        rows.append(("/metrics", *timed(client, "/metrics", args.repeat)[:2]))
        # A name that is somewhere in the registry: walk the cursor until found.
        want = f"agent-{args.agents - 1:07d}"
        t, cursor, pages = time.perf_counter(), 0, 0
        while True:
            page = client.get("/api/agents", params={"q": want, "cursor": cursor}).json()
            pages += 1
            cursor = page["cursor"]
            if page["items"] or cursor == "0":
                break
        walk = time.perf_counter() - t
        print(f"\n| request ({args.agents:,} agents, {args.servers} servers) | median | worst |")
        print("|---|---|---|")
        for name, med, worst in rows:
            print(f"| {name} | {med * 1000:.1f} ms | {worst * 1000:.1f} ms |")
        print(f"\nfinding {want} by name: {pages} pages, {walk:.2f} s in all "
              f"({walk / pages * 1000:.0f} ms a page), found: {bool(page['items'])}")
        print(json.dumps({"studio_rss_mib": _rss(proc.pid)}))
    finally:
        stop.set()
        if proc is not None:
            proc.terminate()
            proc.wait(10)
        r.close()
        server.stop()


def _rss(pid: int) -> float:
    import psutil

    return round(psutil.Process(pid).memory_info().rss / 2**20, 1)


if __name__ == "__main__":
    main()
