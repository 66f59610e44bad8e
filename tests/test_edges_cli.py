"""Issue 10, items 13-16: the busagent command and the embedded Redis, run as a user runs them
(a real redis-server, real workers, the command in a subprocess through a pipe)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
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


# --- review of issue 10 (a new user's second pass) ------------------------------------------


def test_an_agent_module_that_fails_at_import_is_one_line(redis_url: str, prefix: str,
                                                           tmp_path: Path) -> None:
    """Any exception at a module's import, whatever its type: one line naming the module, the
    file and line where it failed and the exception (not importlib's 57-line traceback)."""
    mods = {
        "raiser_rt": ("import json\nX = 1\nraise RuntimeError('boom at import')\n", 3,
                      "RuntimeError: boom at import"),
        "raiser_json": ("import json\nCFG = json.loads('{bad')\n", 2, "JSONDecodeError"),
        "raiser_exit": ("import sys\nsys.exit(3)\n", 2, "SystemExit: 3"),
        "raiser_deep": ("import raiser_helper\n", 2, "ZeroDivisionError"),
    }
    (tmp_path / "raiser_helper.py").write_text("def f():\n    return 1 / 0\nf()\n")
    for name, (text, _, _) in mods.items():
        (tmp_path / f"{name}.py").write_text(text)
    env = {"PYTHONPATH": f"{ROOT}{os.pathsep}{tmp_path}"}
    for name, (_, line, says) in mods.items():
        out = one_line_error(cli(redis_url, prefix, "worker", "--agents", name, env=env))
        where = "raiser_helper.py" if name == "raiser_deep" else f"{name}.py"
        assert f"'{name}'" in out and f"{where}:{line}" in out and says in out, out


def test_numbers_and_ports_out_of_range_or_taken_are_one_line(redis_url: str, prefix: str,
                                                               tmp_path: Path) -> None:
    """Every option that takes a port or a number checks it (click's range: a usage error,
    exit 2), and a port that cannot be listened on is one line (exit 1), not a traceback."""
    cache = tmp_path / "cache"
    cases: list[tuple[str, ...]] = [
        ("redis", "--port", "99999"), ("redis", "--port", "0"),
        ("fake-llm", "--port", "99999"), ("fake-llm", "--port", "0", "--latency", "-1"),
        ("deadletter", "--count", "0"),
        ("worker", "--agents", "tests.agents", "--threads", "0"),
        ("population", "build", "x.json", "--writers", "0"),
    ]
    for args in cases:
        p = cli(redis_url, prefix, *args, env={"XDG_CACHE_HOME": str(cache)})
        line = one_line_error(p)
        assert p.returncode == 2 and args[-2] in line, (args, line)
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = str(held.getsockname()[1])
        p = cli(redis_url, prefix, "fake-llm", "--port", port)
        assert p.returncode == 1 and "in use" in one_line_error(p) and port in p.stderr
        p = redis_cli(cache, "--port", port)
        assert p.returncode == 1 and "another program holds port " + port in one_line_error(p)
    line = one_line_error(cli(redis_url, prefix, "fake-llm", "--host", "no.such.host.invalid",
                              "--port", "0"))
    assert "no.such.host.invalid" in line, line


def test_stop_on_a_worker_killed_a_moment_ago_says_it_may_have_died(
    workers: Workers, redis_url: str, prefix: str
) -> None:
    """A worker killed by kill -9 whose record still looks alive (dead_after not reached): a
    control op does not wait out its 30 s timeout to blame a busy agent; it watches the
    record's age and says the server did not answer, when it last beat, and what happens next."""
    slow = {"BUSAGENT_HEARTBEAT": "0.5", "BUSAGENT_DEAD_AFTER": "120"}
    p = workers.start("w1", env=slow)
    p.send_signal(signal.SIGKILL)
    p.wait()
    for args in (("stop", "w1"), ("stop", "w1", "--drain")):
        out = cli(redis_url, prefix, *args, env=slow)
        line = one_line_error(out)
        assert "did not answer" in line and "last heartbeat was" in line, line
        assert "may have died" in line and "busagent stop w1" in line and "busy" not in line


def test_stop_on_a_dead_worker_leaves_no_key_of_it(workers: Workers, redis_url: str,
                                                    prefix: str, raw: redis.Redis) -> None:
    p = workers.start("w1")
    raw.xadd(f"{prefix}:logs:w1", {"line": "something it said"})
    raw.rpush(f"{prefix}:ready:w1", "1")
    p.send_signal(signal.SIGKILL)
    p.wait()
    wait_for(lambda: json.loads(cli(redis_url, prefix, "servers", "--json").stdout)[0]["state"]
             == "dead", timeout=20, what="the worker shown dead")
    out = cli(redis_url, prefix, "stop", "w1")
    assert out.returncode == 0 and "was dead" in out.stdout, out.stderr
    assert [k for k in raw.scan_iter(f"{prefix}:*") if "w1" in k] == []


def test_the_embedded_redis_refuses_a_port_another_redis_holds(tmp_path: Path) -> None:
    """A passwordless Redis that `busagent redis` did not start holds the port: asked for a
    password or another bind there, it never hands back a URL for that server (it would even
    work: that Redis accepts any password)."""
    foreign = busagent.embedded.start(port=busagent.embedded.free_port(), unix=False)
    port = str(foreign.url.rsplit(":", 1)[1].split("/")[0])
    cache = tmp_path / "cache"
    try:
        for args in (["--password", "s3cret"], ["--bind", "0.0.0.0"], []):
            out = redis_cli(cache, "--port", port, *args)
            line = one_line_error(out)
            assert out.stdout == "" and "another Redis (not started by busagent)" in line, line
            assert f"port {port}" in line and "s3cret" not in line
        with redis.Redis.from_url(foreign.url) as r:
            assert r.ping()  # left alone
    finally:
        foreign.stop()
        _kill_servers_in(tmp_path)


def test_the_redis_refusal_says_whether_the_running_one_has_a_password(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    port = str(busagent.embedded.free_port())
    try:
        assert redis_cli(cache, "--port", port).returncode == 0
        line = one_line_error(redis_cli(cache, "--password", "s3cret"))
        assert "--password none" in line and "***" not in line and "s3cret" not in line, line
    finally:
        redis_cli(cache, "--stop")
        _kill_servers_in(tmp_path)


def _private_program(tmp_path: Path, body: str) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "prog.py"
    script.write_text("import os, signal, sys, time\nimport busagent\n" + body)
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), "TMPDIR": str(tmp_path),
           "PYTHONPATH": str(ROOT)}
    env.pop("BUSAGENT_REDIS_URL", None)
    return subprocess.run([sys.executable, str(script)], env=env, capture_output=True,
                          text=True, timeout=60, cwd=tmp_path)


