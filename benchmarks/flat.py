"""A million calls, sampling Redis memory and worker memory as they go: both should stay flat
(streams hold only calls in flight, replies expire).

    python benchmarks/flat.py [--calls 1000000] [--reply-ttl 5]

Replies expire after --reply-ttl seconds here so that the run reaches the steady state where
expiring keeps pace with writing; with the default reply_ttl (1 hour) Redis holds an hour of
unread replies, then is flat at that level.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import psutil

import busagent
from busagent import Agent, Msg


class Echo(Agent):
    def reply(self, x: Msg | None = None) -> int:
        self.memory.clear()  # keep the agents' memory out of the measurement
        return 1


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=1_000_000)
    ap.add_argument("--agents", type=int, default=1000)
    ap.add_argument("--window", type=int, default=10_000)
    ap.add_argument("--reply-ttl", type=int, default=5)
    o = ap.parse_args()
    b = busagent.init(reply_ttl=o.reply_ttl)
    agents = [Echo(f"e{i}", to_dist=True) for i in range(o.agents)]
    busagent.gather([a._created for a in agents if a._created], timeout=120)
    workers = [psutil.Process(p.pid) for p in b.children.procs.values()]
    rows = []
    t0 = time.perf_counter()
    msg = Msg("user", "x")
    for done in range(0, o.calls, o.window):
        busagent.gather([agents[i % o.agents](msg) for i in range(o.window)], timeout=120)
        if (done // o.window) % max(1, (o.calls // o.window) // 10) == 0:
            rows.append({
                "calls": done + o.window,
                "redis_mb": round(int(b.redis.info("memory")["used_memory"]) / 2**20, 1),
                "worker_rss_mb": [round(w.memory_info().rss / 2**20, 1) for w in workers],
                "inbox_entries": sum(int(b.redis.xlen(b.keys.inbox(n))) for n in b.children.procs),
                "seconds": round(time.perf_counter() - t0, 1),
            })
            print(json.dumps(rows[-1]), flush=True)
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / "flat.json").write_text(json.dumps({"rows": rows, "args": vars(o)}, indent=2))


if __name__ == "__main__":
    main()
