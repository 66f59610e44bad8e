"""Issue 10, items 13-16: the busagent command and the embedded Redis, run as a user runs them
(a real redis-server, real workers, the command in a subprocess through a pipe)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import redis

import busagent
from busagent import DistConf, Msg
from tests.agents import Adder

from .conftest import ROOT, Workers, wait_for


def cli(url: str | None, prefix: str, *args: str, columns: int = 40,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The command as a user runs it in a narrow terminal or a pipe (stdout is a pipe here)."""
    e = {**os.environ, "BUSAGENT_PREFIX": prefix, "PYTHONPATH": str(ROOT),
         "COLUMNS": str(columns), **(env or {})}
    if url is None:
        e.pop("BUSAGENT_REDIS_URL", None)
    else:
        e["BUSAGENT_REDIS_URL"] = url
    return subprocess.run([sys.executable, "-m", "busagent.cli", *args], env=e, cwd=ROOT,
                          capture_output=True, text=True, timeout=90)


def one_line_error(p: subprocess.CompletedProcess[str]) -> str:
    assert p.returncode != 0, p.stdout
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr
    assert "Traceback" not in p.stderr and "pydantic" not in p.stderr
    return lines[0]


# --- 13: text is data, tables are never cut ---------------------------------------------------


def test_text_is_printed_as_data_and_tables_are_not_cut(workers: Workers, redis_url: str,
                                                        prefix: str) -> None:
    server = "gpu-box-with-a-rather-long-name-b"
    workers.start(server)
    a = Adder("A[task]", to_dist=DistConf(server=server))
    a.observe(Msg("[red]critic[/red]", "[bold]x[/bold] and A[task] " + "long " * 30)).result(30)

    agents = cli(redis_url, prefix, "agents")
    assert agents.returncode == 0, agents.stderr
    assert "A[task]" in agents.stdout and a.agent_id in agents.stdout
    assert server in agents.stdout and "…" not in agents.stdout

    mem = cli(redis_url, prefix, "memory", a.agent_id)
    assert mem.returncode == 0, mem.stderr
    assert "[bold]x[/bold] and A[task] " + "long " * 29 in mem.stdout
    assert "[red]critic[/red]" in mem.stdout and "…" not in mem.stdout

    servers = cli(redis_url, prefix, "servers")
    assert servers.returncode == 0 and server in servers.stdout and "…" not in servers.stdout


def test_a_dead_letter_id_and_reason_are_printed_whole_and_readable(
    workers: Workers, redis_url: str, prefix: str, raw: redis.Redis
) -> None:
    """A malformed entry with no call id is dead-lettered: its id must be printed whole (so
    --replay can use it) and its reason as one readable line (no bytes reprs, no pydantic
    dump)."""
    workers.start("w1")
    raw.xadd(f"{prefix}:inbox:w1", {"v": "not-a-number", "kind": "call", "body": b"\xff\x00"})
    wait_for(lambda: raw.xlen(f"{prefix}:deadletter"), what="a dead letter")
    with redis.Redis.from_url(redis_url) as binary:  # the entry's body is not text
        [(entry, _)] = binary.xrange(f"{prefix}:deadletter")
    entry_id = entry.decode()
    table = cli(redis_url, prefix, "deadletter")
    assert table.returncode == 0, table.stderr
    assert entry_id in table.stdout.split()
    [row] = json.loads(cli(redis_url, prefix, "deadletter", "--json").stdout)
    reason = row["reason"]
    assert "\n" not in reason and "b'" not in reason and "errors.pydantic" not in reason, reason
    assert "v" in reason and "integer" in reason, reason


# --- 14: one-line errors ---------------------------------------------------------------------


