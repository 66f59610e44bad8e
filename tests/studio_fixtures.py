"""A real ``busagent studio`` process for the studio and status tests."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import httpx

from .conftest import FAST, ROOT, wait_for

TOKEN = "test-token-1234"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Studio:
    url: str
    token: str
    proc: subprocess.Popen[bytes]

    def get(self, path: str, **kw: object) -> httpx.Response:
        return httpx.get(self.url + path, timeout=15, **kw)  # type: ignore[arg-type]

    def send(self, method: str, path: str, token: str | None = TOKEN) -> httpx.Response:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.request(method, self.url + path, headers=headers, timeout=60)


def start_studio(redis_url: str, prefix: str) -> Studio:
    port = free_port()
    env = {**os.environ, **FAST, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "busagent.cli", "studio", "--redis", redis_url, "--prefix",
         prefix, "--port", str(port), "--token", TOKEN, "--interval", "0.3"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL)
    s = Studio(f"http://127.0.0.1:{port}", TOKEN, proc)

    def up() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"studio exited with {proc.returncode}")
        try:
            return s.get("/api/summary").status_code == 200
        except httpx.TransportError:
            return False

    wait_for(up, 30, "the studio to answer")
    return s


@contextlib.contextmanager
def running_studio(redis_url: str, prefix: str) -> Iterator[Studio]:
    """A studio process for the test's prefix, stopped afterwards (use in a fixture)."""
    s = start_studio(redis_url, prefix)
    try:
        yield s
    finally:
        s.proc.terminate()
        try:
            s.proc.wait(10)
        except subprocess.TimeoutExpired:
            s.proc.kill()
            s.proc.wait()
