"""Agents for tests/faults/test_redis_faults.py."""

from __future__ import annotations

import time

from busagent import Agent


class Blob(Agent):
    """Replies with ``n`` bytes after ``delay`` seconds: replies of any size, to fill output
    buffers (the delay: so that a call taking its reply as input is read before it exists)."""

    def reply(self, n: int = 0, delay: float = 0.0) -> bytes:
        if delay:
            time.sleep(delay)
        return b"x" * n


class Measure(Agent):
    """Replies with the length of its input: a call that takes a (forwarded) reply."""

    def reply(self, data: bytes = b"") -> int:
        return len(data)
