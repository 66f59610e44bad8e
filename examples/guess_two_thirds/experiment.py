"""Experiment sweeps: run a table of game cases one after another, then summarise them.

    python examples/guess_two_thirds/experiment.py configs/experiment.csv --name ratios \
        --out result
    python examples/guess_two_thirds/experiment.py configs/experiment.csv --name ratios \
        --out result --summary-only                 # only (re)draw the summary

The table (CSV with a header, or a JSON list of objects) has one case per row; every column is
optional and names a ``main.py`` option: ``agents, shards, ratio, agent_type, rounds, sleep,
max_value, model_config, config_name, fake_llm, sys_id, usr_id, population, by, workers``
(``hosts`` is accepted as another name for ``workers``: with workers already running on other
hosts, set BUSAGENT_REDIS_URL and the game uses them instead of starting any). Each case runs as
``main.py --exp NAME --out OUT`` so its results land in the paper's layout,
``OUT/NAME/<random|model>/<settings>/<timestamp>/``.

Resumable: ``OUT/NAME/experiment.json`` records each finished case (its row and its run
directory); running the sweep again skips those and runs the rest, so a sweep killed halfway
(or a case that failed) picks up where it stopped. A failed case is reported and the sweep goes
on; the exit status is 1 if any failed.

Then the summary, in ``OUT/NAME/``: ``summary.csv`` (one line per case per round: settings,
average, winner, spread, round time, tokens) and, with matplotlib, the paper's plots:
``avg_per_round.png`` (average per round, one line and colour per case),
``distributions.png`` (each case's guesses per round as box plots) and
``round_time_vs_agents.png`` (median round time against agents, per kind).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

MAIN = Path(__file__).resolve().parent / "main.py"
#: the columns a case may have, and main.py's option for each
OPTIONS = {"agents": "--agents", "shards": "--shards", "ratio": "--ratio",
           "agent_type": "--agent-type", "rounds": "--rounds", "sleep": "--sleep",
           "max_value": "--max-value", "model_config": "--model-config",
           "config_name": "--config-name", "fake_llm": "--fake-llm", "sys_id": "--sys-id",
           "usr_id": "--usr-id", "population": "--population", "by": "--by",
           "workers": "--workers", "hosts": "--workers"}


def read_cases(path: Path) -> list[dict[str, str]]:
    """The cases of a CSV or JSON table, values as strings; empty cells are dropped. Exits
    with a one-line error for an unknown column or an unreadable file."""
    try:
        if path.suffix.lower() == ".json":
            rows = [{k: str(v) for k, v in r.items() if v not in (None, "")}
                    for r in json.loads(path.read_text())]
        else:
            with path.open(newline="") as f:
                rows = [{k.strip(): v.strip() for k, v in r.items() if k and v and v.strip()}
                        for r in csv.DictReader(f)]
    except (OSError, ValueError, AttributeError) as e:
        raise SystemExit(f"error: cannot read cases from {path}: {e}") from e
    for n, r in enumerate(rows, 1):
        unknown = sorted(set(r) - set(OPTIONS))
        if unknown:
            raise SystemExit(f"error: case {n} of {path} has unknown column(s) {unknown}; "
                             f"use {sorted(OPTIONS)}")
    return rows


def key_of(case: dict[str, str]) -> str:
    """A case's identity: the same row is the same case whatever its position in the table."""
    return hashlib.sha256(json.dumps(case, sort_keys=True).encode()).hexdigest()[:12]


def run_case(case: dict[str, str], name: str, out: Path) -> Path:
    cmd = [sys.executable, str(MAIN), "--exp", name, "--out", str(out)]
    for col, value in case.items():
        cmd += [OPTIONS[col], value]
    p = subprocess.run(cmd, text=True, stdout=subprocess.PIPE, env=os.environ.copy())
    lines = p.stdout.strip().splitlines()
    for line in lines:
        if line.startswith("Moderator:") or line.startswith("  tokens"):
            print("   ", line.strip())
    if p.returncode != 0 or not lines or "results in " not in lines[-1]:
        raise RuntimeError(f"exit status {p.returncode}")
    return Path(lines[-1].split("results in ", 1)[1])


def sweep(table: Path, name: str, out: Path) -> int:
    """Run every case not yet done; returns how many failed."""
    cases = read_cases(table)
    root = out / name
    root.mkdir(parents=True, exist_ok=True)
    state_file = root / "experiment.json"
    state: dict[str, Any] = (json.loads(state_file.read_text()) if state_file.exists()
                             else {"cases": {}})
    failed = 0
    for n, case in enumerate(cases, 1):
        k = key_of(case)
        if k in state["cases"]:
            print(f"case {n}/{len(cases)} {case}: done before, skipped")
            continue
        print(f"case {n}/{len(cases)} {case}", flush=True)
        try:
            run_dir = run_case(case, name, out)
        except RuntimeError as e:
            failed += 1
            print(f"    failed ({e}); run the sweep again to retry it")
            continue
        state["cases"][k] = {"case": case, "run": str(run_dir), "order": n}
        # written after every case: a sweep killed later keeps what finished
        tmp = state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=1))
        tmp.replace(state_file)
    return failed


