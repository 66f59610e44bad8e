"""Break a game's results down by a population attribute (the paper compares guesses by
profession and education).

    python examples/guess_two_thirds/analysis.py RUN_DIR --by occupation --by education

RUN_DIR is one run's directory (``result_<r>.json`` files written with ``--population``). For
each attribute it writes ``by_<attr>.csv`` (attribute value, round, participants, valid
answers, mean, standard deviation, median, tokens) and, with matplotlib, ``by_<attr>.png``: the
average guess per group per round with its spread (one standard deviation) as a band.
Numeric attributes with many values (age, income) are cut into five equal-width bins (whole
numbers into whole-number bins, both ends included).
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
from pathlib import Path
from typing import Any

#: a numeric attribute with more distinct values than this is binned
MAX_GROUPS = 8
BINS = 5


def groups_of(values: list[Any]) -> dict[Any, str]:
    """Each attribute value's group label: itself, or its bin for a many-valued number."""
    distinct = sorted(set(values), key=str)
    numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in distinct)
    if not numeric or len(distinct) <= MAX_GROUPS:
        return {v: str(v) for v in distinct}
    lo, hi = min(distinct), max(distinct)
    if all(isinstance(v, int) for v in distinct):
        # whole numbers get whole-number bins, both ends included ("20-31", "32-43"): an age
        # bin "20-31.2" would name ages nobody can have
        step = -(-(hi - lo + 1) // BINS)
        first = {v: lo + (v - lo) // step * step for v in distinct}
        return {v: f"{a}-{min(hi, a + step - 1)}" for v, a in first.items()}
    width = (hi - lo) / BINS or 1
    out = {}
    for v in distinct:
        b = min(BINS - 1, int((v - lo) / width))
        out[v] = f"{lo + b * width:g}-{lo + (b + 1) * width:g}"
    return out


def breakdown(run: Path, attr: str) -> list[dict[str, Any]]:
    """Rows ``{attr, round, n, valid, mean, std, median, prompt_tokens,
    completion_tokens}``, per group per round. Raises SystemExit when the run has no
    attributes (played without --population) or not this one."""
    rounds = sorted(run.glob("result_*.json"), key=lambda f: int(f.stem.split("_")[1]))
    if not rounds:
        raise SystemExit(f"error: no result_<r>.json in {run}")
    table: list[dict[str, Any]] = []
    for f in rounds:
        people = json.loads(f.read_text()).get("participants") or []
        if not people or "attributes" not in people[0]:
            raise SystemExit(f"error: {f} has no participants' attributes: play with "
                             "--population")
        if attr not in people[0]["attributes"]:
            raise SystemExit(f"error: no attribute {attr!r}; the population has "
                             f"{sorted(people[0]['attributes'])}")
        label = groups_of([p["attributes"][attr] for p in people])
        by: dict[str, list[dict[str, Any]]] = {}
        for p in people:
            by.setdefault(label[p["attributes"][attr]], []).append(p)
        for group in sorted(by, key=_order):
            ps = by[group]
            vals = [p["value"] for p in ps if p["value"] is not None]
            table.append({
                attr: group, "round": int(f.stem.split("_")[1]), "n": len(ps),
                "valid": len(vals),
                "mean": round(statistics.fmean(vals), 3) if vals else None,
                "std": round(statistics.pstdev(vals), 3) if vals else None,
                "median": statistics.median(vals) if vals else None,
                "prompt_tokens": sum((p.get("tokens") or [0, 0])[0] for p in ps),
                "completion_tokens": sum((p.get("tokens") or [0, 0])[1] for p in ps),
            })
    return table


def _order(label: str) -> tuple[float, str]:
    head = label.split("-")[0]
    try:
        return float(head), label
    except ValueError:
        return float("inf"), label


def analyse(run: Path, attrs: list[str]) -> list[Path]:
    """Write the table and plot of each attribute into ``run``; returns the files written."""
    written = []
    for attr in attrs:
        table = breakdown(run, attr)
        path = run / f"by_{attr}.csv"
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(table[0]))
            w.writeheader()
            w.writerows(table)
        written.append(path)
        print(f"{attr:>14} {'round':>5} {'n':>5} {'mean':>7} {'std':>7}")
        for row in table:
            mean = "-" if row["mean"] is None else f"{row['mean']:.2f}"
            std = "-" if row["std"] is None else f"{row['std']:.2f}"
            print(f"{row[attr]:>14} {row['round']:>5} {row['n']:>5} {mean:>7} {std:>7}")
        png = plot(table, attr, run / f"by_{attr}.png")
        if png:
            written.append(png)
    return written


def plot(table: list[dict[str, Any]], attr: str, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None  # the figures are optional: pip install matplotlib
    fig, ax = plt.subplots(figsize=(7, 4))
    for group in dict.fromkeys(r[attr] for r in table):
        rows = [r for r in table if r[attr] == group and r["mean"] is not None]
        xs = [r["round"] for r in rows]
        mean = [r["mean"] for r in rows]
        std = [r["std"] for r in rows]
        (line,) = ax.plot(xs, mean, "o-", label=f"{group} (n={rows[0]['n'] if rows else 0})")
        ax.fill_between(xs, [m - s for m, s in zip(mean, std, strict=True)],
                        [m + s for m, s in zip(mean, std, strict=True)],
                        color=line.get_color(), alpha=0.12)
    ax.set_xlabel("round")
    ax.set_ylabel("guess: mean (band: one std)")
    ax.set_title(f"guesses by {attr}")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize=8)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", type=Path, help="one run's directory (result_<r>.json files)")
    ap.add_argument("--by", action="append", required=True, metavar="ATTR",
                    help="a population attribute to break results down by (repeatable)")
    args = ap.parse_args()
    for f in analyse(args.run, args.by):
        print(f"wrote {f}")


if __name__ == "__main__":
    main()
