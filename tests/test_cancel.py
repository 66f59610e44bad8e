"""Cancellation (issue 11): ``busagent.cancel`` of queued calls, running async and running sync
replies, a sync reply that ignores its flag, the studio's "calls now", and Ctrl-C in a real
program's ``gather``. Real workers, a real redis-server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import busagent
from busagent import Cancelled, DistConf, Msg, Placeholder
from busagent.errors import ConfigError
from busagent.studio.data import calls_now
from tests.state_agents import Slow

from .conftest import FAST, ROOT, Workers, wait_for

MODULE = "tests.state_agents"


def running(p: Placeholder) -> bool:
    """Whether a worker lists the call as running now (its heartbeat: the studio's 'calls
    now')."""
    return any(c["call"] == p.call_id for c in calls_now())


def answered(p: Placeholder) -> bool:
    b = busagent.bus.current()
    return bool(b.redis.exists(b.keys.reply(p.call_id)))


@pytest.fixture
def slow(workers: Workers) -> Any:
    workers.start("w1", MODULE)
    return Slow("s", to_dist=DistConf(server="w1")).ready()


def test_cancel_of_queued_calls_answers_them_at_once_and_they_never_run(slow: Any) -> None:
    first = slow(Msg("u", "first"))  # runs until cancelled (up to 60 s)
    q1, q2, q3 = slow.quick("q1"), slow.quick("q2"), slow.quick("q3")
    wait_for(lambda: running(first), 30, "the first call running")
    busagent.cancel(q1)
    busagent.cancel([q3])
    with pytest.raises(Cancelled, match="before it started"):
        q1.result(timeout=30)
    with pytest.raises(Cancelled):
        q3.result(timeout=30)
    # Answered while the call ahead of them still runs: not when their turn came.
    assert not answered(first)
    busagent.cancel(first)
    with pytest.raises(Cancelled):
        first.result(timeout=30)
    assert q2.result(timeout=30) == "q2"
    assert slow.history().result(timeout=30) == ["stopped first", "q2"]


def test_cancel_of_a_running_async_reply_raises_cancelled_error_inside_it(slow: Any) -> None:
    p = slow.asleep(60)
    wait_for(lambda: running(p), 30, "the async call running")
    busagent.cancel(p)
    with pytest.raises(Cancelled, match="while it ran"):
        p.result(timeout=30)
    # The studio's "calls now" no longer lists it, and the agent goes on serving.
    wait_for(lambda: not running(p), 10, "the cancelled call gone from 'calls now'")
    assert slow.quick("after").result(timeout=30) == "after"
    assert slow.history().result(timeout=30) == ["async cancelled", "after"]


def test_cancel_of_a_call_waiting_for_its_inputs(slow: Any, workers: Workers) -> None:
    other = Slow("o", to_dist=DistConf(server="w1")).ready()
    blocker = other(Msg("u", "blocker"))  # not answered until cancelled
    p = slow.quick(blocker)  # waits on the loop for blocker's reply
    wait_for(lambda: running(blocker), 30, "the blocker running")
    busagent.cancel(p)
    with pytest.raises(Cancelled):
        p.result(timeout=30)
    busagent.cancel(blocker)
    assert slow.history().result(timeout=30) == []


def test_cancel_of_a_running_sync_reply_sets_its_flag(slow: Any) -> None:
    p = slow(Msg("u", "x"))
    wait_for(lambda: running(p), 30, "the sync call running")
    busagent.cancel(p)
    with pytest.raises(Cancelled, match="while it ran"):
        p.result(timeout=30)
    wait_for(lambda: not running(p), 10, "the cancelled call gone from 'calls now'")
    # It saw busagent.cancelled() and stopped early; what it did is kept (declared state).
    assert slow.history().result(timeout=30) == ["stopped x"]


def test_a_sync_reply_that_ignores_its_flag_completes_and_its_reply_is_discarded(
        slow: Any, tmp_path: Path) -> None:
    p = slow.ignoring(str(tmp_path))
    wait_for(lambda: running(p), 30, "the sync call running")
    busagent.cancel(p)
    wait_for(lambda: (tmp_path / "seen").exists(), 30, "the flag to reach the call")
    (tmp_path / "release").touch()
    with pytest.raises(Cancelled, match="reply it made was discarded"):
        p.result(timeout=30)
    assert slow.history().result(timeout=30) == ["ignoring finished"]


def test_cancel_after_the_reply_changes_nothing_and_bad_input_is_one_line(slow: Any) -> None:
    p = slow.quick("done")
    assert p.result(timeout=30) == "done"
    busagent.cancel(p)
    assert p.result() == "done"
    fresh = slow.quick("again")
    assert answered(fresh) or wait_for(lambda: answered(fresh), 30, "the reply")
    busagent.cancel(Placeholder(fresh.call_id, fresh.agent_id))  # answered already
    assert Placeholder(fresh.call_id, fresh.agent_id).result(timeout=30) == "again"
    with pytest.raises(ConfigError, match="does not know its agent"):
        busagent.cancel(Placeholder.from_id("some-call"))
    with pytest.raises(ConfigError, match="placeholders"):
        busagent.cancel([1])  # type: ignore[list-item]


PROGRAM = """
import json, sys
import busagent
from busagent import DistConf, Msg
from tests.state_agents import Slow

busagent.init(sys.argv[1], prefix=sys.argv[2])
s = busagent.RemoteAgent.by_id(sys.argv[3])
calls = [s(Msg("u", "a")), s.quick("q1"), s.asleep(60), s.quick("q2")]
busagent.bus.current().sender.flush()
print(json.dumps([p.call_id for p in calls]), flush=True)
busagent.gather(calls{option})
"""


@pytest.mark.parametrize("option", ["", ", cancel_on_interrupt=False"], ids=["default", "off"])
def test_ctrl_c_in_gather_cancels_what_it_sent(slow: Any, redis_url: str, prefix: str,
                                                tmp_path: Path, option: str) -> None:
    script = tmp_path / "flow.py"
    script.write_text(PROGRAM.replace("{option}", option))
    env = {**os.environ, **FAST, "PYTHONPATH": str(ROOT)}
    p = subprocess.Popen([sys.executable, str(script), redis_url, prefix, slow.agent_id],
                         cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, start_new_session=True)
    try:
        assert p.stdout is not None
        line = p.stdout.readline()
        assert line, p.communicate(timeout=30)[1]
        ps = [Placeholder(c, slow.agent_id) for c in json.loads(line)]
        wait_for(lambda: running(ps[0]), 30, "the first call running")
        os.killpg(p.pid, signal.SIGINT)  # Ctrl-C: to the program's process group
        _, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode != 0
    assert "Traceback" not in err, err
    if option:  # not cancelled: the calls go on, as before this option existed
        assert not answered(ps[1])
        busagent.cancel([ps[0], ps[2]])  # (so the test ends: they would run 60 s)
        assert ps[1].result(timeout=30) == "q1"
        return
    for q in ps:
        with pytest.raises(Cancelled):
            q.result(timeout=30)
    assert slow.history().result(timeout=30) == ["stopped a"]


def test_a_cancel_that_comes_before_its_call_starts_is_applied_when_it_starts() -> None:
    """Unit: the call was between its mailbox and the executor when its cancel was read."""
    import asyncio

    from busagent.worker.cancels import Cancels

    c, loop = Cancels(), asyncio.new_event_loop()
    try:
        c.cancel(["c1"], loop)
        assert c.begin("c1").cancelled  # cancelled as it starts
        c.end("c1")
        assert not c.begin("c1").cancelled  # used once: a second run is not cancelled
        c.end("c1")
        assert not c.begin("c2").cancelled and c.running.keys() == {"c2"}
    finally:
        loop.close()
