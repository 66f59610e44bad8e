"""What one agent, one call in flight and one unread reply cost in Redis memory.

    python benchmarks/memory.py [--agents 20000] [--calls 20000]

Measured with INFO memory around bulk operations on a fresh embedded Redis, on one worker.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import busagent
from busagent import Agent, Msg
from busagent.spawn import ensure_children

sys.path.insert(0, str(Path(__file__).parent))


class Gate(Agent):
    """Replies once the gate key exists: calls queue up in the inbox until then."""

    def reply(self, x: Msg | None = None) -> int:
        b = busagent.bus.current()
        while not b.redis.exists("gate"):
            time.sleep(0.05)
        return 1


class Tiny(Agent):
    def reply(self, x: Msg | None = None) -> int:
        return 1


def used(b: busagent.bus.Bus) -> int:
    return int(b.redis.info("memory")["used_memory"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--agents", type=int, default=20000)
    ap.add_argument("--calls", type=int, default=20000)
    o = ap.parse_args()
    b = busagent.init(child_workers=1)
    ensure_children(b, str(Path(__file__).resolve()))

    m0 = used(b)
    agents = [Tiny(f"t{i}", to_dist=True) for i in range(o.agents)]
    busagent.gather([a._created for a in agents if a._created], timeout=300)
    m1 = used(b)
    per_agent = (m1 - m0) / o.agents

    # Replies written and not yet expired (the creation replies above are as many).
    ps = [agents[i % o.agents](None) for i in range(o.calls)]
    busagent.gather(ps, timeout=300)
    m2 = used(b)
    per_reply = (m2 - m1) / o.calls

    g = Gate("gate", to_dist=True).ready()
    m3 = used(b)
    held = [g(Msg("user", i)) for i in range(o.calls)]
    b.sender.flush()
    time.sleep(1.0)  # let the worker read what it will: pending entries cost the same
    m4 = used(b)
    per_call = (m4 - m3) / o.calls
    b.redis.set("gate", 1)
    busagent.gather(held, timeout=300)
    print(f"per agent (registry record, no memory):  {per_agent:7.0f} bytes")
    print(f"per reply kept for reply_ttl:            {per_reply:7.0f} bytes")
    print(f"per call in flight (inbox entry + PEL):  {per_call:7.0f} bytes")


if __name__ == "__main__":
    main()
