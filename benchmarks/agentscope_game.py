"""AgentScope 0.1.6's distributed mode playing the same game, for the side-by-side table.

Runs in its own virtualenv (it pins old packages), never in busagent's:

    python -m venv .venv-agentscope
    .venv-agentscope/bin/pip install "agentscope[distribute]==0.1.6" tqdm
    .venv-agentscope/bin/python benchmarks/agentscope_game.py --agents 1000 --rounds 3

Two agent servers on this machine (as busagent's two workers), participants spread over them
alternately, the moderator calling every participant and reading every reply (AgentScope's own
example adds env shards in between; without them it has less to do, not more).
"""

from __future__ import annotations

import argparse
import random
import socket
import statistics
import time
from typing import Any

import agentscope
from agentscope.agents import AgentBase
from agentscope.message import Msg
from agentscope.server import RpcAgentServerLauncher


class RandomParticipant(AgentBase):
    def __init__(self, name: str, max_value: int = 100, sleep_time: float = 0.0) -> None:
        super().__init__(name=name)
        self.max_value = max_value
        self.sleep_time = sleep_time

    def reply(self, x: Any = None) -> Msg:
        if self.sleep_time:
            time.sleep(self.sleep_time)
        return Msg(self.name, random.randint(0, self.max_value), role="assistant")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return int(s.getsockname()[1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--agents", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--sleep", type=float, default=0.0)
    ap.add_argument("--servers", type=int, default=2)
    ap.add_argument("--capacity", type=int, default=32, help="threads per agent server")
    args = ap.parse_args()
    agentscope.init(project="busagent-side-by-side", logger_level="WARNING")
    ports = [free_port() for _ in range(args.servers)]
    launchers = [RpcAgentServerLauncher(host="localhost", port=p, capacity=args.capacity,
                                        max_pool_size=max(8192, args.agents * 2),
                                        custom_agent_classes=[RandomParticipant],
                                        local_mode=True) for p in ports]
    for launcher in launchers:
        launcher.launch(in_subprocess=True)
    try:
        t = time.perf_counter()
        ps = [RandomParticipant(f"p{i}", 100, args.sleep,
                                to_dist={"host": "localhost", "port": ports[i % len(ports)]})
              for i in range(args.agents)]
        created = time.perf_counter() - t
        times = []
        for r in range(1, args.rounds + 1):
            t = time.perf_counter()
            replies = [p(Msg("Moderator", "pick a number", role="user")) for p in ps]
            values = [int(x.content) for x in replies]  # 0.1.6 returns the content as text
            took = time.perf_counter() - t
            times.append(took)
            print(f"Moderator: The average value of round {r} is "
                  f"{statistics.mean(values):.2f} [takes {took:.3f} s]", flush=True)
        print(f"agentscope agents={args.agents} sleep={args.sleep:g} create_s={created:.2f} "
              f"round_s_median={statistics.median(times):.3f}", flush=True)
    finally:
        for launcher in launchers:
            launcher.shutdown()


if __name__ == "__main__":
    main()
