"""A worker's recent log lines in Redis: the capped stream ``{p}:logs:{server}``.

``busagent logs SERVER [--follow]`` and the studio's Logs page read it, from any machine. A
logging handler on the root logger queues each formatted record; a thread writes them in
batches (one pipeline per ``LOG_BATCH`` lines, after ``LOG_LINGER`` seconds), so logging never
waits on Redis and a call that logs costs an append to a deque. Lines that arrive while Redis is
away are dropped past the queue's bound rather than held without limit: they are diagnostics,
not data. Fields: ``t`` (epoch seconds), ``level``, ``logger``, ``msg`` (with the traceback).
"""

from __future__ import annotations

import collections
import logging
import threading
import time

import redis

from busagent.bus import Bus
from busagent.tuning import LOG_BATCH, LOG_LINES, LOG_LINGER

#: lines queued while Redis cannot be written (count).
_QUEUE = 10 * LOG_BATCH


class LogStream(logging.Handler):
    """Ships the records the root logger passes (the worker's ``--log-level``) to the stream."""

    def __init__(self, bus: Bus, server: str) -> None:
        super().__init__()
        self.r = bus.redis
        self.key = bus.keys.logs(server)
        self.lines: collections.deque[dict[str, str]] = collections.deque(maxlen=_QUEUE)
        self.wake = threading.Event()
        self.done = threading.Event()
        #: a child worker of a program: Redis gone at its stop is its parent stopping it
        self.quiet_gone = False
        self.setFormatter(logging.Formatter("%(message)s"))
        self.thread = threading.Thread(target=self._run, name=f"{server}-logs", daemon=True)

    def start(self) -> None:
        logging.getLogger().addHandler(self)
        self.thread.start()

    def stop(self) -> None:
        """Detach, and write what is queued (at most a few seconds' try)."""
        logging.getLogger().removeHandler(self)
        self.done.set()
        self.wake.set()
        self.thread.join(5)

    def emit(self, record: logging.LogRecord) -> None:
        if record.name == "busagent.logstream":
            return  # our own failures: writing them would loop
        try:
            msg = self.format(record)
        except Exception:  # noqa: BLE001 - a bad log call must not break the caller
            msg = str(record.msg)
        self.lines.append({"t": f"{record.created:.3f}", "level": record.levelname,
                           "logger": record.name, "msg": msg})
        self.wake.set()

    def _run(self) -> None:
        while not self.done.is_set():
            self.wake.wait()
            self.done.wait(LOG_LINGER)  # gather a burst into one write
            self.wake.clear()
            self._flush()
        self._flush()

    def _flush(self) -> None:
        while self.lines:
            batch = [self.lines.popleft() for _ in range(min(LOG_BATCH, len(self.lines)))]
            pipe = self.r.pipeline(transaction=False)
            for fields in batch:
                pipe.xadd(self.key, fields, maxlen=LOG_LINES, approximate=True)  # type: ignore[arg-type]
            try:
                pipe.execute()
            except redis.exceptions.RedisError as e:
                quiet = (self.quiet_gone and self.done.is_set()
                         and isinstance(e, redis.exceptions.ConnectionError))
                logging.getLogger("busagent.logstream").log(
                    logging.DEBUG if quiet else logging.WARNING, "log lines lost: %s", e)
                if not self.done.is_set():
                    time.sleep(1.0)  # Redis is away: do not spin
                return
