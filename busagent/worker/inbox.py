"""Reading the server's inbox stream (``{p}:inbox:{server}``) with its consumer group.

One leader reads at a time (see :mod:`.mailboxes`), so stream order is dispatch order. Entries
come back as :class:`.jobs.Job`s, or :class:`.jobs.Rejected` for malformed ones.

Order across a dropped connection: Redis moves an entry to our pending list as it hands it to a
blocked XREADGROUP; if the connection dies then (CLIENT KILL, a proxy or load balancer dropping
an idle connection), the entry is pending and unseen. The reader therefore has a connection of
its own that redis-py never retries a command on (a silent retry of ``XREADGROUP >`` would
read the *next* entries first), and after any broken read it re-reads the pending list before
anything new, so each agent's calls still run in arrival order.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from busagent.bus import Bus, socket_options
from busagent.errors import ProtocolError
from busagent.keys import GROUP
from busagent.protocol import ControlBody, CreateBatch, Entry, deadletter
from busagent.tuning import HISTORY_EVERY, READ_COUNT

from .jobs import Job, Rejected
from .lasting import Lasting

log = logging.getLogger("busagent.worker")

_REDIS_DOWN = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError)
#: Redis refusing a read that would work later, as opposed to having lost our group.
_REFUSED = (redis.exceptions.NoPermissionError, redis.exceptions.OutOfMemoryError,
            redis.exceptions.ReadOnlyError)


class Inbox:
    """The inbox of server ``server``, read as consumer ``server``. ``held()`` returns the ids
    of the entries in flight (read and not yet written); ``stopping`` ends back-off waits."""

    def __init__(self, bus: Bus, server: str, stopping: threading.Event,
                 held: Callable[[], set[bytes]], reader: redis.Redis | None = None) -> None:
        self.bus = bus
        self.r = bus.redis
        self.server = server
        self.key = bus.keys.inbox(server)
        self.stopping = stopping
        self.held = held
        #: where the next read starts: "0" re-reads this consumer's pending entries, ">" new.
        self._start = "0"
        self._history_at = 0.0
        #: the reader's own connection, never retried by redis-py (see the module docstring);
        #: named, so an operator sees it in CLIENT LIST.
        #: (``reader``: another client, for unit tests on a fake Redis.)
        self.reader = reader if reader is not None else redis.Redis.from_url(
            bus.url, retry=Retry(NoBackoff(), 0), **socket_options(bus.url, bus.settings),
            client_name="busagent-inbox:" + "_".join(server.split()))
        #: a failure that lasts is logged once, with back-off (:mod:`.lasting`).
        self._lasting = Lasting(log, "reading the inbox works again")

    def ensure_group(self) -> None:
        """Create the stream and its consumer group unless they exist."""
        try:
            self.r.xgroup_create(self.key, GROUP, id="0", mkstream=True)
        except redis.exceptions.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    def read(self) -> tuple[list[Job], list[Rejected]]:
        """One leader's read: up to READ_COUNT entries, blocking up to a second when there are
        none. Redis errors are logged and waited out briefly (a stop ends the wait), then
        return nothing."""
        block = int(min(self.bus.settings.block_slice, 1.0) * 1000)
        if self._start == ">" and time.monotonic() - self._history_at > HISTORY_EVERY:
            # A safety net: entries can sit in our pending list unseen only after a broken read,
            # which already sends us there; look now and then anyway.
            self._start = "0"
        if self._start == "0":
            self._history_at = time.monotonic()
        start = self._start
        # What this process holds before a pending read: an entry it holds can be written, and
        # leave `held`, between the read and its dispatch; it must not run again.
        before = self.held() if start != ">" else None
        try:
            # Not interrupted on stop (entries read by an abandoned XREADGROUP would sit pending
            # unseen): the short block bounds how long a stop waits instead.
            resp: Any = self.reader.xreadgroup(GROUP, self.server, {self.key: start},
                                               count=READ_COUNT,
                                               block=None if start != ">" else block)
        except redis.exceptions.ResponseError as e:
            if isinstance(e, _REFUSED) or "NOPERM" in str(e) or "MISCONF" in str(e):
                # Refused (NOPERM after an ACL change, ...): nothing was lost; say what is
                # wrong once and back off until it clears.
                self._failed(e, "was refused")
                return [], []
            # NOGROUP (6.2) or UNBLOCKED (7.x, the stream was deleted under a blocked read):
            # Redis lost our data. Recreate the group and go on, without spinning.
            log.warning("reading the inbox failed (%s); recreating the consumer group", e)
            self.stopping.wait(0.1)
            try:
                self.ensure_group()
            except redis.exceptions.RedisError as e2:
                log.warning("could not recreate the consumer group: %s", self.bus.translate(e2))
            return [], []
        except _REDIS_DOWN as e:
            # Entries Redis handed to the broken connection are pending: read them first.
            self._start = "0"
            self._failed(e, "lost its connection")
            return [], []
        self._lasting.worked()
        entries = [e for _, es in resp or [] for e in es]
        if start != ">":
            # Our own pending entries (a restart under the same name), page by page, then new.
            self._start = entries[-1][0].decode() if entries else ">"
        jobs: list[Job] = []
        rejected: list[Rejected] = []
        for entry_id, fields in entries:
            # Pending entries deleted meanwhile come as {}.
            if not fields or (before is not None and entry_id in before):
                continue
            job = parse(entry_id, fields)
            if isinstance(job, Job):
                jobs.append(job)
            else:
                rejected.append(job)
        return jobs, rejected

    def _failed(self, e: BaseException, how: str) -> None:
        """Log a failed read once per distinct cause, then back off (0.5 s doubling to 5 s; a
        stop ends the wait early)."""
        text = str(self.bus.translate(e))
        self.stopping.wait(self._lasting.failed(
            f"reading the inbox {how}: {text}; retrying with backoff"))

    def close(self) -> None:
        self.reader.close()

    def wake(self) -> None:
        """End the leader's blocking read now rather than at its timeout: an entry that the
        worker acknowledges without replying."""
        fields = self.bus.sender.entry("control", ControlBody(op="wake").pack()).fields()
        # If this fails the read times out on its own within a second.
        with contextlib.suppress(redis.exceptions.RedisError):
            self.r.xadd(self.key, fields)  # type: ignore[arg-type]

    def deadletter(self, bad: Rejected) -> None:
        """Keep an entry nobody can be told about where an operator can look."""
        if bad.dead is None:
            return
        try:
            entry: Any = deadletter(bad.dead, f"malformed, no call id: {bad.error}", self.server)
            self.r.xadd(self.bus.keys.deadletter, entry,
                        maxlen=self.bus.settings.deadletter_max, approximate=True)
        except redis.exceptions.RedisError as e:
            log.warning("could not dead-letter an entry: %s", e)


def parse(entry_id: bytes, fields: dict[bytes, bytes]) -> Job | Rejected:
    """A stream entry's fields as a Job, or Rejected if malformed (with the dead-letter fields
    when it has no call id to answer)."""
    try:
        entry = Entry.from_fields(fields)
    except ProtocolError as e:
        call = Entry.reply_to(fields)
        log.warning("malformed entry %s: %s", entry_id.decode(), e)  # text, never b'...'
        return Rejected(entry_id, call, e, None if call else fields)
    job = Job(entry_id, entry)
    if entry.kind == "create_many":
        job.held = []
        with contextlib.suppress(Exception):  # a malformed body fails in the create itself
            job.held = CreateBatch.unpack(entry.body).agents
    return job