def summary(name: str, out: Path) -> list[Path]:
    """summary.csv and the plots across the finished cases; returns the files written."""
    root = out / name
    state = json.loads((root / "experiment.json").read_text())
    runs = sorted(state["cases"].values(), key=lambda c: c["order"])
    rows: list[dict[str, Any]] = []
    data: list[tuple[str, list[list[float]]]] = []
    for c in runs:
        run_dir = Path(c["run"])
        run = json.loads((run_dir / "run.json").read_text())
        label = f"{run['kind']} n={run['agents']} r={run['ratio']}"
        per_round = []
        for r in range(1, len(run["rounds"]) + 1):
            res = json.loads((run_dir / f"result_{r}.json").read_text())
            st = res["stats"]
            tokens = st.get("tokens") or {}
            rows.append({"case": c["order"], "kind": run["kind"], "agents": run["agents"],
                         "shards": run["shards"], "ratio": run["ratio"],
                         "sleep": run.get("sleep"), "population": run.get("population"),
                         "round": r, "avg": round(st["avg"], 4), "win": round(st["win"], 4),
                         "std": round(st["std"], 4), "cnt": st["cnt"],
                         "invalid": st["invalid"], "time_s": round(st["time"], 4),
                         "create_s": run["create_s"],
                         "prompt_tokens": tokens.get("prompt", 0),
                         "completion_tokens": tokens.get("completion", 0),
                         "run": str(run_dir)})
            per_round.append(res["data"])
        data.append((label, per_round))
    path = root / "summary.csv"
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"{'case':>4} {'kind':>8} {'agents':>7} {'ratio':>6} {'rounds':>6} "
          f"{'avg (last)':>10} {'round s (median)':>16} {'tokens':>9}")
    for c in sorted({r["case"] for r in rows}):
        rs = [r for r in rows if r["case"] == c]
        print(f"{c:>4} {rs[0]['kind']:>8} {rs[0]['agents']:>7} {rs[0]['ratio']:>6} "
              f"{len(rs):>6} {rs[-1]['avg']:>10.2f} "
              f"{statistics.median(r['time_s'] for r in rs):>16.3f} "
              f"{sum(r['prompt_tokens'] + r['completion_tokens'] for r in rs):>9}")
    return [path, *plots(rows, data, root)]


def case_colours(cases: list[Any]) -> dict[Any, tuple[float, ...]]:
    """One colour per case (two cases of one ratio must not look like one line): tab10 up to
    10 cases, tab20 up to 20, evenly spaced along a continuous map beyond."""
    from matplotlib import colormaps

    n = len(cases)
    if n <= 20:
        cmap = colormaps["tab10" if n <= 10 else "tab20"]
        return {c: tuple(cmap(i)) for i, c in enumerate(cases)}
    cmap = colormaps["turbo"]
    return {c: tuple(cmap(i / (n - 1))) for i, c in enumerate(cases)}


def plots(rows: list[dict[str, Any]], data: list[tuple[str, list[list[float]]]],
          root: Path) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []  # the figures are optional: pip install matplotlib
    written = []
    colour = case_colours(sorted({r["case"] for r in rows}))
    fig, ax = plt.subplots(figsize=(7, 4))
    for c in sorted({r["case"] for r in rows}):
        rs = [r for r in rows if r["case"] == c]
        ax.plot([r["round"] for r in rs], [r["avg"] for r in rs], "o-",
                color=colour[c],
                label=f"case {c}: ratio {rs[0]['ratio']}, {rs[0]['kind']}, n={rs[0]['agents']}")
    ax.set_xlabel("round")
    ax.set_ylabel("average guess")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize=7)
    written.append(root / "avg_per_round.png")
    fig.savefig(written[-1], bbox_inches="tight")
    plt.close(fig)

    fig, axes = plt.subplots(1, len(data), figsize=(3.2 * len(data), 3.4), sharey=True,
                             squeeze=False)
    for ax, (label, per_round) in zip(axes[0], data, strict=True):
        ax.boxplot(per_round)
        ax.set_title(label, fontsize=8)
        ax.set_xlabel("round")
    axes[0][0].set_ylabel("guesses")
    written.append(root / "distributions.png")
    fig.savefig(written[-1], bbox_inches="tight")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    kinds: dict[str, dict[int, list[float]]] = {}
    for r in rows:
        kinds.setdefault(f"{r['kind']} sleep={r['sleep'] or 0:g}", {}).setdefault(
            r["agents"], []).append(r["time_s"])
    for label, by_n in kinds.items():
        ns = sorted(by_n)
        ax.plot(ns, [statistics.median(by_n[n]) for n in ns], "o-", label=label)
    ax.set_xscale("log")
    ax.set_xlabel("agents")
    ax.set_ylabel("seconds per round (median)")
    ax.legend(fontsize=8)
    written.append(root / "round_time_vs_agents.png")
    fig.savefig(written[-1], bbox_inches="tight")
    plt.close(fig)
    return written


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("cases", type=Path, help="CSV or JSON table of cases")
    ap.add_argument("--name", default="experiment", help="the experiment's name (a folder)")
    ap.add_argument("--out", type=Path, default=Path("result"),
                    help="the folder the sweep writes its cases and summary under")
    ap.add_argument("--summary-only", action="store_true", help="only redo the summary")
    args = ap.parse_args()
    failed = 0 if args.summary_only else sweep(args.cases, args.name, args.out)
    if not (args.out / args.name / "experiment.json").exists():
        raise SystemExit(f"error: no finished case under {args.out / args.name}")
    for f in summary(args.name, args.out):
        print(f"wrote {f}")
    if failed:
        raise SystemExit(f"error: {failed} case(s) failed; run the sweep again to retry them")


if __name__ == "__main__":
    main()
