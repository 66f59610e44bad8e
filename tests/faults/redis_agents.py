"""Agents for tests/faults/test_redis_faults.py."""

from __future__ import annotations

from busagent import Agent


class Blob(Agent):
    """Replies with ``n`` bytes: replies of any size, to fill output buffers."""

    def reply(self, n: int = 0) -> bytes:
        return b"x" * n
