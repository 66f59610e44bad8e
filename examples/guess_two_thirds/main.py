"""Guess 2/3 of the average: N participants, S shards, R rounds.

    python examples/guess_two_thirds/main.py --agents 1000 --shards 4 --rounds 3 --sleep 0
    python examples/guess_two_thirds/main.py --agent-type llm --agents 100 --fake-llm 0.5
    python examples/guess_two_thirds/main.py --agent-type llm --model-config \
        examples/guess_two_thirds/configs/model_configs.json --config-name vllm
    BUSAGENT_REDIS_URL=redis://host:6379/0 python examples/guess_two_thirds/main.py ...  # workers
        already running elsewhere with --agents examples/guess_two_thirds/agents.py
    python examples/guess_two_thirds/main.py --table result     # round times across runs

Per round it prints the average and the time the round took, and writes result_<r>.json
(``data``, ``stats {win, cnt, avg, med, std, max, min, time, invalid}``) and, when matplotlib is
installed, a 101-bin histogram (titled with the round, N and the ratio; a labelled line at the
winning value; the average and winner written on it), as PNG and PDF, under
``result/<exp>/<random|config name>/<N>-<S>-<ratio>-<sleep>/<timestamp>/`` with ``run.json``
(the settings, creation time and per-round times) beside them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
import uuid
from datetime import datetime
from fractions import Fraction
from pathlib import Path
from typing import Any

import busagent
from busagent import Msg

sys.path.insert(0, str(Path(__file__).resolve().parent))
from agents import Group, LLMParticipant, RandomParticipant, prompts

PROMPTS = prompts()

NEXT_ROUND = "The winning number of the last round was {win:.2f}. On to the next round.\n"


def progress(label: str, done: int, total: int) -> None:
    if not sys.stdout.isatty() and done < total:
        return  # a log file gets the finished bars only
    width = 30
    filled = width * done // max(total, 1)
    end = "\n" if done >= total else ""
    print(f"\r{label:<22} [{'#' * filled}{'.' * (width - filled)}] {done}/{total}", end=end,
          flush=True)


def create(args: argparse.Namespace) -> list[Any]:
    """Create participants in bulk (a chunk of a thousand per message), then the shards that
    own them (no participant dropped: the first n % shards shards get one more)."""
    n, shards = args.agents, args.shards
    if args.agent_type == "random":
        cls: type = RandomParticipant
        items: list[Any] = [(f"p{i}", args.max_value, args.sleep) for i in range(n)]
    else:
        cls = LLMParticipant
        personas = PROMPTS["PERSONAS"]
        items = [(f"p{i}", args.config_name, args.max_value, args.ratio, args.sys_id,
                  personas[i % len(personas)] if args.persona else None) for i in range(n)]
        if args.people:  # --population: participant i is the population's person i
            items = [(*item[:5], person["background"])
                     for item, person in zip(items, args.people, strict=False)]
    # Owned by this program (deleted when it exits) unless --keep: then detached, so their
    # memories can be read afterwards (`busagent agents`, `busagent memory ID`).
    conf = busagent.DistConf(lifetime="detached" if args.keep else "owned")
    ps: list[Any] = []
    step = 10_000
    for i in range(0, n, step):
        ps.extend(busagent.create_many(cls, items[i : i + step], to_dist=conf))
        progress("creating participants", len(ps), n)
    busagent.gather([p._created for p in ps], timeout=3600)  # one reply per chunk
    for p in ps:
        p.ready()  # raises the first constructor error, if any (the replies are in hand)
    groups = [[p.agent_id for p in ps[s::shards]] for s in range(shards)]
    gs = [Group(f"group{s}", ids, args.max_value, to_dist=conf) for s, ids in enumerate(groups)]
    busagent.gather([g._created for g in gs], timeout=600)
    return gs


def play(args: argparse.Namespace) -> Path:
    args.people = load_people(args)
    check_by(args)
    busagent.init(child_workers=args.workers)
    kind = "random" if args.agent_type == "random" else args.config_name
    if args.fake_llm is not None:
        from busagent.fakellm import FakeLLM

        # The fake endpoint lives only as long as this run: its config gets a name of its own
        # (never --config-name, which may be a stored config other users build with) and is
        # removed at exit, so no stored config is left pointing at a dead port.
        fake = FakeLLM(latency=args.fake_llm).start()
        args.config_name = f"fake-llm-{uuid.uuid4().hex[:12]}"
        busagent.load_model_configs(fake.config(args.config_name, concurrency=256))
        try:
            return _play(args, kind)
        finally:
            with contextlib.suppress(busagent.BusagentError):
                busagent.models.remove_model_configs([args.config_name])
            fake.stop()
    if args.model_config:
        busagent.load_model_configs(args.model_config)
    return _play(args, kind)


def _play(args: argparse.Namespace, kind: str) -> Path:
    ratio = Fraction(args.ratio)
    settings = f"{args.agents}-{args.shards}-{args.ratio.replace('/', '_')}-{args.sleep:g}"
    out = (Path(args.out) / args.exp / kind / settings
           / datetime.now().strftime("%Y%m%d-%H%M%S"))
    out.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    shards = create(args)
    run = {"agents": args.agents, "shards": args.shards, "ratio": args.ratio, "kind": kind,
           "population": args.population, "tokens": [],
           "sleep": args.sleep if kind == "random" else None, "workers": args.workers,
           "create_s": round(time.perf_counter() - t, 3), "rounds": []}
    user = PROMPTS["USER"][args.usr_id]
    prompt = user
    for r in range(1, args.rounds + 1):
        t = time.perf_counter()
        pending = [g(Msg("Moderator", prompt)) for g in shards]
        results, got = [], 0
        for p in pending:  # in order: the round ends when the slowest shard has answered
            results.append(p.result(timeout=3600))
            got += results[-1]["cnt"] + results[-1]["invalid"]
            progress(f"round {r} replies", got, args.agents)
        took = time.perf_counter() - t
        data = [v for res in results for v in res["values"]]
        total, cnt = sum(res["sum"] for res in results), sum(res["cnt"] for res in results)
        avg = total / cnt if cnt else 0.0
        win = avg * float(ratio)
        print(f"Moderator: The average value of round {r} is {avg:.2f} [takes {took:.3f} s]")
        people, tokens = participants(args, results)
        stats = {"win": win, "cnt": cnt, "avg": avg, "med": statistics.median(data) if data else 0,
                 "std": statistics.pstdev(data) if data else 0, "max": max(data, default=0),
                 "min": min(data, default=0), "time": took,
                 "invalid": sum(res["invalid"] for res in results), "tokens": tokens}
        if tokens["reporting"]:
            print(f"  tokens: {tokens['prompt']:,} prompt + {tokens['completion']:,} completion "
                  f"({tokens['reporting']} participants reporting)")
        (out / f"result_{r}.json").write_text(json.dumps({"data": data, "stats": stats,
                                                          "participants": people}))
        histogram(data, win, args.max_value, out / f"result_{r}", round_no=r, ratio=args.ratio)
        run["rounds"].append(round(took, 4))
        run["tokens"].append(tokens)
        mem = memory_now()
        run.setdefault("memory", []).append(mem)
        print(f"  memory: Redis {mem['redis_mb']} MB, workers {mem['workers_mb']} MB "
              f"(whole servers, as of their last heartbeat)")
        (out / "run.json").write_text(json.dumps(run, indent=1))
        prompt = NEXT_ROUND.format(win=win) + user
    if args.by:
        from analysis import analyse

        analyse(out, args.by)
    return out


def load_people(args: argparse.Namespace) -> list[dict[str, Any]] | None:
    """The --population rows, one per participant (refused if there are fewer people than
    agents: reusing a person would make two participants one person)."""
    if not args.population:
        return None
    from busagent import population

    people = population.read(args.population)
    if len(people) < args.agents:
        raise SystemExit(f"error: {args.population} has {len(people)} people, fewer than "
                         f"--agents {args.agents}: build more with `busagent population build "
                         f"... --count {args.agents}`")
    return people[: args.agents]


def check_by(args: argparse.Namespace) -> None:
    """Refuse a --by the analysis could not do, before a round is played (not after a game
    that may have cost hours and tokens): --by needs --population, and each name must be an
    attribute of its people."""
    if not args.by:
        return
    if not args.people:
        raise SystemExit(f"error: --by {args.by[0]} needs --population: only a population's "
                         "people have attributes to group by")
    names = {k for person in args.people for k in person.get("attributes", {})}
    unknown = [b for b in args.by if b not in names]
    if unknown:
        raise SystemExit(f"error: --by {unknown[0]}: not an attribute of {args.population} "
                         f"(its attributes: {', '.join(sorted(names)) or 'none'})")


def participants(args: argparse.Namespace, results: list[dict[str, Any]]
                 ) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Each participant's value (None: invalid), tokens and, with --population, attributes;
    and the round's token totals. Shard s holds participants s, s + S, s + 2S, ... (see
    create), in that order."""
    people: list[dict[str, Any]] = []
    tokens = {"prompt": 0, "completion": 0, "reporting": 0}
    if not args.people and args.agent_type == "random":
        return people, tokens  # nothing to add to `data`: a million-agent round stays lean
    for s, res in enumerate(results):
        usage = res.get("usage")
        for k, value in enumerate(res.get("each", [])):
            i = s + k * args.shards
            used = usage[k] if usage else None
            row: dict[str, Any] = {"id": i, "value": value, "tokens": used}
            if args.people:
                row["attributes"] = args.people[i]["attributes"]
            if used:
                tokens["prompt"] += used[0]
                tokens["completion"] += used[1]
                tokens["reporting"] += 1
            people.append(row)
    people.sort(key=lambda p: int(p["id"]))
    return people, tokens