def test_every_bad_input_is_one_line(redis_url: str, prefix: str, tmp_path: Path) -> None:
    (tmp_path / "broken.py").write_text("class A(:\n")
    cases: list[tuple[tuple[str, ...], dict[str, str], str]] = [
        (("servers", "--redis", "localhost:6391"), {}, "scheme"),
        (("servers", "--redis", "redis://h:notaport/0"), {}, "Redis URL"),
        (("worker", "--agents", str(tmp_path / "broken.py")), {}, "does not compile"),
        (("worker", "--agents", "examples/"), {}, "is a folder"),
        (("worker", "--agents", str(tmp_path)), {}, "is a folder"),
        (("deadletter", "--replay", "bogus"), {}, "bogus"),
        (("deadletter", "--replay", "1-1"), {}, "no dead-letter entry"),
        (("servers", "--prefix", "a b"), {}, "prefix"),
        (("servers",), {"BUSAGENT_HEARTBEAT": "abc"}, "heartbeat"),
        (("servers",), {"BUSAGENT_CALL_TIMEOUT": "-1"}, "call_timeout"),
        (("servers", "--bogus"), {}, "--bogus"),
        (("worker", "--agents", "tests.agents", "--capacity", "many"), {}, "capacity"),
        (("nosuchcommand",), {}, "nosuchcommand"),
    ]
    for args, env, says in cases:
        line = one_line_error(cli(redis_url, prefix, *args, env=env))
        assert says in line, (args, line)


def test_stop_on_a_dead_worker_answers_at_once_and_removes_its_record(
    workers: Workers, redis_url: str, prefix: str
) -> None:
    """`busagent stop` on a worker that died (kill -9, no live worker left to sweep it) does not
    wait on an inbox nobody reads: it removes the dead server's record and its agents."""
    p = workers.start("w1")
    a = Adder("a", to_dist=DistConf(server="w1"))
    a(Msg("user", 1)).result(30)
    p.send_signal(signal.SIGKILL)
    p.wait()
    wait_for(lambda: json.loads(cli(redis_url, prefix, "servers", "--json").stdout)[0]["state"]
             == "dead", timeout=20, what="the worker shown dead")
    drain = cli(redis_url, prefix, "stop", "w1", "--drain")
    assert "dead" in one_line_error(drain)
    # No waiting on the inbox nobody reads (that waited its 30 s control timeout, then said
    # CallTimeout): the dead server is removed, with its agent.
    out = cli(redis_url, prefix, "stop", "w1")
    assert out.returncode == 0, out.stderr
    assert "was dead" in out.stdout and "removed its record, 1 agent(s)" in out.stdout
    assert json.loads(cli(redis_url, prefix, "servers", "--json").stdout) == []
    assert json.loads(cli(redis_url, prefix, "agents", "--json").stdout) == []
    assert "not registered" in one_line_error(cli(redis_url, prefix, "memory", a.agent_id))


# --- 15: the embedded Redis ------------------------------------------------------------------


