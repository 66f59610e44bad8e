"""Issue 10, items 7-10: the calling process's lifecycle (fork, event loops, Ctrl-C and exit,
scripts loaded by workers), through real worker processes and a real redis-server."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import time
import weakref
from pathlib import Path
from typing import Any

import pytest
import redis

import busagent
from busagent import DistConf, Msg
from tests.agents import Adder

from .conftest import FAST, ROOT, Workers, wait_for


def _observe_in_child(box: Any, n: int) -> None:
    box.observe(Msg("child", n))  # the child then exits through os._exit, as multiprocessing does


def test_calls_made_in_forked_children_are_delivered(workers: Workers) -> None:
    """Item 7: three multiprocessing children (fork) each observe one message and exit 0; the
    agent must have all three (the sender thread does not survive a fork)."""
    workers.start("w1")
    box = Adder("box", to_dist=DistConf(server="w1"))
    box.ready()
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_observe_in_child, args=(box, n)) for n in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    got = wait_for(lambda: sorted(m.content for m in busagent.admin.agent_memory(box.agent_id))
                   if len(busagent.admin.agent_memory(box.agent_id)) == 3 else None,
                   timeout=20, what="three observed messages")
    assert got == [0, 1, 2]
    # And the parent still sends after its children are gone.
    assert box(Msg("user", 5)).result(30).content == 6


def run_script(tmp_path: Path, code: str, *, timeout: float = 60, **kw: Any
               ) -> subprocess.CompletedProcess[str]:
    """Run ``code`` as a user's script, with no shared embedded Redis to find (its own cache
    folder) so that ``busagent.init()`` starts a private one."""
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(code))
    env = {**os.environ, **FAST, "PYTHONPATH": str(ROOT), "XDG_CACHE_HOME": str(tmp_path / "cache"),
           "TMPDIR": str(tmp_path)}
    env.pop("BUSAGENT_REDIS_URL", None)
    return subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=timeout, **kw)


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_calls_made_in_spawned_children_reach_the_parents_bus(workers: Workers,
                                                              method: str) -> None:
    """Item 7, the other start methods: a spawned (or forkserver) child starts afresh, with no
    process-wide bus; it must use its parent's (here a Redis given to init(), not in the
    environment), not a private Redis of its own where the agent is not."""
    workers.start("w1")
    box = Adder("box", to_dist=DistConf(server="w1"))
    box.ready()
    ctx = multiprocessing.get_context(method)
    procs = [ctx.Process(target=_observe_in_child, args=(box, n)) for n in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    got = wait_for(lambda: sorted(m.content for m in busagent.admin.agent_memory(box.agent_id))
                   if len(busagent.admin.agent_memory(box.agent_id)) == 3 else None,
                   timeout=20, what="three observed messages")
    assert got == [0, 1, 2]


def test_a_forked_child_that_exits_normally_leaves_the_parent_working(tmp_path: Path) -> None:
    """A bare os.fork() child that ends through sys.exit runs atexit: it must not stop what
    belongs to the parent (here its private Redis)."""
    p = run_script(tmp_path, """
        import os, sys
        import busagent
        b = busagent.init()
        pid = os.fork()
        if pid == 0:
            busagent.bus.current().redis.ping()
            sys.exit(0)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        import redis
        redis.Redis.from_url(b.url).set("k", "v")  # a new connection: the socket file is there
        print("parent ok")
    """)
    assert p.returncode == 0 and "parent ok" in p.stdout, p.stderr


def _clients(raw: redis.Redis, name: str) -> int:
    return sum(1 for c in raw.client_list() if c.get("name") == name)


def test_connections_stay_bounded_whatever_the_number_of_event_loops(
    workers: Workers, redis_url: str
) -> None:
    """Item 8: sixty asyncio.run() calls that each await a placeholder must not leave sixty
    Redis connections (and clients) behind."""
    workers.start("w1")
    b = busagent.init(redis_url, prefix=workers.prefix)
    a = Adder("a", to_dist=DistConf(server="w1"))
    a.ready()
    raw = redis.Redis.from_url(redis_url, decode_responses=True)
    before = len(raw.client_list())

    async def once(n: int) -> int:
        return int((await a(Msg("user", n))).content)

    for n in range(60):
        assert asyncio.run(once(n)) == n + 1
    after = len(raw.client_list())
    raw.close()
    assert after - before <= 5, (before, after)
    assert b.async_clients() <= 1



def test_connections_stay_bounded_when_event_loops_are_dropped_without_closing(
    workers: Workers, redis_url: str
) -> None:
    """Item 8, loops never closed: ``loop = asyncio.new_event_loop();
    loop.run_until_complete(...); del loop``, 200 times. Once the loops are collected their
    clients and connections must be too: busagent's per-loop cache must not keep a loop (or its
    client's connections) alive."""
    workers.start("w1")
    b = busagent.init(redis_url, prefix=workers.prefix)
    a = Adder("a", to_dist=DistConf(server="w1"))
    a.ready()
    raw = redis.Redis.from_url(redis_url, decode_responses=True)
    before = len(raw.client_list())

    async def once(n: int) -> int:
        return int((await a(Msg("user", n))).content)

    alive = weakref.WeakSet[asyncio.AbstractEventLoop]()
    for n in range(200):
        loop = asyncio.new_event_loop()
        alive.add(loop)
        assert loop.run_until_complete(once(n)) == n + 1
        del loop
    gc.collect()
    after = len(raw.client_list())
    raw.close()
    assert len(alive) == 0
    assert after - before <= 5, (before, after)
    assert b.async_clients() <= 1


