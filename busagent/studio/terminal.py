"""``busagent status``, ``top`` and ``logs``: the studio's figures in a terminal (rich)."""

from __future__ import annotations

import contextlib
import datetime
import os
import select
import sys
import time
from collections.abc import Iterator
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from . import data


def _mib(v: float) -> str:
    return f"{v:,.0f} MiB" if v >= 10 else f"{v:.1f} MiB"


def _ms(s: float | None) -> str:
    return "-" if s is None else f"<={s * 1000:g} ms"


def _dur(s: float) -> str:
    s = int(s)
    return f"{s // 86400}d{s % 86400 // 3600}h" if s >= 86400 else (
        f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s")


def status_text(summ: dict[str, Any]) -> Group:
    """The one screen of ``busagent status`` (like ``ray status``)."""
    st = summ["servers"]
    mem = summ["redis"]["used_memory"] or 0
    head = Text.assemble(
        ("Servers: ", "bold"), f"{st['up']} up, {st['late']} late, {st['stopping']} stopping, "
        f"{st['dead']} dead\n",
        ("Agents: ", "bold"), f"{summ['agents']:,}\n",
        ("Calls: ", "bold"), f"{summ['inflight']:,} in flight, {summ['rate']:,.1f}/s, "
        f"{summ['calls']:,} answered ({summ['errors']:,} errors)\n",
        ("Redis: ", "bold"), f"{mem / 2**20:,.1f} MiB used, version {summ['redis']['version']}\n",
        ("Dead letters: ", "bold"), f"{summ['deadletters']:,}",
    )
    t = Table("server", "state", "host", "pid", "cpu %", "memory", "agents", "in flight",
              "calls/s", "p50", "p99", "uptime", title=None)
    for s in sorted(summ["rows"], key=_load, reverse=True):
        state = s["state"] if s["state"] in ("up", "stopping") else f"{s['state']} ({s['age']}s)"
        t.add_row(s["name"], state, s["host"], str(s["pid"]), f"{s['cpu']:.0f}", _mib(s["mem"]),
                  f"{s['agents']:,}/{s['capacity']:,}", f"{s['inflight']:,}", f"{s['rate']:,.1f}",
                  _ms(s["p50"]), _ms(s["p99"]), _dur(s["uptime"]))
    return Group(head, t)


def _load(s: dict[str, Any]) -> tuple[bool, float, int]:
    """Busiest first: live before dead, then by CPU, then calls in flight."""
    return (s["state"] != "dead", s["cpu"] + s["rate"], s["inflight"])


@contextlib.contextmanager
def _keys() -> Iterator[Any]:
    """stdin in cbreak mode while a terminal (so ``q`` needs no Enter); a no-op otherwise."""
    if not sys.stdin.isatty():
        yield None
        return
    import termios
    import tty

    fd = sys.stdin.fileno()
    old = termios.tcgetattr(fd)
    try:
        tty.setcbreak(fd)
        yield fd
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, old)


def top(console: Console, interval: float = 1.0, frames: int | None = None) -> None:
    """A live view, servers sorted by load, until ``q`` or Ctrl-C (or ``frames`` frames)."""
    shown = 0
    with _keys() as fd, Live(console=console, auto_refresh=False, screen=False) as live:
        try:
            while frames is None or shown < frames:
                summ = data.summary()
                stamp = datetime.datetime.now().strftime("%H:%M:%S")
                live.update(Group(Text(f"busagent top  {stamp}  (q to quit)", style="bold"),
                                  status_text(summ)), refresh=True)
                shown += 1
                if fd is not None:
                    ready, _, _ = select.select([fd], [], [], interval)
                    if ready and os.read(fd, 1) in (b"q", b"Q"):
                        return
                else:
                    time.sleep(interval)
        except KeyboardInterrupt:
            return


def print_logs(console: Console, server: str, count: int, follow: bool,
               interval: float = 0.5) -> None:
    """The worker's newest ``count`` log lines; with ``follow``, new ones as they come."""
    last = ""
    while True:
        for line in data.logs(server, after=last, count=count if not last else 1000):
            last = line["id"]
            t = datetime.datetime.fromtimestamp(line["t"]).strftime("%Y-%m-%d %H:%M:%S")
            console.print(f"{t} {line['level']:<7} {line['logger']}: {line['msg']}",
                          markup=False, highlight=False, soft_wrap=True)
        if not follow:
            return
        if not last:
            last = "0-0"  # nothing yet: everything from now on is new
        time.sleep(interval)
