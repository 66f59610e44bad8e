"""Child-process mode: worker processes a program starts for itself when no live worker can host
a class, stopped when the program exits (and, on Linux, when it dies).

They are private to the program (``ServerInfo.private_to`` is its id, passed in
:data:`busagent.bus.PRIVATE_TO`): another program on the same Redis never places agents on them,
since they stop with their program; it starts its own, or uses shared workers."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from .bus import PRIVATE_TO, Bus
from .embedded import _die_with_parent
from .errors import PlacementError
from .tuning import CHILD_GRACE, CHILD_START_TIMEOUT, CHILD_STOP_WAIT, EXIT_NOTICE_AFTER


@dataclass
class Children:
    bus: Bus
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    by_load: dict[str, list[str]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self, load: str) -> list[str]:
        with self.lock:
            names = self.by_load.get(load)
            if names and all(self.procs[n].poll() is None for n in names):
                return names
            b = self.bus
            env = dict(os.environ)
            # The children must import what this program imports: same path, same settings.
            env["PYTHONPATH"] = os.pathsep.join([os.getcwd(), *sys.path])
            # And the same settings (reply_ttl, secret, ...), whether they came from the
            # environment or from init() arguments.
            for name, value in b.settings.model_dump().items():
                if value is not None:
                    env[f"BUSAGENT_{name.upper()}"] = str(value)
            env["BUSAGENT_REDIS_URL"] = b.url
            env["BUSAGENT_NAMESPACE"] = b.namespace
            env[PRIVATE_TO] = b.private_to
            # Whatever grace the program's own settings give workers: a child worker stops only
            # when its program exits, and then the replies of calls still running have no reader.
            env["BUSAGENT_GRACE"] = str(CHILD_GRACE)
            base = f"child-{socket.gethostname()}-{os.getpid()}-{len(self.procs)}"
            names = [f"{base}-{i}" for i in range(b.settings.child_workers)]
            for n in names:
                with b.errors():
                    b.redis.delete(b.keys.ready(n))
                self.procs[n] = subprocess.Popen(
                    [sys.executable, "-m", "busagent.cli", "worker", "--name", n, "--agents", load,
                     "--parent-pid", str(os.getpid()), "--log-level", "WARNING"],
                    env=env, stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent,
                )
            deadline = time.monotonic() + CHILD_START_TIMEOUT
            for n in names:
                # Each worker pushes a token once it serves: wait on that, not on a clock.
                while True:
                    with b.errors():
                        if b.redis.blpop([b.keys.ready(n)], timeout=1) is not None:
                            break
                    code = self.procs[n].poll()
                    if code is not None:
                        raise PlacementError(
                            f"worker process {n} for {load} exited with code {code} while "
                            "starting; run `busagent worker --agents " + load + "` to see why"
                        )
                    if time.monotonic() > deadline:
                        raise PlacementError(f"worker process {n} did not start in time")
            self.by_load[load] = names
            return names

    def stop(self, announce: bool = True) -> None:
        """Stop this program's child workers, and wait until they have exited (so none prints
        after the program returns, and none outlives the private Redis they use): SIGTERM, a
        graceful stop of CHILD_GRACE, then SIGKILL after CHILD_STOP_WAIT. ``announce``: if
        that takes a while, say so on stderr (one line)."""
        def notice(n: int) -> None:
            if announce:
                print(f"busagent: waiting up to {CHILD_STOP_WAIT:g} s for {n} child worker(s) "
                      "of this program to stop (calls still running there are cut short)",
                      file=sys.stderr, flush=True)

        stop_processes(self.procs.values(), grace=CHILD_STOP_WAIT, notice=notice)
        self.procs.clear()
        self.by_load.clear()


def stop_processes(procs: Iterable[subprocess.Popen[bytes]], grace: float = 20.0,
                   notice: Callable[[int], None] | None = None) -> None:
    """SIGTERM (a graceful stop for a worker), then SIGKILL whatever outlives ``grace``
    seconds. ``notice(n)`` is called once if ``n`` of them are still running after
    EXIT_NOTICE_AFTER seconds."""
    procs = list(procs)
    for p in procs:
        if p.poll() is None:
            p.terminate()
    start = time.monotonic()
    deadline = start + grace
    if notice is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            for p in procs:
                p.wait(max(0.0, start + EXIT_NOTICE_AFTER - time.monotonic()))
        left = sum(p.poll() is None for p in procs)
        if left:
            notice(left)
    for p in procs:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def ensure_children(b: Bus, load: str) -> list[str]:
    """Names of worker processes serving ``--agents load`` for this program, started (and
    kept in ``b.children``) if none runs yet. Raises PlacementError if one cannot start."""
    if b.children is None:
        b.children = Children(b)
    return b.children.start(load)