def memory_now() -> dict[str, float]:
    """Redis's used memory and the live workers' resident memory (from their heartbeats)."""
    b = busagent.bus.current()
    used = int(b.redis.info("memory")["used_memory"])
    workers = sum(s["mem"] for s in busagent.servers(include_dead=False))
    return {"redis_mb": round(used / 2**20, 1), "workers_mb": round(workers, 1)}


def table(root: Path, plot: bool) -> None:
    """Every run under ``root``: agents, kind, sleep, creation time, median round time."""
    runs = []
    for f in sorted(root.rglob("run.json")):
        run = json.loads(f.read_text())
        if run["rounds"]:
            runs.append({**run, "round_s": statistics.median(run["rounds"])})
    runs.sort(key=lambda r: (r["kind"], r["sleep"] or 0, r["agents"]))
    print(f"{'agents':>9} {'shards':>6} {'kind':>8} {'sleep':>5} {'create s':>9} "
          f"{'round s (median)':>17} {'rounds':>6} {'Redis B/agent':>14} {'workers B/agent':>16}")
    for r in runs:
        mem = (r.get("memory") or [{}])[-1]
        per = {k: f"{v * 2**20 / r['agents']:.0f}" for k, v in mem.items()}
        print(f"{r['agents']:>9} {r['shards']:>6} {r['kind']:>8} {r['sleep'] or 0:>5g} "
              f"{r['create_s']:>9.2f} {r['round_s']:>17.3f} {len(r['rounds']):>6} "
              f"{per.get('redis_mb', '-'):>14} {per.get('workers_mb', '-'):>16}")
    if plot and runs:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        series: dict[str, list[dict[str, Any]]] = {}
        for r in runs:
            series.setdefault(round_time_label(r), []).append(r)
        for label, rs in series.items():
            ax.plot([r["agents"] for r in rs], [r["round_s"] for r in rs], "o-", label=label)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("agents")
        ax.set_ylabel("seconds per round")
        ax.legend()
        fig.savefig(root / "round_times.png", bbox_inches="tight")
        print(f"plot: {root / 'round_times.png'}")


