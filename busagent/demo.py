"""``busagent demo``: the DAG of AgentScope's distribution tutorial
(A->B, A->C, B,C->D, E->F) with agents that each take 1 s. Written centrally; runs in parallel
wherever the data allows, so it takes about the longest path (3 s), not the sum (6 s)."""

from __future__ import annotations

import time
from typing import Any

import busagent
from busagent import Agent, Msg


class Sleeper(Agent):
    """Sleeps, then says which inputs it saw."""

    def __init__(self, name: str, seconds: float = 1.0) -> None:
        super().__init__(name)
        self.seconds = seconds

    def reply(self, *xs: Msg | None) -> Msg:
        self.memory.add([x for x in xs if x is not None])
        time.sleep(self.seconds)
        seen = "+".join(str(x.content) for x in xs if x is not None)
        return Msg(self.name, f"{self.name}({seen})", role="assistant")


def run_dag(seconds: float = 1.0, server: str | None = None) -> tuple[Any, Any, float]:
    to_dist = busagent.DistConf(server=server)
    # mypy does not model the to_dist= constructor argument (a metaclass __call__).
    a, b, c, d, e, f = (Sleeper(n, seconds, to_dist=to_dist) for n in "ABCDEF")  # type: ignore[call-arg]
    for agent in (a, b, c, d, e, f):
        agent.ready()  # type: ignore[attr-defined]
    start = time.perf_counter()
    xa = a(Msg("user", "go"))
    xb, xc = b(xa), c(xa)
    xd = d(xb, xc)
    xe = e(Msg("user", "go"))
    xf = f(xe)
    d_out, f_out = busagent.gather([xd, xf])
    return d_out, f_out, time.perf_counter() - start


def main(url: str | None = None) -> None:
    busagent.init(url)
    d, f, took = run_dag()
    print(f"D says {d.content}")
    print(f"F says {f.content}")
    print(f"6 agents x 1 s each, longest path 3 s: took {took:.2f} s")
