"""Quickstart: a centrally written flow that runs in parallel wherever the data allows.

    python examples/quickstart.py            # workers are started for you (child processes)
    BUSAGENT_REDIS_URL=redis://host:6379/0 python examples/quickstart.py

The DAG from AgentScope's distribution tutorial: A->B, A->C, B,C->D, E->F. Every agent takes
1 s, so run one after another it would take 6 s; here it takes the longest path, A->B->D, 3 s.
"""

from __future__ import annotations

import time

import busagent
from busagent import Agent, Msg


class Worker(Agent):
    """Takes a second to think, then says what it saw."""

    def __init__(self, name: str, seconds: float = 1.0) -> None:
        super().__init__(name)
        self.seconds = seconds

    def reply(self, *inputs: Msg | None) -> Msg:
        self.memory.add([x for x in inputs if x is not None])
        time.sleep(self.seconds)
        seen = " + ".join(str(x.content) for x in inputs if x is not None)
        return Msg(self.name, f"{self.name}[{seen}]", role="assistant")


def main() -> None:
    busagent.init()
    # Built on workers, not here: this class is loaded there from this very file.
    a, b, c, d, e, f = (Worker(name, to_dist=True) for name in "ABCDEF")
    for agent in (a, b, c, d, e, f):
        agent.ready()
    print("agents:", ", ".join(f"{x.name}@{x.server}" for x in (a, b, c, d, e, f)))

    start = time.perf_counter()
    x_a = a(Msg("user", "task"))   # placeholders, returned at once
    x_b = b(x_a)                   # forwarded by reference: B's worker reads A's reply itself
    x_c = c(x_a)
    x_d = d(x_b, x_c)
    x_f = f(e(Msg("user", "task")))
    print("D:", x_d.content)       # reading a field waits for the reply
    print("F:", x_f.content)
    took = time.perf_counter() - start
    print(f"total {took:.2f} s for 6 agents of 1 s each (longest path 3 s, sum 6 s)")
    print("memory of D:", [m.content for m in d.memory.get()])


if __name__ == "__main__":
    main()
