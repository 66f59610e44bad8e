"""Redis that is up but refuses or loses things, and hosts whose clocks disagree (issue 16).

Each test runs real worker processes against its own redis-server, configured for the fault
(CONFIG SET), so nothing here disturbs the session's Redis.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

import busagent
from busagent import (
    BusError,
    DistConf,
    MessageTooLarge,
    Msg,
    Placeholder,
    RedisUnavailable,
    UnknownAgent,
    embedded,
)
from busagent.admin import agent_info, servers
from busagent.protocol import CallBody
from tests.agents import Adder, Recorder
from tests.faults.redis_agents import Blob, Measure

from ..conftest import FAST, ROOT, Workers, wait_for
from .test_acl import readme_acl

FAKETIME = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")


@pytest.fixture
def own(prefix: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[embedded.Server, Workers]]:
    """A redis-server of this test's own, a caller's bus on it, and workers to start on it."""
    for k, v in FAST.items():
        monkeypatch.setenv(k, v)
    server = embedded.start()
    busagent.init(server.url, prefix=prefix)
    w = Workers(server.url, prefix)
    try:
        yield server, w
    finally:
        w.stop_all()
        busagent.shutdown()
        server.stop()


def admin(server: embedded.Server) -> redis.Redis:
    return redis.Redis.from_url(server.url)


# --- 1. clocks ----------------------------------------------------------------------------------


#: libfaketime 0.9.10 makes Python's time.sleep fail with EINVAL (its clock_nanosleep wrapper);
#: the skewed worker gets this sitecustomize, which sleeps with a timed wait instead. Only the
#: test's harness: the worker's own code runs unchanged.
SLEEP_SHIM = """
import threading, time
def _sleep(seconds):
    if seconds > 0:
        threading.Event().wait(seconds)
