"""The worker: one long-running process that hosts many agents and serves their calls.

Threads work as leader and followers: one idle thread (the leader) blocks in XREADGROUP on the
server's inbox; when entries arrive it puts them into per-agent mailboxes in stream order, wakes
a follower to lead next, and runs the first ready agent itself. So a lone call is read, run and
answered by one thread with no hand-off, and a burst is spread over the pool.

* Actor semantics: an agent is claimed by one thread at a time, which drains its mailbox in
  order; calls to different agents run in parallel (:mod:`.mailboxes`).
* ``async def`` replies, and calls whose forwarded placeholders are not resolved yet, move to an
  asyncio loop thread, so waiting never holds a pool thread. The agent stays claimed meanwhile.
* A reply, the agent's memory changes, the XACK and the XDEL are written by one ``commit.lua``
  call, batched across threads (group commit, :mod:`.committer`): the inbox holds only calls in
  flight, and Redis always has each agent's memory as of its last completed call.
* A heartbeat thread writes cpu, memory and counts to the servers hash and sweeps dead servers
  (:mod:`.heartbeat`).

:class:`Worker` is the only part that knows every collaborator; they never call back into it.
A call goes: :class:`.inbox.Inbox` reads it -> :class:`.mailboxes.Mailboxes` queues it and hands
its agent to a thread -> :class:`.executor.Executor` (calls, hub deliveries),
:class:`.hosting.Hosting` (create, create_many, restore) or the worker's own control ops turn
it into a Done, or an awaitable the worker parks on the loop ->
:class:`.committer.Committer` writes it and reports back to the mailboxes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import redis

from busagent import bus as _bus
from busagent import callchain, tracing
from busagent.config import Settings
from busagent.errors import CallCycle, Cancelled, ConfigError
from busagent.protocol import CallBody, CancelBody, ControlBody
from busagent.tuning import DRAIN_BATCH, MAX_LENT_THREADS, SWEEP_PROGRAMS_EVERY

from . import owners, recovery
from .busio import BusIO
from .cancels import Cancels
from .committer import Committer
from .executor import Executor, Outcome
from .heartbeat import Heartbeat
from .hosting import Hosting
from .inbox import Inbox
from .jobs import Done, Job, Rejected, Replies, silent
from .lasting import Lasting
from .load import load
from .logstream import LogStream
from .mailboxes import Mailboxes, Turn
from .stats import Stats

log = logging.getLogger("busagent.worker")


class Worker:
    """Serves the agents of ``modules`` (module names or ``.py`` paths) as server ``name``.
    ``parent_pid``: stop when that process is no longer this one's parent."""

    # Made in start(), once connected.
    bus: _bus.Bus
    loop: asyncio.AbstractEventLoop
    hosting: Hosting
    inbox: Inbox
    executor: Executor
    committer: Committer
    heartbeat: Heartbeat

    def __init__(self, name: str, modules: list[str], settings: Settings | None = None,
                 parent_pid: int | None = None) -> None:
        self.name = name
        self.settings = settings or Settings.load()
        self.specs = modules
        self.parent_pid = parent_pid
        self.loaded: dict[str, Any] = {}
        self.started = time.time()
        self.mailboxes = Mailboxes(threads=self.settings.threads)
        self.stats = Stats()
        self.cancels = Cancels()
        self.replies = Replies(name, self.settings.max_message_bytes)
        self.stopping = threading.Event()
        #: set by :meth:`shutdown` once the grace is over: the heartbeat goes on until then,
        #: recording ``stopping``, so that a graceful stop with long calls still running is not
        #: taken for a death (its agents moved and their calls run twice).
        self.closing = threading.Event()
        #: on stop, move the agents to other servers instead of deleting them.
        self.drain = False
        self.threads: list[threading.Thread] = []
        self._beat_thread: threading.Thread | None = None

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Load modules, connect, register and start serving in background threads. Raises
        ConfigError for a module that does not load or a name a live worker has, and
        RedisUnavailable or BusError when Redis fails."""
        for spec in self.specs:
            mod_name, mod = load(spec)
            self.loaded[mod_name] = mod
        s = self.settings
        # A connection per runner thread, lent ones included (each blocked nested call waits
        # in BLMOVE on its own), and room for the heartbeat, the committer and recovery: an
        # exhausted pool would stop the heartbeat and get the worker presumed dead.
        self.bus = bus = _bus.Bus(s, max_connections=s.threads + MAX_LENT_THREADS + 64)
        problem = bus.eviction_problem()
        if problem:
            # A worker holds the registry, inboxes and memories: on an evicting Redis it would
            # lose them silently, so it does not start (Sidekiq and BullMQ only warn; losing
            # agents without a word is worse than a one-line error at start-up).
            bus.close()
            raise ConfigError(f"{problem}; this worker will not start on it")
        _bus.install(bus)
        self.bus.server_name = self.name  # this server's model config overrides come first
        bus.blocking = self._lend  # nested calls resolved inside reply must not starve the pool
        callchain.inherit_in_threads()  # a reply's own threads carry its call chain
        mb = self.mailboxes
        self.hosting = Hosting(bus, self.name, s.capacity, self.loaded, self.replies)
        self.inbox = Inbox(bus, self.name, self.stopping, mb.held_ids)
        self.executor = Executor(BusIO(bus), self.replies, self.hosting.agent, s.secret,
                                 clock=lambda: self.heartbeat.clock.now(), cancels=self.cancels)
        self.heartbeat = Heartbeat(bus, self.name, s.capacity, list(self.loaded),
                                   self.hosting.agents, lambda: mb.inflight, self.stopping,
                                   self.started, self.stats.snapshot)
        self.heartbeat.private_to = os.environ.get(_bus.PRIVATE_TO) or None
        self.loop = asyncio.new_event_loop()
        loop_ready = threading.Event()

        def run_loop() -> None:
            asyncio.set_event_loop(self.loop)
            self.loop.call_soon(loop_ready.set)
            self.loop.run_forever()

        self._spawn(run_loop, "loop")
        loop_ready.wait()
        asyncio.run_coroutine_threadsafe(self._setup_loop(), self.loop).result()
        self.committer = Committer(bus, self.inbox.key, self.loop, self._written)
        self.logs = LogStream(bus, self.name)
        # A program's child worker whose Redis vanished while stopping: its parent is stopping
        # it (the private Redis goes with the program), so losing Redis then is no news to print.
        self.heartbeat.quiet_gone = self.logs.quiet_gone = self.parent_pid is not None
        self.logs.start()
        with bus.errors():  # a refusal at start-up is one line from the CLI, not a traceback
            self.inbox.ensure_group()
            self.heartbeat.adopt(self.hosting.rebuild)
        # Heart-beating first: the record just written must not go stale while the runner
        # threads start (slow on a loaded host), or others would take it for dead.
        self._beat_thread = self._spawn(self._beat, "heartbeat")
        for i in range(s.threads):
            self._spawn(self._runner, f"runner-{i}")
        with bus.errors():
            self.heartbeat.announce()
        log.info("worker %s serving %s on %s", self.name, list(self.loaded), bus.url_for_humans)

    async def _setup_loop(self) -> None:
        self.bus.set_aredis(_bus.aconnect(self.bus.url, self.settings, max_connections=256))

    def _spawn(self, target: Callable[[], None], name: str) -> threading.Thread:
        t = threading.Thread(target=target, name=f"{self.name}-{name}", daemon=True)
        t.start()
        self.threads.append(t)
        return t

    def run(self) -> None:
        """Serve until SIGTERM/SIGINT, ``stop()``, a control ``stop`` or the parent's death."""
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, self._on_signal)
        self.start()
        while not self.stopping.wait(1.0):
            if self._quiet_if_orphaned():
                self.stop()
        self.shutdown()

    def _on_signal(self, *_: Any) -> None:
        self._quiet_if_orphaned()
        self.stop()

    def _quiet_if_orphaned(self) -> bool:
        """True if this child worker's program is gone (killed, even by kill -9: its SIGTERM
        comes by PR_SET_PDEATHSIG). Its stderr is then the terminal of a program that no longer
        runs, and the private Redis it used dies with that program: the stop's retries and
        failures would fill the user's shell with lines about a run that is over. So the worker
        stops with its stderr sent to /dev/null (it still does what it can in Redis)."""
        if not self.parent_pid or os.getppid() == self.parent_pid:
            return False
        with contextlib.suppress(OSError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 2)
            os.close(devnull)
        return True

    def stop(self) -> None:
        """Stop reading new calls; calls already read finish (up to ``grace`` seconds)."""
        if not self.stopping.is_set():
            log.info("worker %s stopping", self.name)
            self.stopping.set()
            if self.mailboxes.stop():
                self.inbox.wake()  # end the blocking read now rather than at its timeout

    def shutdown(self) -> None:
        """After :meth:`stop`: wait out the grace, write what finished, move the agents away
        (a drain) or deregister them, and close the connection."""
        self.mailboxes.wait_idle(self.settings.grace)
        self.committer.close()
        self._stop_beating()
        fenced = self.heartbeat.fenced
        stranded = 0
        if self.drain and not fenced:
            res = recovery.recover(self.bus, self.name, self.name, exclude={self.name})
            log.info("drained %s: %s", self.name, res)
            stranded = res.stranded if res is not None else 0
        if stranded:
            # No live worker could take them: deleting them would lose their memory. They stay
            # registered to this server, now recorded dead with `stranded` agents, so the next
            # worker that loads their modules recovers them (its sweep), calls waiting included.
            log.warning("drain of %s: %d agents had no live worker to go to; they stay "
                        "registered and move to the next worker that can host them",
                        self.name, stranded)
        elif not fenced:
            self.heartbeat.deregister()
        self.logs.stop()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.inbox.close()
        self.bus.close()

    def _stop_beating(self) -> None:
        """End the heartbeat thread and wait for it, so no beat re-registers this worker after
        :meth:`shutdown` deregistered it or handed its agents on."""
        self.closing.set()
        beat = self._beat_thread
        if beat is not None and beat is not threading.current_thread():
            beat.join(timeout=self.settings.heartbeat + 30)

    def _beat(self) -> None:
        # A refusal that lasts is logged once, not each beat. The beat keeps its own cadence
        # (it is the liveness signal), so the back-off the helper returns is not used here.
        lasting = Lasting(log, "heartbeat: Redis accepts writes again")
        beats = 0
        while not self.closing.wait(self.settings.heartbeat):
            beats += 1
            try:
                if not self.heartbeat.beat():
                    self.stop()
                if not self.stopping.is_set():  # a worker on its way out takes on nobody's
                    self.heartbeat.sweep()
                    if beats % SWEEP_PROGRAMS_EVERY == 0 and self.heartbeat.judging():
                        owners.sweep(self.bus, self.name)
                lasting.worked()
            except (redis.exceptions.RedisError, OSError) as e:
                lasting.failed(f"heartbeat refused: {self.bus.translate(e)} (other workers "
                               "will not be declared dead until this clears)")

    def state(self) -> dict[str, Any]:
        """The scheduler's state, for diagnosing a stuck worker (``ServerClient.state()``)."""
        return {
            **self.mailboxes.snapshot(),
            "done_queued": self.committer.queued(), "agents": len(self.hosting.agents),
            "threads_alive": sum(t.is_alive() for t in self.threads),
            "stopping": self.stopping.is_set(), "fenced": self.heartbeat.fenced,
        }

    # --- leader / followers ------------------------------------------------------------------

    def _written(self, batch: list[Done]) -> None:
        self.stats.written(batch)
        self.mailboxes.written(batch)
        if tracing.on():
            tracing.committed([d.trace for d in batch if d.trace is not None])

    @contextlib.contextmanager
    def _lend(self) -> Iterator[None]:
        """Around a blocking wait for replies (:attr:`busagent.bus.Bus.blocking`): on a
        runner thread, another runner takes its place until it is back (Mailboxes.block), so
        forty or four hundred agents waiting on helpers hosted here never hold every thread.
        Costs a thread start only when the replies are not there yet (checked first)."""
        if not getattr(_runner_thread, "on", False):
            yield
            return
        mb = self.mailboxes
        if mb.block():
            try:
                threading.Thread(target=self._runner, name=f"{self.name}-lent",
                                 daemon=True).start()
            except RuntimeError:  # the OS refused a thread: wait on this one regardless
                log.warning("could not start a runner thread while one blocks")
                mb.lent()
        try:
            yield
        finally:
            mb.unblock()

    def _runner(self) -> None:
        _runner_thread.on = True
        while True:
            try:
                self._serve()
                return
            except Exception:  # a bug must cost one call at most, never a thread
                log.exception("a runner thread of %s failed; it goes on", self.name)

    def _serve(self) -> None:
        mb = self.mailboxes
        while True:
            turn = mb.claim()
            if isinstance(turn, str):
                self._drain(turn)
                continue
            if turn is Turn.EXIT:
                return
            try:
                jobs, rejected = self.inbox.read()
            except BaseException:
                mb.read_failed()
                raise
            cancels = [j for j in jobs if j.entry.kind == "cancel"]
            if cancels:  # handled now, not queued behind the calls they cancel
                jobs = [j for j in jobs if j.entry.kind != "cancel"]
            jobs, cycles = _cycles(jobs)
            mine, rejected = mb.deliver(jobs, [*rejected, *cycles])
            for bad in rejected:
                self.inbox.deadletter(bad)
                self.committer.add(Done(bad.entry_id, bad.call, self.replies.error(bad.error)))
            if cancels:
                self._cancel(cancels)
            if mine is not None:
                self._drain(mine)

    def _drain(self, agent_id: str) -> None:
        """Run the claimed agent's calls in order until its mailbox is empty (the actor loop).

        While more calls wait in the mailbox, finished ones are committed together (up to
        DRAIN_BATCH): a queue of calls to one agent costs one round trip per batch, not per
        call, and a lone call is committed at once."""
        mb, committer = self.mailboxes, self.committer
        unflushed = 0
        claimed = True
        try:
            while True:
                job = mb.take(agent_id)
                if job is None:
                    claimed = False  # take() handed it back
                    return
                more = mb.has_more(agent_id)
                try:
                    out = self._run(job)
                except Exception as err:
                    log.exception("running a call of agent %s failed", agent_id)
                    out = self.replies.failed(job, err)
                finally:
                    if job.held:
                        mb.release(job.held)
                if not isinstance(out, Done):
                    claimed = False
                    self._park(agent_id, out)
                    return  # the loop thread hands the agent back
                unflushed += 1
                flush = not more or unflushed >= DRAIN_BATCH
                committer.add(out, flush)
                if flush:
                    unflushed = 0
        finally:
            if claimed:  # left by an exception: an agent left claimed would never run again
                mb.hand_back(agent_id)
            if unflushed:
                committer.flush()

    def _run(self, job: Job) -> Outcome:
        kind = job.entry.kind
        if kind not in _HOSTING and kind != "control":
            self.stats.begin(job)
            return self.executor.run(job)
        try:
            self.executor.verify(job.entry)
            return self._control(job) if kind == "control" else _HOSTING[kind](self.hosting, job)
        except Exception as err:  # noqa: BLE001 - a worker survives whatever it runs
            return self.replies.failed(job, err)

    def _control(self, job: Job) -> Done:
        body = ControlBody.unpack(job.entry.body)
        value: Any
        if body.op == "delete":
            return self.hosting.delete(job)
        if body.op == "wake":
            return silent(job.entry_id)
        if body.op in ("stop", "drain"):
            value = True
            self.drain = body.op == "drain"
            self.stop()
        elif body.op == "ping":
            value = self.name
        elif body.op == "state":
            value = self.state()
        elif body.op == "list":
            value = self.hosting.listing()
        else:  # delete_all
            value = self.hosting.delete_all()
        return Done(job.entry_id, job.entry.call, self.replies.ok(value))

    def _cancel(self, jobs: list[Job]) -> None:
        """``cancel`` entries (:mod:`busagent.cancel`): running calls are flagged (an async one
        cancelled on the loop), queued ones answered Cancelled and removed, unknown ones
        remembered until they start. Read after the calls they name (same inbox, routed after
        them), so those are in a mailbox or running by now, or already answered."""
        mb, committer = self.mailboxes, self.committer
        for job in mb.admit(jobs):
            try:
                self.executor.verify(job.entry)
                calls = CancelBody.unpack(job.entry.body).calls
                self.cancels.cancel(calls, self.loop)
                for queued in mb.remove(job.entry.agent, calls):
                    self.cancels.forget(queued.entry.call)
                    committer.add(self.replies.failed(queued, Cancelled(
                        f"call {queued.entry.call} was cancelled before it started")), False)
            except Exception as err:  # noqa: BLE001 - a bad cancel entry costs only itself
                log.warning("cancel entry %r refused: %s", job.entry_id, err)
            committer.add(silent(job.entry_id), False)
        committer.flush()

    # --- the loop thread ---------------------------------------------------------------------

    def _park(self, agent_id: str, aw: Awaitable[Done | Job]) -> None:
        """Hand an awaitable to the loop thread; one wake-up of the loop per burst, not one per
        call (a fan-out parks thousands at once)."""
        if self.mailboxes.park(agent_id, aw):
            self.loop.call_soon_threadsafe(self._start_parked)

    def _start_parked(self) -> None:
        for agent_id, aw in self.mailboxes.take_parked():
            self.loop.create_task(self._parked(agent_id, aw))

    async def _parked(self, agent_id: str, aw: Awaitable[Done | Job]) -> None:
        job = None
        try:
            out = await aw
            if isinstance(out, Done):
                self.committer.add_soon(out)
            else:
                job = out  # inputs resolved: a runner thread runs it
        finally:
            self.mailboxes.unpark(agent_id, job)


