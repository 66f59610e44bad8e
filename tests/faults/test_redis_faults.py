"""Redis that is up but refuses or loses things, and hosts whose clocks disagree (issue 16).

Each test runs real worker processes against its own redis-server, configured for the fault
(CONFIG SET), so nothing here disturbs the session's Redis.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

import busagent
from busagent import DistConf, Msg, embedded
from busagent.admin import agent_info, servers
from tests.agents import Adder

from ..conftest import FAST, Workers, wait_for

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


def skewed(offset: str) -> dict[str, str]:
    """The environment of a process whose wall clock is ``offset`` off (libfaketime); its
    monotonic clock stays true, as on a host whose NTP is broken."""
    return {"LD_PRELOAD": str(FAKETIME), "FAKETIME": offset, "FAKETIME_DONT_FAKE_MONOTONIC": "1"}


@pytest.mark.skipif(not FAKETIME.exists(), reason="needs libfaketime (apt-get install faketime)")
@pytest.mark.parametrize("offset", ["+6m", "-6m"])
def test_a_worker_whose_clock_is_minutes_off_is_judged_by_redis_time(
        own: tuple[embedded.Server, Workers], offset: str) -> None:
    _, w = own
    w.start("true")
    skew = w.start("skewed", env=skewed(offset))
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
