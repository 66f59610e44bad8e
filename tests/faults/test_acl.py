"""The least-privilege ACL the README documents is enough for callers and workers."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

import busagent
from busagent import DistConf, Msg, ServerClient, embedded
from tests.agents import Adder

ROOT = Path(__file__).resolve().parents[2]


def readme_acl() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"ACL SETUSER busagent (.*?)\n\s*```", text, re.S)
    assert block, "the README documents an ACL"
    return block.group(1).replace(">PASSWORD", ">pw").split()


@pytest.fixture
def tcp_redis() -> Iterator[str]:
    server = embedded.start(unix=False)
    yield server.url
    server.stop()


def test_documented_acl_is_enough(tcp_redis: str) -> None:
    admin = redis.Redis.from_url(tcp_redis)
    admin.execute_command("ACL", "SETUSER", "busagent", *readme_acl())
    admin.acl_log_reset()
    url = tcp_redis.replace("redis://", "redis://busagent:pw@")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    w = subprocess.Popen([sys.executable, "-m", "busagent.cli", "worker", "--name", "aclw",
                          "--redis", url, "--agents", "tests.agents", "--log-level", "WARNING"],
                         cwd=ROOT, env=env)
    try:
        b = busagent.init(url)
        while b.redis.blpop([b.keys.ready("aclw")], timeout=1) is None:
            assert w.poll() is None, "the worker could not start under the ACL"
        a = Adder("a", to_dist=DistConf(server="aclw"))
        assert a(Msg("user", 1)).content == 2
        assert [m.content for m in a.memory.get()] == [1]
        sc = ServerClient("aclw")
        assert [x["name"] for x in sc.get_agent_list()] == ["a"]
        assert sc.delete_all_agent() == 1
        assert sc.stop()
        assert w.wait(20) == 0
        denied = {e["object"] for e in admin.acl_log()}
        version = tuple(int(x) for x in admin.info()["redis_version"].split(".")[:2])
        if version < (7, 2):
            # redis-py tries CLIENT SETINFO, which Redis added in 7.2 (and ignores the refusal);
            # ACL rules cannot name a subcommand the server does not know.
            denied.discard("client")
        assert not denied, f"commands the ACL denied: {denied}"
        # And a user without rights is refused with a clear error.
        admin.execute_command("ACL", "SETUSER", "nobody", "on", ">x", "-@all")
        with pytest.raises(busagent.RedisUnavailable):
            busagent.init(tcp_redis.replace("redis://", "redis://nobody:x@"))
    finally:
        if w.poll() is None:
            w.kill()
        busagent.shutdown()
        admin.close()


def test_a_refused_send_fails_its_placeholder_at_once(tcp_redis: str) -> None:
    """Redis refusing the routing script (an ACL without EVALSHA) is the caller's error now,
    not a CallTimeout after the whole deadline: result, gather and agather alike."""
    import asyncio
    import time

    admin = redis.Redis.from_url(tcp_redis)
    admin.execute_command("ACL", "SETUSER", "noroute", "on", ">pw", "~*", "&*", "+@all",
                          "-evalsha", "-eval")
    try:
        busagent.init(tcp_redis.replace("redis://", "redis://noroute:pw@"))
        ghost = busagent.RemoteAgent("some-agent", "ghost", Adder, "")
        t = time.monotonic()
        with pytest.raises(busagent.RedisUnavailable, match="evalsha"):
            ghost(Msg("user", 1)).result(timeout=30)
        got = busagent.gather([ghost(Msg("user", 2))], timeout=30, return_exceptions=True)
        assert isinstance(got[0], busagent.RedisUnavailable)
        got = asyncio.run(busagent.agather([ghost(Msg("user", 3))], timeout=30,
                                           return_exceptions=True))
        assert isinstance(got[0], busagent.RedisUnavailable)
        assert time.monotonic() - t < 15  # far from the 3 x 30 s of deadlines
    finally:
        busagent.shutdown()
        admin.close()