#: marks the runner threads (a blocking wait elsewhere, the heartbeat's, lends nothing).
_runner_thread = threading.local()

#: the kinds hosting runs (building and rebuilding agents); calls go to the executor.
_HOSTING: dict[str, Callable[[Hosting, Job], Done]] = {
    "create": Hosting.create, "create_many": Hosting.create_many, "restore": Hosting.restore_entry,
}


def run(name: str | None, modules: list[str], settings: Settings, **kw: Any) -> None:
    """Run a worker named ``name`` (default ``host-pid``) until it is stopped."""
    name = name or f"{socket.gethostname()}-{os.getpid()}"
    Worker(name, modules, settings, **kw).run()


def _cycles(jobs: list[Job]) -> tuple[list[Job], list[Rejected]]:
    """Calls that close a cycle, answered CallCycle as they arrive: the agent they go to runs,
    here and now, the call their chain names for it (so it waits on them). Queued behind that
    call instead, they would wait out their deadline. Only calls whose body has a chain pay a
    second decode, and only those to an agent of their own chain are looked at further."""
    if not any(b"chain" in j.entry.body for j in jobs):
        return jobs, []
    keep: list[Job] = []
    refused: list[Rejected] = []
    for job in jobs:
        e = job.entry
        if e.kind not in ("call", "method", "observe") or b"chain" not in e.body:
            keep.append(job)
            continue
        try:
            chain = CallBody.unpack(e.body, []).chain
            names = {c[0]: c[1] for c in chain}
            if e.agent in names:
                callchain.refuse(chain, [(e.agent, names[e.agent])], local_only=True)
        except CallCycle as err:
            refused.append(Rejected(job.entry_id, e.call, err))
            continue
        except Exception:  # noqa: BLE001 - a bad body is the executor's to answer, as always
            pass
        keep.append(job)
    return keep, refused