GATHER_SCRIPT = f"""
    import sys
    sys.path.insert(0, {str(ROOT)!r})
    import busagent
    from busagent import Msg
    from tests.agents import Sleeper

    busagent.init()
    agents = [Sleeper(f"s{{i}}", seconds=120, to_dist=True) for i in range(4)]
    for a in agents:
        a.ready()
    calls = [a(Msg("user", 1)) for a in agents]
    b = busagent.bus.current()
    print("children", *[p.pid for p in b.children.procs.values()], flush=True)
    print("redis", b._embedded.process.pid, flush=True)
    CALLS_RUNNING
"""


def _start_script(tmp_path: Path, last: str) -> tuple[subprocess.Popen[str], list[int], int]:
    script = tmp_path / "flow.py"
    script.write_text(textwrap.dedent(GATHER_SCRIPT).replace("CALLS_RUNNING", last))
    env = {**os.environ, **FAST, "XDG_CACHE_HOME": str(tmp_path / "cache"),
           "TMPDIR": str(tmp_path)}
    env.pop("BUSAGENT_REDIS_URL", None)
    # Its own session, as a shell runs a foreground job in its own process group: Ctrl-C is
    # SIGINT to that whole group.
    p = subprocess.Popen([sys.executable, str(script)], cwd=tmp_path, env=env, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    assert p.stdout is not None
    children = [int(x) for x in p.stdout.readline().split()[1:]]
    redis_pid = int(p.stdout.readline().split()[1])
    assert children and redis_pid, p.stderr.read() if p.stderr else ""
    return p, children, redis_pid


def _after_start(err: str) -> list[str]:
    """stderr's lines after the one that says a private Redis was started (said once, first)."""
    lines = [x for x in err.splitlines() if x.strip()]
    assert lines and "started a private Redis" in lines[0], err
    return lines[1:]


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # A zombie is dead too: it only waits for its reaper.
    return Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z")


def test_ctrl_c_during_a_gather_returns_at_once_with_one_line(tmp_path: Path) -> None:
    """Item 9: Ctrl-C while gathering calls on child workers (to_dist=True, private Redis):
    the program ends within a couple of seconds with one line on stderr, its child workers
    and its private Redis are gone when it returns (so nothing prints after the prompt: the
    stderr pipe they share closes with it), and no private Redis folder is left."""
    p, children, redis_pid = _start_script(tmp_path, "busagent.gather(calls)")
    os.killpg(p.pid, signal.SIGINT)
    # communicate() reads to EOF: it returns only when every process holding the program's
    # stderr (its child workers, its Redis) has exited or closed it.
    try:
        _, err = p.communicate(timeout=10)
    finally:
        with contextlib.suppress(ProcessLookupError):  # whatever the test left of the group
            os.killpg(p.pid, signal.SIGKILL)
    lines = _after_start(err)
    assert len(lines) == 1, err
    assert "interrupted" in lines[0] and "flow.py" in lines[0], err
    assert all(_gone(c) for c in children) and _gone(redis_pid)
    assert not list(tmp_path.glob("busagent-redis-*"))


def test_an_exit_with_calls_still_running_ends_soon_and_says_what_it_waits_for(
    tmp_path: Path
) -> None:
    """Item 9: a script that ends while its calls run on its child workers does not hang for
    those calls; if its exit waits at all, it says for what."""
    p, children, redis_pid = _start_script(tmp_path, "print('done', flush=True)")
    try:
        assert p.stdout is not None and p.stdout.readline() == "done\n"
        _, err = p.communicate(timeout=10)
    finally:
        with contextlib.suppress(ProcessLookupError):  # whatever the test left of the group
            os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode == 0, err
    lines = _after_start(err)
    assert len(lines) <= 1 and all(x.startswith("busagent: waiting") for x in lines), err
    assert all(_gone(c) for c in children) and _gone(redis_pid)
    assert not list(tmp_path.glob("busagent-redis-*"))


SCRIPT_WITH_EFFECTS = """
    import argparse
    import busagent
    from busagent import Agent, Msg

    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=3)
    args = parser.parse_args()
    LOG = "effects.log"
    try:
        import json
    except ImportError:
        json = None
    try:
        with open(LOG, "a") as f:
            f.write("try\\n")
    except OSError:
        pass
    if LOG:
        open(LOG, "a").write("if\\n")
    for _ in range(1):
        open(LOG, "a").write("for\\n")
    n_calls = len(open(LOG).read())
    GREETING = "hi" + "!"
    SHAPE: tuple[int, ...] = (1, 2)


    class Echo(Agent):
        def reply(self, x=None):
            return Msg(self.name, json.dumps([GREETING, x.content, list(SHAPE)]))


    busagent.init()
    a = Echo("e", to_dist=True)
    print(a(Msg("u", args.n)).result(60).content, flush=True)
"""


def test_workers_take_a_scripts_definitions_and_nothing_that_runs_it(tmp_path: Path) -> None:
    """Item 10: child workers load the script for its definitions only: a top-level
    parse_args(), try/if/for blocks with effects and assignments from calls do not run on
    them (the effects happen once, in the program), while imports (also inside a try of
    definitions only), classes and assignments of literals do."""
    p = run_script(tmp_path, SCRIPT_WITH_EFFECTS)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == '["hi!", 3, [1, 2]]', p.stderr
    assert (tmp_path / "effects.log").read_text() == "try\nif\nfor\n"
    assert "Skip" not in p.stderr and "Traceback" not in p.stderr, p.stderr


def test_an_exit_that_waits_to_send_says_so(tmp_path: Path) -> None:
    """Item 9: a program whose Redis went away, exiting with a call still queued, waits for it
    to be sent (up to SEND_PATIENCE) and says what it waits for instead of hanging silently."""
    p = run_script(tmp_path, """
        import busagent
        b = busagent.init()
        b._embedded.kill()  # the Redis dies under the program
        b.sender.send(lambda pipe: pipe.set("k", "v"), 1, lambda e: None)
        print("exiting", flush=True)
    """)
    assert p.returncode == 0 and "exiting" in p.stdout, p.stderr
    waits = [x for x in p.stderr.splitlines() if "waiting" in x]
    assert len(waits) == 1 and "send" in waits[0] and "Redis" in waits[0], p.stderr


@pytest.mark.parametrize("presses", [2, 4])
def test_ctrl_c_pressed_again_during_the_exit_changes_nothing(tmp_path: Path,
                                                              presses: int) -> None:
    """Item 9, an impatient user: Ctrl-C, then Ctrl-C again every 0.3 s while the program stops
    its child workers and its private Redis. Still one line, no traceback from the exit, nothing
    printed by a child worker whose Redis vanished, and the private Redis folder removed: the
    exit is not interruptible half-way."""
    p, children, redis_pid = _start_script(tmp_path, "busagent.gather(calls)")
    try:
        for i in range(presses):
            if i:
                time.sleep(0.3)  # the user's pace, not a synchronization
            os.killpg(p.pid, signal.SIGINT)
        _, err = p.communicate(timeout=20)
    finally:
        with contextlib.suppress(ProcessLookupError):  # whatever the test left of the group
            os.killpg(p.pid, signal.SIGKILL)
    lines = _after_start(err)
    assert len(lines) == 1, err
    assert "interrupted" in lines[0] and "flow.py" in lines[0], err
    assert all(_gone(c) for c in children) and _gone(redis_pid)
    assert not list(tmp_path.glob("busagent-redis-*"))
