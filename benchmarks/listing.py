"""Listing a million agents, and what it does to everyone else's latency meanwhile.

    python benchmarks/listing.py [--agents 1000000]

On a fresh embedded Redis: writes ``--agents`` registry records (as busagent writes them), then,
while a separate process sends PING after PING on its own connection and records each round
trip, lists the registry three ways: ``busagent.admin.iter_agents`` (paged HSCAN, what the API
and ``busagent agents`` use), ``busagent agents --json`` to /dev/null (the CLI, streamed), and,
for contrast, the one ``HVALS`` the listing used to be. Prints the time each took and the other
client's round trips (p50, p99, max) during each.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import redis

import busagent
from busagent import embedded
from busagent.admin import iter_agents

ROOT = Path(__file__).resolve().parent.parent
PREFIX = "bench"


def _prober(url: str, stop: Any, out: Any) -> None:
    """PING in a loop until ``stop`` is set; the round trips (seconds) go to ``out``."""
    r = redis.Redis.from_url(url)
    times = []
    while not stop.is_set():
        t = time.perf_counter()
        r.ping()
        times.append(time.perf_counter() - t)
        time.sleep(0.001)
    out.put(times)


def _during(url: str, what: str, work: Any) -> None:
    stop, out = mp.Event(), mp.Queue()
    p = mp.Process(target=_prober, args=(url, stop, out))
    p.start()
    time.sleep(0.5)  # the prober is connected and pinging
    t = time.perf_counter()
    n = work()
    took = time.perf_counter() - t
    stop.set()
    times = sorted(out.get())
    p.join()
    q = statistics.quantiles(times, n=100)
    print(f"| {what} | {n:,} | {took:.2f} s | {q[49] * 1e3:.2f} ms | {q[98] * 1e3:.2f} ms | "
          f"{times[-1] * 1e3:.1f} ms |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--agents", type=int, default=1_000_000)
    a = ap.parse_args()
    server = embedded.start(unix=False)
    try:
        r = redis.Redis.from_url(server.url)
        key = f"{PREFIX}:agents"
        t = time.perf_counter()
        for i in range(0, a.agents, 10_000):
            now = time.time()
            recs = {f"agent-{j:07d}": json.dumps({"id": f"agent-{j:07d}", "name": f"p{j}",
                                                  "cls": "agents:RandomParticipant",
                                                  "server": f"w{j % 2}", "created": now})
                    for j in range(i, min(i + 10_000, a.agents))}
            r.hset(key, mapping=recs)  # type: ignore[arg-type]
        print(f"{a.agents:,} registry records written in {time.perf_counter() - t:.1f} s; "
              f"Redis used memory {r.info('memory')['used_memory'] / 2**20:.0f} MiB")
        busagent.init(server.url, prefix=PREFIX)
        print("| listing | rows | took | other client p50 | p99 | max |")
        print("|---|---|---|---|---|---|")
        _during(server.url, "nothing (baseline, 2 s)", lambda: time.sleep(2) or 0)
        _during(server.url, "`admin.iter_agents()` (HSCAN pages)",
                lambda: sum(1 for _ in iter_agents()))

        def cli() -> int:
            env = {**os.environ, "BUSAGENT_REDIS_URL": server.url, "BUSAGENT_PREFIX": PREFIX}
            out = subprocess.run([sys.executable, "-m", "busagent.cli", "agents", "--json"],
                                 env=env, cwd=ROOT, stdout=subprocess.PIPE, check=True)
            return out.stdout.count(b"\n") - 2  # "[\n" rows... "\n]\n"

        _during(server.url, "`busagent agents --json` (CLI, streamed)", cli)
        _during(server.url, "one `HVALS` (the old listing)", lambda: len(r.hvals(key)))
    finally:
        busagent.shutdown()
        server.stop()


if __name__ == "__main__":
    main()