time.sleep = _sleep
"""


def skewed(offset: str, shim: Path) -> dict[str, str]:
    """The environment of a process whose wall clock is ``offset`` off (libfaketime); its
    monotonic clock stays true, as on a host whose NTP is broken."""
    shim.mkdir(exist_ok=True)
    (shim / "sitecustomize.py").write_text(SLEEP_SHIM)
    return {"LD_PRELOAD": str(FAKETIME), "FAKETIME": offset, "FAKETIME_DONT_FAKE_MONOTONIC": "1",
            "PYTHONPATH": f"{shim}{os.pathsep}{ROOT}"}


@pytest.mark.skipif(not FAKETIME.exists(), reason="needs libfaketime (apt-get install faketime)")
@pytest.mark.parametrize("offset", ["+6m", "-6m"])
def test_a_worker_whose_clock_is_minutes_off_is_judged_by_redis_time(
        own: tuple[embedded.Server, Workers], offset: str, prefix: str, tmp_path: Path) -> None:
    server, w = own
    w.start("true")
    skew = _worker(server.url, prefix, "skewed", tmp_path / "skewed.log",
                   skewed(offset, tmp_path / "shim"))
    w.procs["skewed"] = skew
    a = Adder("a", to_dist=DistConf(server="true"))
    s = Adder("s", to_dist=DistConf(server="skewed"))
    # The skewed worker honours the caller's deadline (relative, not an absolute time from
    # another host's clock): its agent's call runs.
    assert s(Msg("user", 1)).result(timeout=10).content == 2
    # Three times dead_after: nobody declares anybody dead, both keep serving.
    dead_after = float(FAST["BUSAGENT_DEAD_AFTER"])
    until = time.monotonic() + 3 * dead_after
    n = 0
    while time.monotonic() < until:
        n += 1
        assert [p.result(timeout=10).content for p in (a(Msg("user", n)), s(Msg("user", n)))] \
            == [n + 1, n + 1]
        states = {x["name"]: x["state"] for x in servers()}
        assert states == {"true": "up", "skewed": "up"}, states
    assert agent_info(a.agent_id).server == "true" and agent_info(s.agent_id).server == "skewed"
    assert all(p.poll() is None for p in w.procs.values())
    # Killed, it is found dead within dead_after by Redis's clock (not skew + dead_after), and
    # its agent moves with its memory.
    skew.kill()
    skew.wait()
    wait_for(lambda: agent_info(s.agent_id).server == "true", timeout=30,
             what="the skewed worker's agent recovered")
    assert [m.content for m in s.memory.get()] == [1, *range(1, n + 1)]
    assert s(Msg("user", 100)).result(timeout=10).content == 101


# --- 2. Redis refuses writes --------------------------------------------------------------------


def test_out_of_memory_is_a_clear_error_reads_go_on_and_nobody_is_declared_dead(
        own: tuple[embedded.Server, Workers]) -> None:
    server, w = own
    r = admin(server)
    w.start("w1")
    w.start("w2")
    a = Adder("a", to_dist=DistConf(server="w1"))
    b = Adder("b", to_dist=DistConf(server="w2"))
    written = a(Msg("user", 1))
    assert written.result(timeout=10).content == 2
    r.config_set("maxmemory", 1)  # noeviction (busagent's setting): every write is refused
    try:
        with pytest.raises(BusError, match=r"out of memory.*raise maxmemory"):
            a(Msg("user", 2)).result(timeout=10)
        # A reply that is already there is read (LINDEX), though the blocking read is refused.
        assert Placeholder.from_id(written.call_id).result(timeout=5).content == 2
        # One that is not there ends at its deadline, saying Redis refused writes meanwhile.
        with pytest.raises(busagent.CallTimeout, match="refused writes"):
            Placeholder.from_id("never-sent").result(timeout=1)
        # The workers' heartbeats are refused until their records look dead by age.
        dead_after = float(FAST["BUSAGENT_DEAD_AFTER"])
        wait_for(lambda: all(s["age"] > 2 * dead_after for s in servers()), timeout=30,
                 what="heartbeats refused for twice dead_after")
    finally:
        r.config_set("maxmemory", 0)
    # Memory is back: nobody is declared dead for heartbeats Redis refused, both keep serving.
    until = time.monotonic() + 3 * dead_after
    n = 0
    while time.monotonic() < until:
        n += 1
        assert [p.result(timeout=10).content for p in (a(Msg("user", n)), b(Msg("user", n)))] \
            == [n + 1, n + 1]
        assert all(s["status"] != "dead" for s in servers()), servers()
    assert all(p.poll() is None for p in w.procs.values())
    assert agent_info(a.agent_id).server == "w1" and agent_info(b.agent_id).server == "w2"
    assert {s["name"]: s["state"] for s in servers()} == {"w1": "up", "w2": "up"}


def _worker(url: str, prefix: str, name: str, log: Path,
            extra: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """A worker whose log goes to ``log`` (``extra``: more environment); returns once it
    serves."""
    env = {**os.environ, **FAST, "PYTHONPATH": str(ROOT), **(extra or {})}
    with log.open("wb") as out:
        p = subprocess.Popen([sys.executable, "-m", "busagent.cli", "worker", "--name", name,
                              "--redis", url, "--prefix", prefix, "--agents", "tests.agents",
                              "--log-level", "WARNING"], cwd=ROOT, env=env, stderr=out)
    r = redis.Redis.from_url(url)
    try:
        while r.blpop([f"{prefix}:ready:{name}"], timeout=1) is None:
            assert p.poll() is None, log.read_text()
    finally:
        r.close()
    return p


def test_an_acl_change_is_named_logged_once_and_survived(
        own: tuple[embedded.Server, Workers], prefix: str, tmp_path: Path) -> None:
    server, w = own
    r = admin(server)
    acl = [f"~{prefix}:*" if x == "~busagent:*" else x for x in readme_acl()]
    r.execute_command("ACL", "SETUSER", "busagent", *acl)
    url = server.url.replace("unix://", "unix://busagent:pw@")
    busagent.init(url, prefix=prefix)
    log = tmp_path / "w1.log"
    p = _worker(url, prefix, "w1", log)
    w.procs["w1"] = p
    a = Adder("a", to_dist=DistConf(server="w1"))
    assert a(Msg("user", 1)).result(timeout=10).content == 2
    # The operator takes stream reads and scripts away from the user.
    r.execute_command("ACL", "SETUSER", "busagent", "-xreadgroup", "-evalsha")
    try:
        with pytest.raises(RedisUnavailable, match=r"refused a command to this user \(ACL\)"):
            a(Msg("user", 2)).result(timeout=10)
        wait_for(lambda: "was refused" in log.read_text(), timeout=20,
                 what="the worker saying its reads are refused")
        # Long enough for a 0.1 s loop to log dozens of lines.
        wait_for(lambda: any(e["object"] == "xreadgroup" and e["count"] >= 4
                             for e in r.acl_log()), timeout=30, what="repeated refused reads")
    finally:
        r.execute_command("ACL", "SETUSER", "busagent", "+xreadgroup", "+evalsha")
    assert a(Msg("user", 3)).result(timeout=30).content == 4
    text = log.read_text()
    assert "recreating the consumer group" not in text, text
    assert text.count("was refused") == 1, text
    assert p.poll() is None


def test_a_rotated_password_fails_within_the_deadline_naming_the_credentials(
        prefix: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in FAST.items():
        monkeypatch.setenv(k, v)
    server = embedded.start(unix=False, password="old")
    w = Workers(server.url, prefix)
    try:
        busagent.init(server.url, prefix=prefix)
        w.start("w1")
        a = Adder("a", to_dist=DistConf(server="w1"))
        assert a(Msg("user", 1)).result(timeout=10).content == 2
        r = admin(server)
        r.config_set("requirepass", "new")
        r.client_kill_filter(_type="normal", skipme=True)  # everyone must log in again
        start = time.monotonic()
        with pytest.raises(RedisUnavailable, match="credentials"):
            a(Msg("user", 2)).result(timeout=3)
        # The flush that sends the call counts against the caller's 3 s, not 20 s of its own.
        assert time.monotonic() - start < 3 + 2
        r.close()
    finally:
        w.stop_all()
        busagent.shutdown()
        server.stop()


# --- 4. order after a dropped connection --------------------------------------------------------


def test_a_dropped_reader_connection_keeps_each_agents_arrival_order(
        own: tuple[embedded.Server, Workers]) -> None:
    server, w = own
    r = admin(server)
    w.start("w1")
    rec = Recorder("r", to_dist=DistConf(server="w1"))
    assert rec(Msg("m", "start")).result(timeout=10).content == 1
    b = busagent.bus.current()
    expected = ["start"]
    for round_ in range(3):
        # Wait until the worker's reader (the only XREADGROUP) is blocked.
        reader = wait_for(lambda: [c for c in r.client_list()
                                   if c["cmd"] == "xreadgroup" and "b" in c["flags"]],
                          what="the worker's blocked reader")[0]
        a_id = f"A{round_}-{uuid.uuid4().hex}"
        body = CallBody(args=[Msg("m", f"A{round_}")]).pack()
        fields = b.sender.entry("call", body, call=a_id, agent=rec.agent_id).fields()
        # One query buffer: Redis hands A to the blocked read (it is now pending), then drops
        # the connection before the reply reaches the worker.
        pipe = r.pipeline(transaction=False)
        pipe.xadd(b.keys.inbox("w1"), fields)  # type: ignore[arg-type]
        pipe.client_kill_filter(_id=reader["id"])
        pipe.execute()
        later = rec(Msg("m", f"B{round_}"))
        Placeholder.from_id(a_id).result(timeout=20)
        later.result(timeout=20)
        expected += [f"A{round_}", f"B{round_}"]
        assert [m.content for m in rec.memory.get()] == expected


# --- 3. Redis that evicts -----------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["allkeys-lru", "volatile-ttl"])
def test_an_evicting_redis_is_refused_by_workers_and_warned_about_by_callers(
        prefix: str, policy: str) -> None:
    server = embedded.start()
    try:
        admin(server).config_set("maxmemory-policy", policy)
        with pytest.warns(RuntimeWarning, match=rf"maxmemory-policy {policy}.*noeviction"):
            busagent.init(server.url, prefix=prefix)
        env = {**os.environ, **FAST, "PYTHONPATH": str(ROOT)}
        p = subprocess.run([sys.executable, "-m", "busagent.cli", "worker", "--name", "w1",
                            "--redis", server.url, "--prefix", prefix, "--agents",
                            "tests.agents"], cwd=ROOT, env=env, capture_output=True, timeout=60)
        err = p.stderr.decode().strip()
        assert p.returncode == 1, err
        assert err.startswith("error: ") and len(err.splitlines()) == 1, err
        assert f"maxmemory-policy {policy}" in err and "noeviction" in err
        assert admin(server).hlen(f"{prefix}:servers") == 0  # it never registered
    finally:
        busagent.shutdown()
        server.stop()


# --- 5. big replies and output buffers ----------------------------------------------------------


def test_replies_are_read_in_batches_bounded_by_bytes_and_one_too_big_fails_once(
        own: tuple[embedded.Server, Workers]) -> None:
    server, w = own
    r = admin(server)
    w.start("w1", "tests.faults.redis_agents",
            env={"BUSAGENT_MAX_MESSAGE_BYTES": str(64 * 2**20)})
    blob = Blob("blob", to_dist=DistConf(server="w1"))
    mb = 2**20
    # As on managed Redis, scaled down: a normal client is dropped past 8 MB of pending output.
    r.config_set("client-output-buffer-limit", "normal 8mb 4mb 5")
    # Six 3 MB replies: each fits, all six in one answer would not.
    ps = [blob(3 * mb) for _ in range(6)]
    assert [len(v) for v in busagent.gather(ps, timeout=60)] == [3 * mb] * 6
    # A 12 MB reply can never get through this connection: one clear error, well before the
    # deadline, and not "Redis is down".
    big = blob(12 * mb)
    with pytest.raises(MessageTooLarge, match="client-output-buffer-limit"):
        big.result(timeout=120)
    # Redis and the worker were fine all along.
    assert len(blob(10).result(timeout=10)) == 10
    assert all(p.poll() is None for p in w.procs.values())


def test_a_forwarded_input_over_the_output_buffer_limit_fails_the_call_once(
        own: tuple[embedded.Server, Workers]) -> None:
    """The worker resolving a placeholder passed to it (its asyncio wait, or the peek before it)
    treats a connection Redis closed while up like the blocking wait does: the call fails with
    an error naming the input and client-output-buffer-limit, not a CallTimeout after
    re-reading the reply until the deadline."""
    server, w = own
    r = admin(server)
    w.start("w1", "tests.faults.redis_agents",
            env={"BUSAGENT_MAX_MESSAGE_BYTES": str(64 * 2**20)})
    blob = Blob("blob", to_dist=DistConf(server="w1"))
    measure = Measure("measure", to_dist=DistConf(server="w1"))
    mb = 2**20
    r.config_set("client-output-buffer-limit", "normal 8mb 4mb 5")
    # Not there yet when the worker reads the call: resolved by its asyncio wait.
    late = blob(12 * mb, 1.0)
    with pytest.raises(MessageTooLarge, match=r"input placeholder .*client-output-buffer-limit"):
        measure(late).result(timeout=60)
    # Already there: the worker's peek is closed on, and the wait says why.
    there = blob(12 * mb)
    key = busagent.bus.current().keys.reply(there.call_id)
    wait_for(lambda: r.exists(key), timeout=30,
             what="the 12 MB reply written")
    with pytest.raises(MessageTooLarge, match=r"input placeholder .*client-output-buffer-limit"):
        measure(there).result(timeout=60)
    assert measure(blob(10)).result(timeout=10) == 10
    assert all(p.poll() is None for p in w.procs.values())


def _refusals(r: redis.Redis, command: str) -> int:
    return sum(int(e["count"]) for e in r.acl_log(count=128) if e["object"] == command)


def test_refused_reply_writes_are_logged_once_backed_off_and_given_up_at_exit(
        own: tuple[embedded.Server, Workers], prefix: str, tmp_path: Path) -> None:
    """The worker's reply writer follows the policy of the inbox reader and the heartbeat: a
    refusal that lasts is logged once (and once when it clears), with back-off; at a graceful
    stop it gives up after a bounded retry, and says so."""
    server, w = own
    r = admin(server)
    acl = [f"~{prefix}:*" if x == "~busagent:*" else x for x in readme_acl()]
    r.execute_command("ACL", "SETUSER", "busagent", *acl)
    # The worker runs as the restricted user; the caller (the default user) can still send.
    url = server.url.replace("unix://", "unix://busagent:pw@")
    log = tmp_path / "w1.log"
    p = _worker(url, prefix, "w1", log, {"BUSAGENT_GRACE": "1"})
    w.procs["w1"] = p
    a = Adder("a", to_dist=DistConf(server="w1"))
    assert a(Msg("user", 1)).result(timeout=10).content == 2
    # Scripts taken away: the call runs, its reply (commit.lua) is refused, retried.
    r.execute_command("ACL", "SETUSER", "busagent", "-@scripting")
    try:
        before = _refusals(r, "evalsha")
        p2 = a(Msg("user", 2))
        # Seconds of refused scripts (the heartbeat's among them): a retry loop with a log
        # line per attempt would have logged many by then.
        wait_for(lambda: _refusals(r, "evalsha") - before >= 30, timeout=60,
                 what="refused scripts")
    finally:
        r.execute_command("ACL", "SETUSER", "busagent", "+@scripting")
    assert p2.result(timeout=30).content == 3
    wait_for(lambda: "writing replies works again" in log.read_text(), timeout=20,
             what="the worker saying its replies are written again")
    text = log.read_text()
    assert text.count("writing replies failed") == 1, text
    assert "NOPERM" in text or "ACL" in text, text
    # Refused again, then a graceful stop: the reply is given up on after a bounded retry,
    # logged, and the worker exits.
    r.execute_command("ACL", "SETUSER", "busagent", "-@scripting")
    try:
        p3 = a(Msg("user", 3))
        wait_for(lambda: log.read_text().count("writing replies failed") == 2, timeout=30,
                 what="the second refusal logged")
        p.terminate()
        p.wait(timeout=60)
    finally:
        r.execute_command("ACL", "SETUSER", "busagent", "+@scripting")
    text = log.read_text()
    assert "giving up on 1 replies at exit" in text, text
    # Given up on, not lost: the call was never acknowledged, so the stop answered it as not
    # run (a stop without --drain), with a clear error rather than silence.
    with pytest.raises(UnknownAgent, match="stopped before running the call"):
        p3.result(timeout=30)


@pytest.mark.skipif(not FAKETIME.exists(), reason="needs libfaketime (apt-get install faketime)")
@pytest.mark.parametrize("offset", ["+6m", "-6m"])
def test_a_workers_uptime_is_by_the_redis_clock_whatever_its_hosts_clock(
        own: tuple[embedded.Server, Workers], offset: str, prefix: str, tmp_path: Path) -> None:
    """`busagent info` and the studio read a worker's uptime from its record by the Redis clock,
    so a worker whose clock is minutes off shows neither a negative age nor minutes extra."""
    import re

    from busagent.studio import data

    server, w = own
    began = time.monotonic()
    w.procs["skewed"] = _worker(server.url, prefix, "skewed", tmp_path / "skewed.log",
                                skewed(offset, tmp_path / "shim"))
    out = subprocess.run([sys.executable, "-m", "busagent.cli", "info", "skewed", "--redis",
                          server.url, "--prefix", prefix], cwd=ROOT, capture_output=True,
                         text=True, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    elapsed = time.monotonic() - began
    m = re.search(r"started\s.*\((-?[\d.]+) s ago\)", out.stdout)
    assert m, out.stdout
    assert 0 <= float(m.group(1)) <= elapsed + 1, out.stdout
    row = next(s for s in data.servers() if s["name"] == "skewed")
    assert 0 <= row["uptime"] <= time.monotonic() - began + 1, row
