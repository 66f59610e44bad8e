"""``busagent status``, ``top`` (under a pseudo-terminal), ``logs``, and the worker counters
and log stream they read, with real workers and a real Redis."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
import time
from typing import Any

import pytest

import busagent
from busagent import Msg
from busagent.records import LATENCY_BOUNDS

from .conftest import FAST, ROOT, Workers, wait_for
from .studio_agents import Boom, Talker

MODULES = ("tests.agents", "tests.studio_agents")


def cli(redis_url: str, prefix: str, *args: str, timeout: float = 60
        ) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **FAST, "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "busagent.cli", *args, "--redis", redis_url,
                           "--prefix", prefix], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=timeout)


def _status(redis_url: str, prefix: str) -> dict[str, Any]:
    r = cli(redis_url, prefix, "status", "--json")
    assert r.returncode == 0, r.stderr
    return dict(json.loads(r.stdout))


def test_workers_count_calls_errors_and_latency(workers: Workers, redis_url: str,
                                               prefix: str) -> None:
    workers.start("s1", *MODULES)
    workers.start("s2", *MODULES)
    talkers = busagent.create_many(Talker, [f"t{i}" for i in range(20)])
    for t in talkers:
        t.ready(timeout=30)
    busagent.gather([t(Msg("user", i)) for i, t in enumerate(talkers)], timeout=30)
    boom = Boom("boom", to_dist=True)
    for _ in range(3):
        with pytest.raises(busagent.RemoteError):
            boom(None).result(timeout=30)

    def counted() -> dict[str, Any] | None:
        s = _status(redis_url, prefix)
        return s if s["calls"] == 23 else None
    s = wait_for(counted, 15, "23 calls counted")
    # Creations are not calls; every call lands in one latency bucket; errors are the 3.
    assert s["errors"] == 3
    assert s["servers"] == {"up": 2, "late": 0, "stopping": 0, "dead": 0}
    assert s["agents"] == 21 and s["inflight"] == 0 and s["deadletters"] == 0
    assert s["redis"]["version"] and s["redis"]["used_memory"] > 0
    for row in s["rows"]:
        assert len(row["latency"]) == len(LATENCY_BOUNDS) + 1
        assert sum(row["latency"]) == row["calls"]
        assert row["latency_sum"] > 0 or row["calls"] == 0

    text = cli(redis_url, prefix, "status")
    assert text.returncode == 0, text.stderr
    assert "Servers: 2 up, 0 late, 0 stopping, 0 dead" in text.stdout
    assert "23 answered (3 errors)" in text.stdout
    assert "s1" in text.stdout and "s2" in text.stdout


def test_status_without_redis_is_one_line(tmp_path: Any) -> None:
    r = cli(f"unix://{tmp_path}/none.sock", "x", "status")
    assert r.returncode == 1
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1


def test_logs_prints_and_follows_a_workers_lines(workers: Workers, redis_url: str,
                                                 prefix: str) -> None:
    workers.start("s1", *MODULES)
    t = Talker("talky", to_dist=True)
    t(Msg("user", "first")).result(timeout=30)
    got = wait_for(lambda: "talker talky heard first" in (
        out := cli(redis_url, prefix, "logs", "s1").stdout) and out, 15, "the log line")
    assert "WARNING" in got and "tests.studio_agents" in got

    env = {**os.environ, **FAST, "PYTHONPATH": str(ROOT)}
    follow = subprocess.Popen([sys.executable, "-m", "busagent.cli", "logs", "s1", "--follow",
                               "--redis", redis_url, "--prefix", prefix], stdout=subprocess.PIPE,
                              text=True, env=env, cwd=ROOT)
    try:
        assert follow.stdout is not None
        wait_for(lambda: "heard first" in follow.stdout.readline(), 20, "the old line")
        t(Msg("user", "second")).result(timeout=30)
        wait_for(lambda: "heard second" in follow.stdout.readline(), 20, "the new line")
    finally:
        follow.terminate()
        follow.wait(10)

    bad = cli(redis_url, prefix, "logs", "nobody")
    assert bad.returncode == 1 and bad.stderr.startswith("error: no server named 'nobody'")
    assert cli(redis_url, prefix, "logs", "s1", "--lines", "0").returncode == 1


def test_log_stream_is_capped(workers: Workers, prefix: str) -> None:
    from busagent.tuning import LOG_LINES

    workers.start("s1", *MODULES)
    t = Talker("loud", to_dist=True)
    n = LOG_LINES + 2000
    busagent.gather(busagent.fanout([t] * n, Msg("user", "x")), timeout=120)
    b = busagent.bus.current()
    key = b.keys.logs("s1")
    wait_for(lambda: any(b"heard x" in f[b"msg"] for _, f in b.redis.xrevrange(key, count=1))
             and b.redis.xlen(key) >= LOG_LINES // 2, 30, "the lines to arrive")
    # Approximate trimming: within one radix-tree node of the cap, never the whole history.
    assert b.redis.xlen(key) < LOG_LINES + 200


def _read_until(fd: int, needle: bytes, count: int, timeout: float) -> bytes:
    buf = b""
    deadline = time.monotonic() + timeout
    while buf.count(needle) < count:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"saw {buf.count(needle)} of {count} frames: {buf[-500:]!r}")
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            try:
                buf += os.read(fd, 65536)
            except OSError:
                break
    return buf


@pytest.mark.parametrize("key", [b"q", b"\x03"], ids=["q", "ctrl-c"])
def test_top_draws_frames_and_quits(workers: Workers, redis_url: str, prefix: str,
                                    key: bytes) -> None:
    workers.start("s1", *MODULES)
    workers.start("s2", *MODULES)
    env = {**os.environ, **FAST, "PYTHONPATH": str(ROOT), "COLUMNS": "160", "LINES": "40",
           "TERM": "xterm"}
    main, sub = pty.openpty()
    p = subprocess.Popen([sys.executable, "-m", "busagent.cli", "top", "--interval", "0.2",
                          "--redis", redis_url, "--prefix", prefix],
                         stdin=sub, stdout=sub, stderr=sub, env=env, cwd=ROOT,
                         start_new_session=True)
    os.close(sub)
    try:
        buf = _read_until(main, b"busagent top", 3, 30)
        assert b"s1" in buf and b"s2" in buf and b"Servers:" in buf
        if key == b"\x03":
            # The terminal turns Ctrl-C into SIGINT for the foreground group: do the same.
            os.killpg(p.pid, 2)
        else:
            os.write(main, key)
        assert p.wait(15) == 0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        os.close(main)
