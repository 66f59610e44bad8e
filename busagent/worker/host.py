"""The worker: one long-running process that hosts many agents and serves their calls.

Threads work as leader and followers: one idle thread (the leader) blocks in XREADGROUP on the
server's inbox; when entries arrive it puts them into per-agent mailboxes in stream order, wakes
a follower to lead next, and runs the first ready agent itself. So a lone call is read, run and
answered by one thread with no hand-off, and a burst is spread over the pool.

* Actor semantics: an agent is claimed by one thread at a time (``busy``), which drains its
  mailbox in order; calls to different agents run in parallel.
* ``async def`` replies, and calls whose forwarded placeholders are not resolved yet, move to an
  asyncio loop thread, so waiting never holds a pool thread. The agent stays claimed meanwhile.
* A reply, the agent's memory changes, the XACK and the XDEL are one MULTI transaction, batched
  across threads (group commit): the inbox holds only calls in flight, and Redis always has
  each agent's memory as of its last completed call.
* A heartbeat thread writes cpu, memory and counts to the servers hash and sweeps dead servers.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import inspect
import logging
import os
import signal
import socket
import threading
import time
import traceback
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import psutil
import redis

from busagent import bus as _bus
from busagent import models, replies, scripts, stream
from busagent.agent import Agent, assigning_id, is_remote
from busagent.classpath import lookup
from busagent.config import Settings
from busagent.errors import (
    BusagentError,
    CallTimeout,
    ConstructorError,
    MessageTooLarge,
    NotSerializable,
    ProtocolError,
    UnknownAgent,
    UnknownClass,
)
from busagent.keys import GROUP
from busagent.memory import Memory, from_json
from busagent.protocol import (
    VERSION,
    CallBody,
    ControlBody,
    CreateBatch,
    CreateBody,
    Entry,
    Ref,
    Reply,
    check_size,
    deadletter,
    signature,
    substitute,
)
from busagent.records import AgentInfo, ServerInfo
from busagent.tuning import (
    COMMIT_BATCH,
    DRAIN_BATCH,
    FAILED_CREATES,
    HISTORY_EVERY,
    MAX_INFLIGHT,
    READ_COUNT,
    RECOVERY_LOCK_MS,
)

from . import recovery
from .load import load

log = logging.getLogger("busagent.worker")

#: the mailbox of server-level control calls (stop, list, ping, delete_all).
CONTROL = ""
_REDIS_DOWN = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError)


@dataclass(slots=True)
class Job:
    entry_id: bytes
    entry: Entry
    #: (args, kwargs) once forwarded placeholders are resolved.
    resolved: tuple[list[Any], dict[str, Any]] | None = None
    #: a bulk create: the agents whose calls wait for it (see Worker._hold)
    held: list[str] | None = None


@dataclass(slots=True)
class Done:
    entry_id: bytes
    call_id: str
    reply: bytes
    agent_id: str | None = None
    mem_cleared: bool = False
    mem_new: list[str] | None = None
    #: the agent was deleted: drop its memory and registry record.
    drop: bool = False
    #: fields to keep in the dead-letter stream (a malformed entry nobody can be told about).
    dead: dict[bytes, bytes] | None = None


class Worker:
    def __init__(self, name: str, modules: list[str], settings: Settings | None = None,
                 parent_pid: int | None = None) -> None:
        self.name = name
        self.settings = settings or Settings.load()
        self.specs = modules
        self.capacity = self.settings.capacity
        self.nthreads = self.settings.threads
        self.parent_pid = parent_pid
        self.grace = self.settings.grace
        self.loaded: dict[str, Any] = {}
        self.agents: dict[str, Agent] = {}
        self.failed: dict[str, str] = {}
        self.started = time.time()
        # Scheduling state, guarded by `cond`.
        self.cond = threading.Condition()
        self.mailboxes: dict[str, deque[Job]] = {}
        self.busy: set[str] = set()
        self.ready: deque[str] = deque()
        self.reading = False
        self._start = "0"
        self._history_at = 0.0
        self._held_before: set[bytes] = set()
        #: entries dispatched here and not yet committed: a re-read of our own pending
        #: entries (after a reconnect) must not run them twice.
        self.held: set[bytes] = set()
        self.inflight = 0
        self.parked = 0  # agents waiting on the loop thread
        self.to_park: list[tuple[str, Any]] = []
        self.flush_scheduled = False
        # Group commit state.
        self.done: list[Done] = []
        self.done_lock = threading.Lock()
        self.commit_lock = threading.Lock()
        self.stopping = threading.Event()
        self.exiting = False
        #: others declared this worker dead and moved its agents: stop, touch nothing of theirs.
        self.fenced = False
        #: on stop, move the agents to other servers instead of deleting them.
        self.drain = False
        self._cpu_sampled = False
        self.threads: list[threading.Thread] = []

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Load modules, connect, register and start serving in background threads."""
        for spec in self.specs:
            mod_name, mod = load(spec)
            self.loaded[mod_name] = mod
        self.bus = _bus.Bus(self.settings)
        _bus.install(self.bus)
        models.serving_as = self.name  # this server's model config overrides come first
        self.keys = self.bus.keys
        self.inbox = self.keys.inbox(self.name)
        self.r = self.bus.redis
        self.proc = psutil.Process()
        self.proc.cpu_percent(None)
        self.loop = asyncio.new_event_loop()
        loop_ready = threading.Event()

        def run_loop() -> None:
            asyncio.set_event_loop(self.loop)
            self.loop.call_soon(loop_ready.set)
            self.loop.run_forever()

        self._spawn(run_loop, "loop")
        loop_ready.wait()
        asyncio.run_coroutine_threadsafe(self._setup_loop(), self.loop).result()
        self._ensure_group()
        self._adopt()
        for i in range(self.nthreads):
            self._spawn(self._runner, f"runner-{i}")
        self._spawn(self._heartbeat, "heartbeat")
        self.r.rpush(self.keys.ready(self.name), "1")
        self.r.expire(self.keys.ready(self.name), 60)
        log.info("worker %s serving %s on %s", self.name, list(self.loaded),
                 self.bus.url_for_humans)

    def _adopt(self) -> None:
        """Take the name: refuse if a live worker has it; after a crash under this name, rebuild
        the agents still registered to it (memory as of their last completed call) so that its
        pending calls, read first, find them."""
        raw = self.r.hget(self.keys.servers, self.name)
        if raw is not None:
            old = ServerInfo.model_validate_json(raw)
            # On this host a dead pid is proof enough; elsewhere, trust the heartbeat's age.
            gone = old.host == socket.gethostname() and not psutil.pid_exists(old.pid)
            if old.alive(self.settings.dead_after) and old.pid != os.getpid() and not gone:
                raise BusagentError(
                    f"a worker named {self.name!r} is already running (pid {old.pid} on "
                    f"{old.host}); pick another --name or stop it with `busagent stop {self.name}`"
                )
        deadline = time.monotonic() + RECOVERY_LOCK_MS / 1000
        while not recovery.lock(self.bus, self.name, self.name):
            if time.monotonic() > deadline:
                raise BusagentError(f"recovery of the previous {self.name!r} did not finish")
            time.sleep(0.2)  # another worker is moving our predecessor's agents: let it finish
        try:
            for info in recovery.agents_of(self.bus, self.name):
                try:
                    self.agents[info.id] = self._restore(info.id)
                except Exception as e:  # noqa: BLE001 - one bad agent must not stop the rest
                    self.failed[info.id] = f"{type(e).__name__}: {e}"
                    log.warning("could not rebuild agent %s: %s", info.id, e)
            if self.agents:
                log.warning("rebuilt %d agents of the previous %s", len(self.agents), self.name)
            self.r.hset(self.keys.servers, self.name, self.info().model_dump_json())
        finally:
            recovery.unlock(self.bus, self.name, self.name)

    def _restore(self, agent_id: str) -> Agent:
        """Rebuild an agent from its spec, with its memory as stored in Redis."""
        spec = self.r.hget(self.keys.specs, agent_id)
        if spec is None:
            raise UnknownAgent(f"agent {agent_id} has no stored spec to rebuild it from")
        body = CreateBody.unpack(spec)  # type: ignore[arg-type]
        agent = self._build(agent_id, body)
        items: Any = self.r.lrange(self.keys.memory(agent_id), 0, -1)
        agent.memory = Memory(from_json(x) for x in items)  # already saved: nothing to rewrite
        return agent

    def _build(self, agent_id: str, body: CreateBody) -> Agent:
        cls = self._class(body.cls)
        token = assigning_id.set(agent_id)
        try:
            agent = cls(*body.args, **body.kwargs)
        finally:
            assigning_id.reset(token)
        agent.agent_id = agent_id
        return agent

    async def _setup_loop(self) -> None:
        s = self.settings
        self.bus.set_aredis(_bus.aconnect(self.bus.url, s, max_connections=256))

    def _spawn(self, target: Callable[[], None], name: str) -> None:
        t = threading.Thread(target=target, name=f"{self.name}-{name}", daemon=True)
        t.start()
        self.threads.append(t)

    def run(self) -> None:
        """Serve until SIGTERM/SIGINT, ``stop()``, a control ``stop`` or the parent's death."""
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: self.stop())
        self.start()
        while not self.stopping.wait(1.0):
            if self.parent_pid and os.getppid() != self.parent_pid:
                log.info("parent %s is gone; stopping", self.parent_pid)
                self.stop()
        self.shutdown()

    def stop(self) -> None:
        """Stop reading new calls; calls already read finish (up to ``grace`` seconds)."""
        if not self.stopping.is_set():
            log.info("worker %s stopping", self.name)
            self.stopping.set()
            with self.cond:
                self.cond.notify_all()
                reading = self.reading
            if reading:
                self._wake_reader()

    def _wake_reader(self) -> None:
        """End the leader's blocking read now rather than at its timeout: an entry that the
        worker acknowledges without replying."""
        fields = self.bus.sender.entry("control", ControlBody(op="wake").pack()).fields()
        # If this fails the read times out on its own within a second.
        with contextlib.suppress(redis.exceptions.RedisError):
            self.r.xadd(self.inbox, fields)  # type: ignore[arg-type]

    def shutdown(self) -> None:
        deadline = time.monotonic() + self.grace
        with self.cond:
            while (self.mailboxes or self.reading or self.parked) and time.monotonic() < deadline:
                self.cond.wait(0.1)
            self.exiting = True
            self.cond.notify_all()
        self._flush()
        if self.drain and not self.fenced:
            res = recovery.recover(self.bus, self.name, self.name, exclude={self.name})
            log.info("drained %s: %s", self.name, res)
        if not self.fenced:
            self._deregister()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.bus.close()

    def _deregister(self) -> None:
        """Remove this server, and the agents still registered to it (drained ones were moved
        and are no longer ours)."""
        try:
            # Calls nobody read before the stop: their agents go with this server, say so.
            recovery.answer(self.bus, self.inbox, recovery.entries(self.bus, self.inbox),
                            UnknownAgent(f"server {self.name} stopped before running the call "
                                         "(stop with --drain to move agents instead)"), self.name)
            pipe = self.r.pipeline(transaction=True)
            pipe.hdel(self.keys.servers, self.name)
            self._forget(pipe, [a.id for a in recovery.agents_of(self.bus, self.name)])
            pipe.execute()
        except redis.exceptions.RedisError as e:
            log.warning("could not deregister %s: %s", self.name, e)

    def _forget(self, pipe: Any, ids: list[str]) -> None:
        """Queue on ``pipe`` the removal of agents' records, specs and memory."""
        for i in range(0, len(ids), 1000):
            chunk = ids[i : i + 1000]
            pipe.hdel(self.keys.agents, *chunk)
            pipe.hdel(self.keys.specs, *chunk)
            pipe.delete(*[self.keys.memory(a) for a in chunk])

    def _ensure_group(self) -> None:
        try:
            self.r.xgroup_create(self.inbox, GROUP, id="0", mkstream=True)
        except redis.exceptions.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    # --- heartbeat ---------------------------------------------------------------------------

    def info(self) -> ServerInfo:
        # psutil's first sample covers start-up (imports, connecting): a spike that would
        # steer placement away from a worker that is in fact idle. Report it from the second.
        cpu = self.proc.cpu_percent(None)
        if not self._cpu_sampled:
            self._cpu_sampled, cpu = True, 0.0
        return ServerInfo(
            name=self.name, host=socket.gethostname(), pid=os.getpid(), started=self.started,
            heartbeat=time.time(), cpu=cpu,
            mem=round(self.proc.memory_info().rss / 2**20, 1), agents=len(self.agents),
            inflight=self.inflight, capacity=self.capacity, modules=list(self.loaded),
            status="stopping" if self.stopping.is_set() else "up", version=VERSION,
        )

    def state(self) -> dict[str, Any]:
        """The scheduler's state, for diagnosing a stuck worker (``ServerClient.state()``)."""
        with self.cond:
            return {
                "reading": self.reading, "inflight": self.inflight, "parked": self.parked,
                "ready": list(self.ready)[:50], "busy": sorted(self.busy)[:50],
                "mailboxes": {a: len(q) for a, q in list(self.mailboxes.items())[:50]},
                "done_queued": len(self.done), "agents": len(self.agents),
                "threads_alive": sum(t.is_alive() for t in self.threads),
                "stopping": self.stopping.is_set(), "fenced": self.fenced,
            }

    def _heartbeat_once(self) -> None:
        if self.fenced:
            return
        ok = scripts.heartbeat(self.bus.scripts, self.keys, self.name,
                               self.info().model_dump_json())
        if not ok:
            log.error("worker %s was declared dead and its agents moved elsewhere; stopping",
                      self.name)
            self.fenced = True
            self.stop()

    def _heartbeat(self) -> None:
        while not self.stopping.wait(self.settings.heartbeat):
            try:
                self._heartbeat_once()
                self._sweep()
            except redis.exceptions.RedisError as e:
                log.warning("heartbeat failed: %s", e)

    def _sweep(self) -> None:
        """Recover servers that stopped heart-beating; drop their records once empty and old."""
        now = time.time()
        servers: dict[bytes, bytes] = self.r.hgetall(self.keys.servers)  # type: ignore[assignment]
        for raw in servers.values():
            try:
                info = ServerInfo.model_validate_json(raw)
            except ValueError:
                continue
            if info.name == self.name or self.stopping.is_set():
                continue
            if recovery.needs_recovery(self.bus, info, now):
                recovery.recover(self.bus, info.name, self.name)
            elif (info.status == "dead" and info.agents == 0
                  and now - info.heartbeat > self.settings.sweep_after):
                log.info("sweeping dead server %s", info.name)
                self.r.hdel(self.keys.servers, info.name)

    # --- leader / followers ------------------------------------------------------------------

    def _runner(self) -> None:
        while True:
            try:
                self._serve()
                return
            except Exception:  # a bug must cost one call at most, never a thread
                log.exception("a runner thread of %s failed; it goes on", self.name)

    def _serve(self) -> None:
        while True:
            with self.cond:
                while True:
                    if self.ready:
                        agent: str | None = self.ready.popleft()
                        if self.ready or not self.reading:
                            # Wake one more: for the rest, or to lead the next read. One at a
                            # time: quick calls are then run by the few threads that are
                            # already awake, and blocking ones wake the pool a thread at a time.
                            self.cond.notify()
                        break
                    if self.exiting:
                        return
                    if (not self.reading and not self.stopping.is_set()
                            and self.inflight < MAX_INFLIGHT):
                        self.reading = True
                        agent = None
                        break
                    self.cond.wait(1.0)
            if agent is not None:
                self._drain(agent)
                continue
            try:
                entries = self._read()
            except BaseException:
                with self.cond:
                    self.reading = False
                raise
            rejected: list[Done] = []
            with self.cond:
                self.reading = False
                for entry_id, fields in entries:
                    bad = self._dispatch(entry_id, fields)
                    if bad is not None:
                        rejected.append(bad)
                mine = self.ready.popleft() if self.ready else None
                # A follower takes the rest (and wakes another while some are left) or leads
                # the next read.
                self.cond.notify()
            for done in rejected:
                if done.dead is not None:
                    self._deadletter(done.dead)
                self._commit(done)
            if mine is not None:
                self._drain(mine)

    def _read(self) -> list[tuple[bytes, dict[bytes, bytes]]]:
        """One leader's read. Only one thread reads at a time, so stream order is dispatch
        order."""
        block = int(min(self.settings.block_slice, 1.0) * 1000)
        if self._start == ">" and time.monotonic() - self._history_at > HISTORY_EVERY:
            # redis-py retries a command whose connection broke; if the broken XREADGROUP had
            # already delivered entries, they sit in our pending list unseen. Look there now
            # and then.
            self._start = "0"
        if self._start == "0":
            self._history_at = time.monotonic()
        start = self._start
        if start != ">":
            # What this process holds before the read: an entry it holds can be committed, and
            # leave `held`, between this read and its dispatch; it must not run again.
            with self.cond:
                self._held_before = set(self.held)
        try:
            # Not interrupted on stop (entries read by an abandoned XREADGROUP would sit pending
            # unseen): the short block bounds how long a stop waits instead.
            resp: Any = self.r.xreadgroup(GROUP, self.name, {self.inbox: start},
                                          count=READ_COUNT, block=None if start != ">" else block)
        except redis.exceptions.ResponseError as e:
            # NOGROUP (6.2) or UNBLOCKED (7.x, the stream was deleted under a blocked read):
            # Redis lost our data. Recreate the group and go on, without spinning.
            log.warning("reading the inbox failed (%s); recreating the consumer group", e)
            self.stopping.wait(0.1)
            try:
                self._ensure_group()
            except redis.exceptions.RedisError as e2:
                log.warning("could not recreate the consumer group: %s", e2)
            return []
        except _REDIS_DOWN as e:
            log.warning("reading the inbox failed (%s); retrying", e)
            self.stopping.wait(0.5)  # back off; a stop ends the wait early
            return []
        entries = [e for _, es in resp or [] for e in es]
        if start == ">":
            self._held_before = set()
        else:
            # Our own pending entries (a restart under the same name), page by page, then new.
            self._start = entries[-1][0].decode() if entries else ">"
        return [(i, f) for i, f in entries if f]  # pending entries deleted meanwhile come as {}

    def _dispatch(self, entry_id: bytes, fields: dict[bytes, bytes]) -> Done | None:
        """Put an entry in its agent's mailbox, or return the error reply for a malformed one.
        Called with ``cond`` held."""
        if entry_id in self.held or entry_id in self._held_before:
            return None  # already here (a re-read of our pending entries)
        self.held.add(entry_id)
        self.inflight += 1
        try:
            entry = Entry.from_fields(fields)
        except ProtocolError as e:
            call = Entry.reply_to(fields)
            log.warning("malformed entry %s: %s", entry_id, e)
            done = Done(entry_id, call, self._error_reply(e))
            if not call:  # nobody to answer: keep it where an operator can look
                done.dead = deadletter(fields, f"malformed, no call id: {e}", self.name)
            return done
        agent = entry.agent if entry.kind != "control" or entry.agent else CONTROL
        box = self.mailboxes.get(agent)
        if box is None:
            box = self.mailboxes[agent] = deque()
        job = Job(entry_id, entry)
        if entry.kind == "create_many":
            job.held = self._hold(entry)
        box.append(job)
        if agent not in self.busy:
            self.busy.add(agent)
            self.ready.append(agent)
        return None

    def _hold(self, entry: Entry) -> list[str]:
        """A bulk create runs in its own mailbox, not its agents': until it is done, their
        calls (read after it) wait, as they would behind a single agent's create. Marking the
        agents busy keeps their mailboxes from being handed out; ``_release`` hands them back.
        Called with ``cond`` held."""
        held: list[str] = []
        with contextlib.suppress(Exception):  # a malformed body fails in _create_batch
            for agent_id in CreateBatch.unpack(entry.body).agents:
                if agent_id not in self.busy:
                    self.busy.add(agent_id)
                    held.append(agent_id)
        return held

    def _release(self, ids: list[str]) -> None:
        """Hand back the mailboxes a bulk create held, however it ended."""
        with self.cond:
            for agent_id in ids:
                if self.mailboxes.get(agent_id):
                    self.ready.append(agent_id)
                    self.cond.notify()
                else:
                    self.busy.discard(agent_id)
                    self.mailboxes.pop(agent_id, None)

    def _deadletter(self, fields: dict[bytes, bytes]) -> None:
        try:
            self.r.xadd(self.keys.deadletter, fields,  # type: ignore[arg-type]
                        maxlen=self.settings.deadletter_max, approximate=True)
        except redis.exceptions.RedisError as e:
            log.warning("could not dead-letter an entry: %s", e)

    def _drain(self, agent_id: str) -> None:
        """Run the agent's calls in order until its mailbox is empty (the actor loop).

        While more calls wait in the mailbox, finished ones are committed together (up to
        DRAIN_BATCH): a queue of calls to one agent costs one round trip per batch, not per
        call, and a lone call is committed at once."""
        unflushed = 0
        try:
            while True:
                with self.cond:
                    box = self.mailboxes.get(agent_id)
                    if not box:
                        self.mailboxes.pop(agent_id, None)
                        self.busy.discard(agent_id)
                        return
                    job = box.popleft()
                    more = bool(box)
                try:
                    done = self._execute(job)
                except Exception as e:  # noqa: BLE001 - a worker survives whatever it runs
                    done = Done(job.entry_id, job.entry.call, self._error_reply(e))
                finally:
                    if job.held:
                        self._release(job.held)
                if done is None:
                    return  # parked on the loop thread, which hands the agent back
                unflushed += 1
                flush = not more or unflushed >= DRAIN_BATCH
                self._commit(done, flush)
                if flush:
                    unflushed = 0
        finally:
            if unflushed:
                self._flush()

    def _park(self, agent_id: str, coro: Any) -> None:
        """Hand a coroutine to the loop thread. Hand-offs are batched: one wake-up of the loop
        per burst, not one per call (a fan-out parks thousands at once)."""
        with self.cond:
            self.parked += 1
            self.to_park.append((agent_id, coro))
            wake = len(self.to_park) == 1
        if wake:
            self.loop.call_soon_threadsafe(self._start_parked)

    def _start_parked(self) -> None:
        with self.cond:
            batch, self.to_park = self.to_park, []
        for agent_id, coro in batch:
            self.loop.create_task(self._parked(agent_id, coro))

    def _commit_soon(self, done: Done) -> None:
        """Commit from the loop thread without blocking it: completions of one loop turn are
        written together, on a pool thread (ten thousand sleeps that end at once are a few
        commits, not ten thousand round trips on the loop)."""
        with self.done_lock:
            self.done.append(done)
        if not self.flush_scheduled:
            self.flush_scheduled = True
            self.loop.call_soon(self._flush_in_pool)

    def _flush_in_pool(self) -> None:
        self.flush_scheduled = False
        self.loop.run_in_executor(None, self._flush)

    async def _parked(self, agent_id: str, coro: Any) -> None:
        try:
            done = await coro
            if done is not None:
                self._commit_soon(done)
        finally:
            with self.cond:
                self.parked -= 1
                self.busy.discard(agent_id)
                if self.mailboxes.get(agent_id):
                    self.busy.add(agent_id)
                    self.ready.append(agent_id)
                    self.cond.notify()
                else:
                    self.mailboxes.pop(agent_id, None)

    # --- executing ---------------------------------------------------------------------------

    def _execute(self, job: Job) -> Done | None:
        e = job.entry
        if e.v != VERSION:
            raise ProtocolError(f"protocol version {e.v} is not {VERSION}; upgrade busagent on "
                                "the caller or the worker so they match")
        check_size(e.body, self.settings.max_message_bytes, "the call")
        secret = self.settings.secret
        if secret and not hmac.compare_digest(
                e.sig, signature(secret, e.v, e.call, e.agent, e.kind, e.body)):
            raise ProtocolError("the call is not signed with this bus's shared secret "
                                "(BUSAGENT_SECRET); refused")
        if e.kind == "create_many":
            return self._create_batch(job)
        if e.kind in ("create", "restore"):
            return self._create(job)
        if e.kind == "control":
            return self._control(job)
        agent = self.agents.get(e.agent)
        if agent is None:
            why = self.failed.get(e.agent)
            raise UnknownAgent(
                f"agent {e.agent} could not be built: {why}" if why else
                f"agent {e.agent} is not hosted by server {self.name} (deleted, or the server "
                "restarted); create it again"
            )
        refs: list[Ref] = []
        body = CallBody.unpack(e.body, refs)
        if body.deadline is not None and time.time() > body.deadline:
            raise CallTimeout("the caller's deadline passed before the call started")
        if e.kind == "call":
            fn: Callable[..., Any] = agent.reply
        elif e.kind == "observe":
            fn = agent.observe
        else:
            name = body.method or ""
            if not is_remote(type(agent), name):
                raise ProtocolError(f"{type(agent).__name__}.{name} is not marked @busagent.remote")
            fn = getattr(agent, name)
        if job.resolved is not None:
            args, kwargs = job.resolved
        else:
            args, kwargs = body.args, body.kwargs
            if refs:
                values = self._peek(refs)
                if values is None:
                    # Not all inputs are there: wait on the loop thread, not in this one.
                    self._park(e.agent, self._await_inputs(job, refs, body.deadline))
                    return None
                args, kwargs = substitute(args, values), substitute(kwargs, values)
        if inspect.iscoroutinefunction(fn):
            self._park(e.agent, self._run_async(job, agent, fn, args, kwargs, body.stream))
            return None
        value = fn(*args, **kwargs)
        if inspect.isawaitable(value) or inspect.isasyncgen(value):
            self._park(e.agent, self._finish_async(job, agent, value, body.stream))
            return None
        if inspect.isgenerator(value):
            value = self._stream_sync(e.call, agent, value)
        elif body.stream:
            self._stream_sync(e.call, agent, [value])
        return self._done(job, agent, value)

    def _done(self, job: Job, agent: Agent, value: Any) -> Done:
        cleared, new = agent.memory.take_changes()
        return Done(job.entry_id, job.entry.call, self._ok_reply(value), job.entry.agent,
                    cleared, new)

    async def _run_async(self, job: Job, agent: Agent, fn: Callable[..., Any], args: list[Any],
                         kwargs: dict[str, Any], stream: bool) -> Done:
        return await self._finish_async(job, agent, fn(*args, **kwargs), stream)

    async def _finish_async(self, job: Job, agent: Agent, aw: Any, stream: bool) -> Done:
        try:
            if inspect.isasyncgen(aw):
                value = await self._stream_async(job.entry.call, agent, aw)
            else:
                value = await aw
                if stream:
                    await self._stream_async(job.entry.call, agent, _once(value))
            return self._done(job, agent, value)
        except Exception as err:  # noqa: BLE001
            return Done(job.entry_id, job.entry.call, self._error_reply(err))

    # --- streamed replies (busagent.stream) ---------------------------------------------------

    def _stream_sync(self, call: str, agent: Agent, pieces: Iterable[Any]) -> Any:
        """Write a generator's pieces as events; returns the joined reply. A call run again
        after a crash starts its stream over (a new ``start``), so the key is reset first."""
        key, em = self.keys.chunks(call), stream.Emitter(call)
        pipe = self.r.pipeline(transaction=False)
        pipe.delete(key)
        pipe.xadd(key, stream.fields(em.start(agent.agent_id, agent.name)))
        pipe.expire(key, self.settings.reply_ttl)
        pipe.execute()
        try:
            for piece in pieces:
                self.r.xadd(key, stream.fields(em.chunk(piece)))
        except Exception as err:
            self.r.xadd(key, stream.fields(em.error(err)))
            raise
        self.r.xadd(key, stream.fields(em.end()))
        return em.joined()

    async def _stream_async(self, call: str, agent: Agent, pieces: AsyncIterator[Any]) -> Any:
        """:meth:`_stream_sync` for async generators, on the loop thread."""
        key, em = self.keys.chunks(call), stream.Emitter(call)
        ar = self.bus.async_client()
        async with ar.pipeline(transaction=False) as pipe:
            pipe.delete(key)
            pipe.xadd(key, stream.fields(em.start(agent.agent_id, agent.name)))
            pipe.expire(key, self.settings.reply_ttl)
            await pipe.execute()
        try:
            async for piece in pieces:
                await ar.xadd(key, stream.fields(em.chunk(piece)))
        except Exception as err:
            await ar.xadd(key, stream.fields(em.error(err)))
            raise
        await ar.xadd(key, stream.fields(em.end()))
        return em.joined()

    async def _await_inputs(self, job: Job, refs: list[Ref], deadline: float | None) -> None:
        try:
            timeout = None if deadline is None else max(deadline - time.time(), 0.001)
            raw = await replies.afetch(self.bus, [r.call_id for r in refs], timeout)
            values = self._decode_inputs(raw)
            body = CallBody.unpack(job.entry.body)
            job.resolved = (substitute(body.args, values), substitute(body.kwargs, values))
        except Exception as err:  # noqa: BLE001
            self._commit_soon(Done(job.entry_id, job.entry.call, self._error_reply(err)))
            return
        # Back to the front of the mailbox: a pool thread runs it when the agent is handed back.
        with self.cond:
            self.mailboxes.setdefault(job.entry.agent, deque()).appendleft(job)

    def _peek(self, refs: list[Ref]) -> dict[str, Any] | None:
        ids = list(dict.fromkeys(r.call_id for r in refs))
        raw = replies.peek(self.bus, ids)
        if len(raw) < len(ids):
            return None
        return self._decode_inputs(raw)

    @staticmethod
    def _decode_inputs(raw: dict[str, bytes]) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for call_id, data in raw.items():
            try:
                values[call_id] = replies.decode(data)
            except BusagentError as err:
                raise type(err)(f"an input placeholder ({call_id}) failed: {err}") from None
        return values

    def _create(self, job: Job) -> Done:
        e = job.entry
        try:
            if len(self.agents) >= self.capacity:
                raise BusagentError(f"server {self.name} is full ({self.capacity} agents)")
            if e.kind == "restore":
                # Moved here by recovery: rebuilt, not new. Nobody waits on this entry.
                if e.agent not in self.agents:  # (a retried move may queue it twice)
                    self.agents[e.agent] = self._restore(e.agent)
                return Done(job.entry_id, "", b"")
            if e.agent in self.agents:  # a create sent twice (a retried send): same agent
                return self._done(job, self.agents[e.agent],
                                  {"agent_id": e.agent, "server": self.name})
            body = CreateBody.unpack(e.body)
            agent = self._build(e.agent, body)
            if body.memory:
                agent.memory = Memory(body.memory)
                agent.memory._saved = 0  # persist the carried-over memory with this reply
        except Exception as err:  # noqa: BLE001 - the constructor's error goes to the caller
            self.failed[e.agent] = f"{type(err).__name__}: {err}"
            if len(self.failed) > FAILED_CREATES:
                self.failed.pop(next(iter(self.failed)))
            if e.kind == "restore":
                log.warning("could not rebuild agent %s: %s", e.agent, err)
                return Done(job.entry_id, "", b"")
            if not isinstance(err, BusagentError):  # the constructor itself raised
                reply = self._error_reply(ConstructorError(f"{type(err).__name__}: {err}"),
                                          _user_traceback(err))
            else:
                reply = self._error_reply(err)
            return Done(job.entry_id, e.call, reply, e.agent, drop=True)
        self.agents[e.agent] = agent
        return self._done(job, agent, {"agent_id": e.agent, "server": self.name})

    def _create_batch(self, job: Job) -> Done:
        """``busagent.create_many``: build a chunk of agents from one entry. An agent whose
        record no longer names this server (recovery moved the chunk's agents while the entry
        waited) is left to the server that has it, so none is built twice."""
        e = job.entry
        ids = CreateBatch.unpack(e.body).agents
        pipe = self.r.pipeline(transaction=False)
        pipe.hmget(self.keys.agents, ids)
        pipe.hmget(self.keys.specs, ids)
        records, specs = pipe.execute()
        failed: dict[str, str] = {}
        built = 0
        for agent_id, rec, spec in zip(ids, records, specs, strict=True):
            if agent_id in self.agents or rec is None or spec is None:
                continue
            if AgentInfo.model_validate_json(rec).server != self.name:
                continue
            try:
                if len(self.agents) >= self.capacity:
                    raise BusagentError(f"server {self.name} is full ({self.capacity} agents)")
                self.agents[agent_id] = self._build(agent_id, CreateBody.unpack(spec))
                built += 1
            except Exception as err:  # noqa: BLE001 - reported per agent to the caller
                failed[agent_id] = f"{type(err).__name__}: {err}"
                self.failed[agent_id] = failed[agent_id]
        if failed:
            pipe = self.r.pipeline(transaction=False)
            self._forget(pipe, list(failed))
            pipe.execute()
            while len(self.failed) > FAILED_CREATES:
                self.failed.pop(next(iter(self.failed)))
        return Done(job.entry_id, e.call, self._ok_reply(
            {"server": self.name, "created": built, "failed": failed}))

    def _class(self, path: str) -> type[Agent]:
        found, obj = lookup(path, self.loaded)
        module = path.partition(":")[0]
        if not found:
            raise UnknownClass(
                f"server {self.name} did not load module {module!r} (it loaded "
                f"{sorted(self.loaded)}); start a worker with --agents {module}"
            )
        if not (isinstance(obj, type) and issubclass(obj, Agent)):
            raise UnknownClass(f"{path} is not an Agent subclass in module {module!r}")
        return obj

    def _control(self, job: Job) -> Done:
        e = job.entry
        body = ControlBody.unpack(e.body)
        value: Any
        if body.op == "delete":
            if not e.agent:
                raise ProtocolError("delete needs an agent id")
            found = self.agents.pop(e.agent, None) is not None
            self.failed.pop(e.agent, None)
            return Done(job.entry_id, e.call, self._ok_reply(found), e.agent, drop=True)
        if body.op == "wake":
            return Done(job.entry_id, "", b"")
        if body.op in ("stop", "drain"):
            value = True
            self.drain = body.op == "drain"
            self.stop()
        elif body.op == "ping":
            value = self.name
        elif body.op == "state":
            value = self.state()
        elif body.op == "list":
            value = [
                {"agent_id": a.agent_id, "name": a.name,
                 "cls": f"{type(a).__module__}:{type(a).__qualname__}",
                 "memory_size": a.memory.size()}
                for a in list(self.agents.values())
            ]
        else:  # delete_all
            ids = list(self.agents)
            for a in ids:
                self.agents.pop(a, None)
            pipe = self.r.pipeline(transaction=True)
            self._forget(pipe, ids)
            pipe.execute()
            value = len(ids)
        return Done(job.entry_id, e.call, self._ok_reply(value))

    # --- replies and the group commit --------------------------------------------------------

    def _ok_reply(self, value: Any) -> bytes:
        try:
            data = Reply.ok(value)
        except NotSerializable as e:
            return self._error_reply(NotSerializable(f"the reply cannot travel on the bus: {e}"))
        if len(data) > self.settings.max_message_bytes:
            return self._error_reply(MessageTooLarge(
                f"the reply is {len(data):,} bytes, over max_message_bytes="
                f"{self.settings.max_message_bytes:,}"))
        return data

    def _error_reply(self, err: BaseException, tb: str | None = None) -> bytes:
        if tb is None:
            tb = "" if isinstance(err, BusagentError) else _user_traceback(err)
        return Reply.fail(err, server=self.name, traceback=tb)

    def _commit(self, done: Done, flush: bool = True) -> None:
        """Queue a finished call; write the queue now unless more of the agent's calls follow."""
        with self.done_lock:
            self.done.append(done)
        if flush:
            self._flush()

    def _flush(self) -> None:
        """Write queued completions. Whoever gets the lock writes everyone's (group commit);
        the others return at once."""
        while True:
            if not self.commit_lock.acquire(blocking=False):
                return
            try:
                while True:
                    with self.done_lock:
                        batch = self.done[:COMMIT_BATCH]
                        del self.done[:COMMIT_BATCH]
                    if not batch:
                        break
                    self._write_retrying(batch)
                    with self.cond:
                        full = self.inflight >= MAX_INFLIGHT
                        self.inflight -= len(batch)
                        self.held.difference_update(d.entry_id for d in batch)
                        if full:
                            self.cond.notify()  # reading was paused: someone may lead again
            finally:
                self.commit_lock.release()
            with self.done_lock:
                if not self.done:
                    return  # else: added after our last look; loop to write it too

    def _write_retrying(self, batch: list[Done]) -> None:
        backoff = 0.05
        while True:
            try:
                self._write(batch)
                return
            except (redis.exceptions.RedisError, OSError) as e:
                # Nothing is acknowledged until written: retry until Redis is back (or, for an
                # out-of-memory refusal, has room again).
                log.warning("writing replies failed (%s); retrying in %.2fs", e, backoff)
                if self.exiting and backoff >= 2.0:
                    log.error("giving up on %d replies at exit; they stay pending", len(batch))
                    return
                time.sleep(backoff)
                backoff = min(backoff * 2, 2.0)

    def _write(self, batch: list[Done]) -> None:
        fenced = scripts.commit(self.bus.scripts, self.keys, self.inbox,
                                self.settings.reply_ttl, batch)
        if fenced:
            log.warning("%d replies refused: their calls were moved to another worker", fenced)


async def _once(value: Any) -> AsyncIterator[Any]:
    yield value


def _user_traceback(err: BaseException) -> str:
    """The traceback from the first frame outside the worker: the caller wants the agent's
    frames, not ours."""
    tb = err.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename == __file__:
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(err), err, tb))


def run(name: str | None, modules: list[str], settings: Settings, **kw: Any) -> None:
    name = name or f"{socket.gethostname()}-{os.getpid()}"
    Worker(name, modules, settings, **kw).run()