def round_time_label(run: dict[str, Any]) -> str:
    """A series of the round-time plot: random participants by their sleep, LLM participants by
    their model config (they have no sleep)."""
    if run["kind"] == "random":
        return f"random, {run['sleep'] or 0:g} s per answer"
    return f"LLM ({run['kind']})"


def histogram(data: list[int], win: float, max_value: int, base: Path, *, round_no: int = 1,
              ratio: str = "2/3") -> None:
    """Save :func:`histogram_figure` as ``base``.png and .pdf (nothing without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return  # the figures are optional: pip install matplotlib
    fig = histogram_figure(data, win, max_value, round_no=round_no, ratio=ratio)
    for ext in ("png", "pdf"):
        fig.savefig(f"{base}.{ext}", bbox_inches="tight")
    plt.close(fig)


def histogram_figure(data: list[int], win: float, max_value: int, *, round_no: int,
                     ratio: str) -> Any:
    """The choices of one round: one bar per value, titled with the round, N and the ratio, a
    labelled line at the winning value, the average and winner written on the figure, and
    whole-number count ticks."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    avg = sum(data) / len(data) if data else 0.0
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.hist(data, bins=max_value + 1, range=(0, max_value + 1))
    ax.axvline(win, color="red", label=f"winner: {ratio} x average = {win:.2f}")
    ax.set_title(f"Round {round_no}: {len(data)} participants, ratio {ratio}")
    ax.set_xlabel("value chosen")
    ax.set_ylabel("participants")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))  # counts are whole numbers
    ax.text(0.99, 0.97, f"average {avg:.2f}\nwinner {win:.2f}", transform=ax.transAxes,
            ha="right", va="top", bbox={"facecolor": "white", "alpha": 0.8})
    ax.legend(loc="upper left")
    return fig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--agents", type=int, default=100, help="participants in the game")
    ap.add_argument("--shards", type=int, default=2,
                    help="distributed agents that each host a share of the participants")
    ap.add_argument("--rounds", type=int, default=3, help="rounds to play")
    ap.add_argument("--ratio", default="2/3", choices=["1/2", "2/3", "3/5", "51/100", "67/100"],
                    help="the winner is closest to this ratio times the average")
    ap.add_argument("--max-value", type=int, default=100,
                    help="participants choose a whole number from 0 to this")
    ap.add_argument("--agent-type", choices=["random", "llm"], default="random",
                    help="random participants, or participants that ask a model")
    ap.add_argument("--sleep", type=float, default=1.0,
                    help="seconds each random participant takes")
    ap.add_argument("--model-config", help="JSON file of model configs to store for workers")
    ap.add_argument("--config-name", default="fake", help="the model config LLM agents use")
    ap.add_argument("--fake-llm", type=float, metavar="LATENCY",
                    help="serve a local fake endpoint answering in LATENCY s, for this run only "
                    "(stored under a name of its own, removed at exit; --config-name only "
                    "names the results' folder)")
    ap.add_argument("--sys-id", default="1", choices=sorted(PROMPTS["SYSTEM"]),
                    help="which system prompt of configs/prompts.json LLM participants get")
    ap.add_argument("--usr-id", default="1", choices=sorted(PROMPTS["USER"]),
                    help="which user prompt of configs/prompts.json starts each round")
    ap.add_argument("--persona", action="store_true", help="give LLM agents a background")
    ap.add_argument("--population", metavar="JSONL",
                    help="people built by `busagent population build`: participant i gets "
                    "person i's background (LLM agents: in the {background} slot of --sys-id 5, "
                    "appended to the other system prompts) and each round's results record "
                    "their attributes")
    ap.add_argument("--by", action="append", metavar="ATTR", default=[],
                    help="after the game, break results down by this population attribute "
                    "(table and plot, see analysis.py); repeatable")
    ap.add_argument("--workers", type=int, default=2, help="child worker processes, when needed")
    ap.add_argument("--keep", action="store_true",
                    help="keep the agents after the game (detached), to read their memories")
    ap.add_argument("--exp", default="guess_two_thirds",
                    help="experiment name: a folder under --out")
    ap.add_argument("--out", default="result", help="folder the results are written under")
    ap.add_argument("--table", metavar="DIR", help="print the runs under DIR and exit")
    ap.add_argument("--plot", action="store_true", help="with --table: plot round time vs agents")
    args = ap.parse_args()
    if args.table:
        table(Path(args.table), args.plot)
        return
    print(f"results in {play(args)}")


if __name__ == "__main__":
    main()