def redis_cli(cache: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`busagent redis ...` with its own cache folder, so it never meets the shared one."""
    return cli(None, "busagent", "redis", *args, env={"XDG_CACHE_HOME": str(cache)})


def _kill_servers_in(folder: Path) -> None:
    """Whatever redis-server runs in ``folder`` (one a failed run left behind)."""
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and Path(proc, "cwd").resolve().is_relative_to(folder):
                os.kill(int(proc.name), signal.SIGKILL)
        except OSError:
            continue


def test_the_embedded_redis_does_what_it_is_told_or_says_why(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    password = "Xk3/Pq+Zr9w=p@ss#word"
    port = str(busagent.embedded.free_port())
    try:
        started = redis_cli(cache, "--port", port, "--password", password)
        assert started.returncode == 0, started.stderr
        url = started.stdout.strip()
        with redis.Redis.from_url(url) as r:
            assert r.ping()
        # The same again: the running one's URL. Other options: refused, saying why.
        assert redis_cli(cache, "--port", port, "--password", password).stdout.strip() == url
        for args in (["--bind", "0.0.0.0"], ["--password", "other"], ["--port", "1"]):
            line = one_line_error(redis_cli(cache, "--port", port, *args))
            assert "already runs" in line and "--stop" in line and password not in line, line
    finally:
        stopped = redis_cli(cache, "--stop")
        _kill_servers_in(tmp_path)
    assert stopped.returncode == 0 and "stopped" in stopped.stdout
    assert "not running" in redis_cli(cache, "--stop").stdout


def test_a_program_says_once_that_it_started_a_private_redis(tmp_path: Path) -> None:
    script = tmp_path / "flow.py"
    script.write_text(
        "import busagent\n"
        "busagent.init()\nbusagent.shutdown()\nbusagent.init()\n"
        "try:\n"
        "    busagent.ServerClient('gpu-1').stop()\n"
        "except busagent.BusagentError as e:\n"
        "    print(e)\n")
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), "TMPDIR": str(tmp_path),
           "PYTHONPATH": str(ROOT)}
    env.pop("BUSAGENT_REDIS_URL", None)
    p = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True,
                       timeout=60, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert p.stderr.count("private Redis") == 1, p.stderr
    assert "private Redis" in p.stdout, p.stdout
    assert not list(tmp_path.glob("busagent-redis-*"))


# --- 16: small ones ---------------------------------------------------------------------------


def test_version_and_readable_times(workers: Workers, redis_url: str, prefix: str) -> None:
    v = cli(redis_url, prefix, "--version")
    assert v.returncode == 0 and v.stdout.strip() == f"busagent {busagent.__version__}"
    workers.start("w1")
    info = cli(redis_url, prefix, "info", "w1")
    assert info.returncode == 0, info.stderr
    iso = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d"
    assert re.search(r"started\s+" + iso, info.stdout), info.stdout
    assert re.search(r"heartbeat\s+" + iso + r".*\(\d+(\.\d)? s ago\)", info.stdout), info.stdout
    assert re.search(r"mem\s+[\d.]+ MiB", info.stdout) and re.search(r"cpu\s+[\d.]+ %",
                                                                       info.stdout)
    servers = cli(redis_url, prefix, "servers")
    assert re.search(r"\d+(\.\d)? s ago", servers.stdout) and "MiB" in servers.stdout


def _options(path: Path) -> Any:
    return re.findall(r"add_argument\((.*?)\)\n", path.read_text(), re.S)


def test_every_example_option_has_help() -> None:
    for path in sorted((ROOT / "examples").rglob("*.py")):
        for call in _options(path):
            assert "help=" in call, (path, call)


def _guess_main() -> Any:
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "guess_main", ROOT / "examples" / "guess_two_thirds" / "main.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_guess_plots_say_what_they_show() -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.ticker import MaxNLocator

    main = _guess_main()
    fig = main.histogram_figure([10, 20, 20, 33], 13.89, 100, round_no=2, ratio="2/3")
    ax = fig.axes[0]
    assert "Round 2" in ax.get_title() and "4 participants" in ax.get_title()
    assert "2/3" in ax.get_title()
    [legend] = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "winner" in legend and "13.89" in legend
    written = " ".join(t.get_text() for t in ax.texts)
    assert "average 20.75" in written and "winner 13.89" in written
    locator = ax.yaxis.get_major_locator()
    assert isinstance(locator, MaxNLocator) and locator._integer
    assert "sleep" not in main.round_time_label({"kind": "vllm", "sleep": None})
    assert "1 s" in main.round_time_label({"kind": "random", "sleep": 1.0})


def test_the_chat_rooms_log_is_outside_the_working_tree_by_default() -> None:
    p = subprocess.run([sys.executable, str(ROOT / "examples" / "chat_room" / "main.py"),
                        "--help"], capture_output=True, text=True, timeout=60, cwd=ROOT,
                       env={**os.environ, "COLUMNS": "200"})
    assert p.returncode == 0, p.stderr
    default = re.search(r"--log LOG\s+.*\(default: (\S+)\)", p.stdout)
    assert default is not None, p.stdout
    assert not Path(default.group(1)).resolve().is_relative_to(ROOT)
