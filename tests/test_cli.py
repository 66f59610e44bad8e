"""The busagent command against a real Redis and a real worker."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

from busagent import DistConf, Msg
from tests.agents import Adder

from .conftest import ROOT, Workers


def cli(url: str, prefix: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "BUSAGENT_REDIS_URL": url, "BUSAGENT_PREFIX": prefix,
           "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "busagent.cli", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


def js(p: subprocess.CompletedProcess[str]) -> Any:
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def test_cli_inspects_and_manages(workers: Workers, redis_url: str, prefix: str) -> None:
    proc = workers.start("w1")
    a = Adder("alice", to_dist=DistConf(server="w1"))
    b = Adder("bob", to_dist=DistConf(server="w1"))
    a(Msg("user", 1)).result()
    b.ready()

    servers = js(cli(redis_url, prefix, "servers", "--json"))
    assert [(s["name"], s["state"], s["alive"], s["pid"]) for s in servers] == [
        ("w1", "up", True, proc.pid)]
    table = cli(redis_url, prefix, "servers")
    assert table.returncode == 0 and "w1" in table.stdout and "tests.agents" in table.stdout
    assert "state" in table.stdout and " up " in table.stdout

    agents = js(cli(redis_url, prefix, "agents", "--json", "--server", "w1"))
    assert {x["name"] for x in agents} == {"alice", "bob"}
    assert "alice" in cli(redis_url, prefix, "agents").stdout

    mem = js(cli(redis_url, prefix, "memory", a.agent_id, "--json"))
    assert [m["content"] for m in mem] == [1]

    info = js(cli(redis_url, prefix, "info", "w1", "--json"))
    assert info["pid"] == proc.pid and info["alive"] is True

    assert cli(redis_url, prefix, "delete", a.agent_id).returncode == 0
    assert {x["name"] for x in js(cli(redis_url, prefix, "agents", "--json"))} == {"bob"}
    out = cli(redis_url, prefix, "delete", "--all", "--server", "w1")
    assert out.returncode == 0 and "deleted 1" in out.stdout
    assert js(cli(redis_url, prefix, "agents", "--json")) == []

    assert cli(redis_url, prefix, "stop", "w1").returncode == 0
    assert proc.wait(20) == 0
    assert js(cli(redis_url, prefix, "servers", "--json")) == []


def test_cli_errors_are_one_line_with_nonzero_exit(redis_url: str, prefix: str) -> None:
    for args in (["info", "nope"], ["memory", "nope"], ["delete", "--all"], ["stop", "nope"]):
        p = cli(redis_url, prefix, *args)
        assert p.returncode == 1, args
        assert p.stderr.startswith("error: ") and p.stderr.count("\n") == 1, p.stderr
        assert "Traceback" not in p.stderr
    p = cli("redis://127.0.0.1:1/0", prefix, "servers")
    assert p.returncode == 1
    assert p.stderr.startswith("error: cannot reach Redis at redis://127.0.0.1:1/0")


def test_worker_refuses_unknown_module(redis_url: str, prefix: str) -> None:
    p = cli(redis_url, prefix, "worker", "--agents", "no.such.module", "--name", "x")
    assert p.returncode == 1
    assert "cannot import agent module 'no.such.module'" in p.stderr


def test_bad_input_is_one_line_and_exit_1(redis_url: str, prefix: str, tmp_path: Any) -> None:
    """Settings out of range, agent modules that do not import or compile, a script that fails:
    one line on stderr (no traceback, no pydantic dump, not wrapped) and exit code 1, or 2 for
    an option out of its range (a usage error, checked by the option as typer does)."""
    (tmp_path / "missing_import.py").write_text("import nosuchpkg_zz\n")
    (tmp_path / "syntax.py").write_text("def f(:\n")
    cases = [
        (2, ("worker", "--agents", "tests.agents", "--capacity", "-5")),
        (2, ("worker", "--agents", "tests.agents", "--threads", "0")),
        (1, ("worker", "--agents", "nosuchmod_zz")),
        (1, ("worker", "--agents", str(tmp_path / "missing_import.py"))),
        (1, ("worker", "--agents", str(tmp_path / "syntax.py"))),
    ]
    for code, args in cases:
        env = {**os.environ, "BUSAGENT_REDIS_URL": redis_url, "BUSAGENT_PREFIX": prefix,
               "PYTHONPATH": str(ROOT), "COLUMNS": "60"}
        p = subprocess.run([sys.executable, "-m", "busagent.cli", *args], env=env, cwd=ROOT,
                           capture_output=True, text=True, timeout=60)
        assert p.returncode == code, (args, p.stderr)
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), (args, p.stderr)