def test_a_private_redis_folder_is_removed_on_sigterm_and_sighup(tmp_path: Path) -> None:
    for sig in (signal.SIGTERM, signal.SIGHUP):
        p = _private_program(tmp_path, f"busagent.init()\nos.kill(os.getpid(), {int(sig)})\n"
                                       "time.sleep(30)\n")
        # The exit status a shell shows for the default (143, 129), and nothing left in /tmp.
        assert p.returncode == 128 + sig, (p.returncode, p.stderr)
        assert "Traceback" not in p.stderr, p.stderr
        assert not list(tmp_path.glob("busagent-redis-*")), sig


def test_a_programs_own_signal_handler_is_left_alone(tmp_path: Path) -> None:
    p = _private_program(tmp_path, (
        "got = []\n"
        "signal.signal(signal.SIGTERM, lambda s, f: got.append(s))\n"
        "busagent.init()\n"
        "os.kill(os.getpid(), signal.SIGTERM)\n"
        "print('handled' if got else 'not handled', flush=True)\n"))
    assert p.returncode == 0 and p.stdout.strip() == "handled", (p.stdout, p.stderr)
    assert not list(tmp_path.glob("busagent-redis-*"))


def test_prefixes_are_checked_and_an_empty_one_is_refused(redis_url: str) -> None:
    for env in ({"BUSAGENT_PREFIX": ""}, {"BUSAGENT_PREFIX": "bad*"},
                {"BUSAGENT_PREFIX": "a:b"}, {"BUSAGENT_PREFIX": "a?"}):
        line = one_line_error(cli(redis_url, env["BUSAGENT_PREFIX"], "servers", env=env))
        assert "prefix" in line and repr(env["BUSAGENT_PREFIX"]) in line, line
    ok = cli(redis_url, "app-1.v2_x", "servers", "--json")
    assert ok.returncode == 0 and json.loads(ok.stdout) == [], ok.stderr


def test_model_configs_are_refused_in_one_line_when_stored(redis_url: str, prefix: str,
                                                           tmp_path: Path) -> None:
    bad = {"no-name.json": ([{"model_type": "openai_chat"}], "config_name"),
           "vllm.json": ([{"config_name": "v", "model_type": "vllm"}], "base_url")}
    for file, (configs, says) in bad.items():
        (tmp_path / file).write_text(json.dumps(configs))
        line = one_line_error(cli(redis_url, prefix, "models", "--load", str(tmp_path / file)))
        assert says in line and "errors.pydantic" not in line, line
    listed = cli(redis_url, prefix, "models", "--json")
    assert json.loads(listed.stdout) == [], listed.stdout


def test_to_dist_takes_a_distconf_first(workers: Workers) -> None:
    workers.start("w1")
    a = Adder("a")
    proxy = a.to_dist(DistConf(server="w1"))
    assert proxy.server == "w1" and proxy.agent_id == a.agent_id
    assert proxy(Msg("user", 2)).result(30) is not None


def test_the_worker_logs_a_malformed_entry_as_text(workers: Workers, prefix: str,
                                                   raw: redis.Redis) -> None:
    workers.start("w1")
    entry = raw.xadd(f"{prefix}:inbox:w1", {"v": "not-a-number", "kind": "call"})

    def logged() -> list[str]:
        return [f["msg"] for _, f in raw.xrange(f"{prefix}:logs:w1")
                if "malformed entry" in f.get("msg", "")]

    [line] = wait_for(logged, what="the worker's log line")
    assert f"malformed entry {entry}:" in line and "b'" not in line, line
