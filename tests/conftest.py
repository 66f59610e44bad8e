"""Fixtures: a real redis-server (the embedded one) for the session, real worker processes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

import busagent
from busagent import embedded
from busagent.spawn import stop_processes

ROOT = Path(__file__).resolve().parent.parent

#: fast heartbeats so liveness tests finish quickly.
FAST = {"BUSAGENT_HEARTBEAT": "0.3", "BUSAGENT_DEAD_AFTER": "1.5", "BUSAGENT_SWEEP_AFTER": "30"}


def wait_for(cond: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    """Poll ``cond`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    url = os.environ.get("BUSAGENT_TEST_REDIS_URL")
    if url:
        yield url
        return
    server = embedded.start()
    yield server.url
    server.stop()


@pytest.fixture
def prefix() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
def bus(redis_url: str, prefix: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[busagent.bus.Bus]:
    for k, v in FAST.items():
        monkeypatch.setenv(k, v)
    b = busagent.init(redis_url, prefix=prefix)
    yield b
    busagent.shutdown()


@pytest.fixture
def raw(redis_url: str) -> Iterator[redis.Redis]:
    """A plain redis-py client, as a redis-cli user would look."""
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    yield r
    r.close()


class Workers:
    def __init__(self, url: str, prefix: str) -> None:
        self.url = url
        self.prefix = prefix
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, *modules: str, extra: list[str] | None = None,
              env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        r = redis.Redis.from_url(self.url)
        ready = f"{self.prefix}:ready:{name}"
        r.delete(ready)
        e = {**os.environ, **FAST, **(env or {}), "PYTHONPATH": str(ROOT)}
        cmd = [sys.executable, "-m", "busagent.cli", "worker", "--name", name, "--redis", self.url,
               "--prefix", self.prefix, "--log-level", "WARNING"]
        for m in modules or ("tests.agents",):
            cmd += ["--agents", m]
        p = subprocess.Popen(cmd + (extra or []), cwd=ROOT, env=e)
        self.procs[name] = p
        deadline = time.monotonic() + 30
        while r.blpop([ready], timeout=0.5) is None:
            if p.poll() is not None:
                raise AssertionError(f"worker {name} exited with {p.returncode}")
            if time.monotonic() > deadline:
                raise AssertionError(f"worker {name} did not start")
        r.close()
        return p

    def stop_all(self) -> None:
        stop_processes(self.procs.values())


@pytest.fixture
def workers(bus: busagent.bus.Bus, redis_url: str, prefix: str) -> Iterator[Workers]:
    w = Workers(redis_url, prefix)
    yield w
    w.stop_all()
