"""Guess 2/3 of the average: N participants, S shards, R rounds.

    python examples/guess_two_thirds/main.py --agents 1000 --shards 4 --rounds 3 --sleep 0
    BUSAGENT_REDIS_URL=redis://host:6379/0 python examples/guess_two_thirds/main.py ...  # workers
        already running elsewhere with --agents examples/guess_two_thirds/agents.py

Per round it prints the average and the time the round took, and writes result_<r>.json
(``data``, ``stats {win, cnt, avg, med, std, max, min, time}``) and, when matplotlib is installed,
a 101-bin histogram with a line at the winning value, as PNG and PDF, under
``result/<exp>/random/<N>-<S>-<ratio>/<timestamp>/``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from datetime import datetime
from fractions import Fraction
from pathlib import Path
from typing import Any

import busagent
from busagent import Msg

sys.path.insert(0, str(Path(__file__).resolve().parent))
from agents import Group, RandomParticipant

PROMPT = ("You are playing a game: pick an integer from 0 to {max}. The winner is whoever is "
          "closest to {ratio} of the average of all numbers.{last}")


def progress(label: str, done: int, total: int) -> None:
    width = 30
    filled = width * done // max(total, 1)
    end = "\n" if done >= total else ""
    print(f"\r{label:<22} [{'#' * filled}{'.' * (width - filled)}] {done}/{total}", end=end,
          flush=True)


def create(n: int, shards: int, max_value: int, sleep: float) -> list[Any]:
    """Create participants in bulk, then the shards that own them (no participant dropped:
    the first n % shards shards get one more)."""
    ps = []
    for i in range(n):
        ps.append(RandomParticipant(f"p{i}", max_value, sleep, to_dist=True))
        if i % 1000 == 999 or i == n - 1:
            progress("creating participants", i + 1, n)
    busagent.gather([p._created for p in ps], timeout=600)
    groups = [[p.agent_id for p in ps[s::shards]] for s in range(shards)]
    gs = [Group(f"group{s}", ids, max_value, to_dist=True) for s, ids in enumerate(groups)]
    busagent.gather([g._created for g in gs], timeout=600)
    return gs


def play(args: argparse.Namespace) -> Path:
    busagent.init(child_workers=args.workers)
    ratio = Fraction(args.ratio)
    settings = f"{args.agents}-{args.shards}-{args.ratio.replace('/', '_')}"
    out = (Path(args.out) / args.exp / "random" / settings
           / datetime.now().strftime("%Y%m%d-%H%M%S"))
    out.mkdir(parents=True, exist_ok=True)
    shards = create(args.agents, args.shards, args.max_value, args.sleep)
    last = ""
    for r in range(1, args.rounds + 1):
        prompt = PROMPT.format(max=args.max_value, ratio=ratio, last=last)
        t = time.perf_counter()
        results = busagent.gather([g(Msg("Moderator", prompt)) for g in shards], timeout=3600)
        took = time.perf_counter() - t
        data = [v for res in results for v in res["values"]]
        total, cnt = sum(res["sum"] for res in results), sum(res["cnt"] for res in results)
        avg = total / cnt if cnt else 0.0
        win = avg * float(ratio)
        print(f"Moderator: The average value of round {r} is {avg:.2f} [takes {took:.3f} s]")
        stats = {"win": win, "cnt": cnt, "avg": avg, "med": statistics.median(data) if data else 0,
                 "std": statistics.pstdev(data) if data else 0, "max": max(data, default=0),
                 "min": min(data, default=0), "time": took}
        (out / f"result_{r}.json").write_text(json.dumps({"data": data, "stats": stats}))
        histogram(data, win, args.max_value, out / f"result_{r}")
        last = f" The winning number of the last round was {win:.2f}."
    return out


def histogram(data: list[int], win: float, max_value: int, base: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return  # the figures are optional: pip install matplotlib
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.hist(data, bins=max_value + 1, range=(0, max_value + 1))
    ax.axvline(win, color="red")
    ax.set_xlabel("value")
    ax.set_ylabel("participants")
    for ext in ("png", "pdf"):
        fig.savefig(f"{base}.{ext}")
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--agents", type=int, default=100)
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--ratio", default="2/3")
    ap.add_argument("--max-value", type=int, default=100)
    ap.add_argument("--sleep", type=float, default=1.0, help="seconds each participant takes")
    ap.add_argument("--workers", type=int, default=2, help="child worker processes, when needed")
    ap.add_argument("--exp", default="guess_two_thirds")
    ap.add_argument("--out", default="result")
    args = ap.parse_args()
    print(f"results in {play(args)}")


if __name__ == "__main__":
    main()
