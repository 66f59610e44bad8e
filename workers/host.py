"""The worker: one long-running process that hosts many agents and serves their calls.

* One inbox stream per server, read with a consumer group. Entries are dispatched to per-agent
  mailboxes in stream order; each mailbox is drained by at most one task, so calls to one agent
  run one at a time, in arrival order, while different agents run in parallel (async replies on
  the event loop, sync replies on a bounded thread pool).
* A call's reply, the agent's memory changes, the XACK and the XDEL are written in one MULTI
  transaction, batched across calls (group commit): the stream holds only calls in flight and
  Redis always has each agent's memory as of its last completed call.
* A heartbeat writes cpu, memory and counts to the servers hash and sweeps long-dead servers.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import signal
import socket
import time
import traceback
from collections import deque
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import psutil
import redis
import redis.asyncio as aredis

from busagent import bus as _bus
from busagent.agent import Agent, assigning_id, is_remote
from busagent.config import Settings
from busagent.errors import (
    BusagentError,
    CallTimeout,
    MessageTooLarge,
    NotSerializable,
    ProtocolError,
    UnknownAgent,
    UnknownClass,
)
from busagent.keys import GROUP
from busagent.memory import Memory
from busagent.wire import (
    VERSION,
    CallBody,
    ControlBody,
    CreateBody,
    Entry,
    ErrorInfo,
    Ref,
    ServerInfo,
    pack_reply,
    substitute,
    unpack,
)

from .load import load

log = logging.getLogger("busagent.worker")

READ_COUNT = 500
COMMIT_BATCH = 1000
#: stop reading new calls while this many are read and not yet answered.
MAX_INFLIGHT = 20000
#: remembered constructor failures, so calls that queued behind a failed create say why.
FAILED_CREATES = 10000


@dataclass(slots=True)
class Job:
    entry_id: bytes
    entry: Entry


@dataclass(slots=True)
class Done:
    entry_id: bytes
    call_id: str
    reply: bytes
    agent_id: str | None = None
    mem_cleared: bool = False
    mem_new: list[str] | None = None
    #: delete the agent's memory key (the agent was deleted).
    drop_memory: bool = False


class Worker:
    def __init__(self, name: str, modules: list[str], settings: Settings | None = None,
                 capacity: int = 100_000, threads: int = 32, parent_pid: int | None = None,
                 grace: float = 30.0) -> None:
        self.name = name
        self.settings = settings or Settings.load()
        self.specs = modules
        self.capacity = capacity
        self.threads = threads
        self.parent_pid = parent_pid
        self.grace = grace
        self.loaded: dict[str, Any] = {}
        self.agents: dict[str, Agent] = {}
        self.mailboxes: dict[str, deque[Job]] = {}
        self.failed: dict[str, str] = {}
        self.done: list[Done] = []
        self.inflight = 0
        self.started = time.time()
        self.stopping = asyncio.Event()
        self.stopped = asyncio.Event()
        self._commit_wake = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix=f"agent-{name}")

    # --- lifecycle ---------------------------------------------------------------------------

    async def run(self) -> None:
        for spec in self.specs:
            mod_name, mod = load(spec)
            self.loaded[mod_name] = mod
        self.bus = _bus.Bus(self.settings)
        _bus.install(self.bus)
        s = self.settings
        self.keys = self.bus.keys
        self.inbox = self.keys.inbox(self.name)
        url = self.bus.url
        self.r = _bus.aconnect(url, s)
        self.rread = _bus.aconnect(url, s, max_connections=2)
        # Agents awaiting placeholders hold a connection each while they block; a blocking pool
        # makes the excess wait instead of failing.
        self.rwait = aredis.Redis(
            connection_pool=aredis.BlockingConnectionPool.from_url(
                url, max_connections=128, timeout=None, **_bus.socket_options(url, s),
            )
        )
        self.bus.set_aredis(self.rwait)
        self.proc = psutil.Process()
        self.proc.cpu_percent(None)
        await self._ensure_group()
        await self._heartbeat_once()
        await self.r.rpush(self.keys.ready(self.name), "1")
        await self.r.expire(self.keys.ready(self.name), 60)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, self.stop)
            except (NotImplementedError, RuntimeError):
                pass  # not the main thread (tests run workers in threads too)
        log.info("worker %s serving %s on %s", self.name, list(self.loaded), self.bus.url_for_humans)
        committer = asyncio.create_task(self._committer())
        side = [asyncio.create_task(self._heartbeat()), asyncio.create_task(self._watch_parent())]
        try:
            await self._reader()
            await self._drain_inflight()
        finally:
            for t in side:
                t.cancel()
            self._commit_wake.set()
            self._closing = True
            await committer
            await self._deregister()
            self.pool.shutdown(wait=False, cancel_futures=True)
            await self.r.aclose()
            await self.rread.aclose()
            await self.rwait.aclose()
            self.bus.close()
            self.stopped.set()

    def stop(self) -> None:
        """Stop reading new calls; calls already read finish (up to ``grace`` seconds)."""
        if not self.stopping.is_set():
            log.info("worker %s stopping", self.name)
            self.stopping.set()

    async def _drain_inflight(self) -> None:
        deadline = time.monotonic() + self.grace
        while (self.mailboxes or self.done) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)  # draining: woken by time; the work itself is elsewhere

    async def _deregister(self) -> None:
        try:
            pipe = self.r.pipeline(transaction=True)
            pipe.hdel(self.keys.servers, self.name)
            ids = list(self.agents)
            for i in range(0, len(ids), 1000):
                pipe.hdel(self.keys.agents, *ids[i : i + 1000])
                pipe.delete(*[self.keys.memory(a) for a in ids[i : i + 1000]])
            await pipe.execute()
        except redis.exceptions.RedisError as e:
            log.warning("could not deregister %s: %s", self.name, e)

    async def _ensure_group(self) -> None:
        try:
            await self.r.xgroup_create(self.inbox, GROUP, id="0", mkstream=True)
        except redis.exceptions.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    async def _watch_parent(self) -> None:
        if not self.parent_pid:
            return
        while True:
            await asyncio.sleep(1.0)  # polling: there is no portable parent-death event
            if os.getppid() != self.parent_pid:
                log.info("parent %s is gone; stopping", self.parent_pid)
                self.stop()
                return

    # --- heartbeat ---------------------------------------------------------------------------

    def info(self) -> ServerInfo:
        mem = self.proc.memory_info().rss / 2**20
        return ServerInfo(
            name=self.name, host=socket.gethostname(), pid=os.getpid(), started=self.started,
            heartbeat=time.time(), cpu=self.proc.cpu_percent(None), mem=round(mem, 1),
            agents=len(self.agents), inflight=self.inflight, capacity=self.capacity,
            modules=list(self.loaded), status="stopping" if self.stopping.is_set() else "up",
            version=VERSION,
        )

    async def _heartbeat_once(self) -> None:
        await self.r.hset(self.keys.servers, self.name, self.info().model_dump_json())

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.settings.heartbeat)
            try:
                await self._heartbeat_once()
                await self._sweep()
            except redis.exceptions.RedisError as e:
                log.warning("heartbeat failed: %s", e)

    async def _sweep(self) -> None:
        now = time.time()
        for name, raw in (await self.r.hgetall(self.keys.servers)).items():
            try:
                hb = ServerInfo.model_validate_json(raw).heartbeat
            except ValueError:
                continue
            if now - hb > self.settings.sweep_after:
                log.info("sweeping dead server %s", name.decode())
                await self.r.hdel(self.keys.servers, name)

    # --- reading and dispatch ----------------------------------------------------------------

    async def _reader(self) -> None:
        block = int(self.settings.block_slice * 1000)
        start = "0"  # first our own pending entries (a restart under the same name), then new
        backoff = 0.05
        while not self.stopping.is_set():
            if self.inflight >= MAX_INFLIGHT:
                self._room.clear()
                await self._wait_any(self._room.wait(), self.stopping.wait())
                continue
            try:
                resp = await self._wait_any(
                    self.rread.xreadgroup(GROUP, self.name, {self.inbox: start},
                                          count=READ_COUNT, block=None if start == "0" else block),
                    self.stopping.wait(),
                )
                backoff = 0.05
            except redis.exceptions.ResponseError as e:
                if "NOGROUP" in str(e):
                    log.warning("consumer group lost (Redis restarted or flushed); recreating")
                    await self._ensure_group()
                    continue
                raise
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError) as e:
                log.warning("reading the inbox failed (%s); retrying in %.2fs", e, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            if resp is None:
                continue
            n = 0
            for _stream, entries in resp:
                for entry_id, fields in entries:
                    n += 1
                    if fields:  # a pending entry deleted meanwhile comes back empty
                        self._dispatch(entry_id, fields)
            if start == "0" and n == 0:
                start = ">"

    async def _wait_any(self, main: Awaitable[Any], other: Awaitable[Any]) -> Any:
        """``main``'s result, or None when ``other`` finishes first (main is then cancelled)."""
        t_main = asyncio.ensure_future(main)
        t_other = asyncio.ensure_future(other)
        done, _ = await asyncio.wait({t_main, t_other}, return_when=asyncio.FIRST_COMPLETED)
        t_other.cancel()
        if t_main in done:
            return t_main.result()
        t_main.cancel()
        return None

    def _dispatch(self, entry_id: bytes, fields: dict[bytes, bytes]) -> None:
        self.inflight += 1
        try:
            entry = Entry(
                v=int(fields.get(b"v", b"0")),
                call=fields[b"call"].decode(),
                agent=fields.get(b"agent", b"").decode(),
                caller=fields.get(b"caller", b"").decode(),
                kind=fields.get(b"kind", b"").decode(),  # type: ignore[arg-type]
                body=fields.get(b"body", b""),
            )
        except (KeyError, ValueError, UnicodeDecodeError) as e:
            call = fields.get(b"call")
            log.warning("malformed entry %s: %s", entry_id, e)
            err = ProtocolError(f"malformed call entry: {e}")
            self._finish(entry_id, call.decode(errors="replace") if call else None,
                         self._error_reply(err))
            return
        if entry.v != VERSION:
            err = ProtocolError(f"protocol version {entry.v} is not {VERSION}; upgrade busagent "
                                "on the caller or the worker so they match")
            self._finish(entry_id, entry.call, self._error_reply(err))
            return
        if entry.kind == "control" and not entry.agent:
            self._spawn(self._control(Job(entry_id, entry)))
            return
        box = self.mailboxes.get(entry.agent)
        if box is None:
            box = self.mailboxes[entry.agent] = deque()
            box.append(Job(entry_id, entry))
            self._spawn(self._drain(entry.agent, box))
        else:
            box.append(Job(entry_id, entry))

    def _spawn(self, coro: Awaitable[Any]) -> None:
        t = asyncio.ensure_future(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    async def _drain(self, agent_id: str, box: deque[Job]) -> None:
        """The agent's actor loop: one job at a time, in order."""
        try:
            while box:
                job = box.popleft()
                try:
                    done = await self._execute(job)
                except Exception as e:  # noqa: BLE001 - a worker survives whatever it runs
                    done = Done(job.entry_id, job.entry.call, self._error_reply(e))
                self._commit(done)
        finally:
            if self.mailboxes.get(agent_id) is box:
                del self.mailboxes[agent_id]

    # --- executing ---------------------------------------------------------------------------

    async def _execute(self, job: Job) -> Done:
        e = job.entry
        self.bus.check_size(e.body, "the call")
        if e.kind == "create":
            return await self._create(job)
        if e.kind == "control":
            return self._delete(job)
        agent = self.agents.get(e.agent)
        if agent is None:
            why = self.failed.get(e.agent)
            raise UnknownAgent(
                f"agent {e.agent} could not be built: {why}" if why else
                f"agent {e.agent} is not hosted by server {self.name} (deleted, or the server "
                "restarted); create it again"
            )
        refs: list[Ref] = []
        body = CallBody.model_validate(unpack(e.body, refs))
        if body.deadline is not None and time.time() > body.deadline:
            raise CallTimeout("the caller's deadline passed before the call started")
        args, kwargs = body.args, body.kwargs
        if refs:
            values = await self._resolve(refs, body.deadline)
            args, kwargs = substitute(args, values), substitute(kwargs, values)
        if e.kind == "call":
            fn: Callable[..., Any] = agent.reply
        elif e.kind == "observe":
            fn = agent.observe
        else:
            name = body.method or ""
            if not is_remote(type(agent), name):
                raise UnknownAgent(f"{type(agent).__name__}.{name} is not marked @busagent.remote")
            fn = getattr(agent, name)
        value = await self._run(fn, args, kwargs)
        cleared, new = agent.memory.take_changes()
        return Done(job.entry_id, e.call, self._ok_reply(value), e.agent, cleared, new)

    async def _run(self, fn: Callable[..., Any], args: list[Any], kwargs: dict[str, Any]) -> Any:
        if inspect.iscoroutinefunction(fn):
            return await fn(*args, **kwargs)
        loop = asyncio.get_running_loop()
        result = await loop.run_in_executor(self.pool, lambda: fn(*args, **kwargs))
        if inspect.isawaitable(result):
            result = await result
        return result

    async def _resolve(self, refs: list[Ref], deadline: float | None) -> dict[str, Any]:
        """Read forwarded placeholders' values from Redis (never through the caller)."""
        from busagent.bus import decode

        timeout = None if deadline is None else max(deadline - time.time(), 0.001)
        raw = await self.bus.afetch([r.call_id for r in refs], timeout)
        values: dict[str, Any] = {}
        for call_id, data in raw.items():
            try:
                values[call_id] = decode(data)
            except BusagentError as err:
                raise type(err)(f"an input placeholder ({call_id}) failed: {err}") from None
        return values

    async def _create(self, job: Job) -> Done:
        e = job.entry
        try:
            body = CreateBody.model_validate(unpack(e.body))
            if len(self.agents) >= self.capacity:
                raise BusagentError(f"server {self.name} is full ({self.capacity} agents)")
            cls = self._class(body.cls)
            token = assigning_id.set(e.agent)
            try:
                agent = await self._run(cls, body.args, body.kwargs)
            finally:
                assigning_id.reset(token)
            agent.agent_id = e.agent
            if body.memory:
                agent.memory = Memory(body.memory)
                agent.memory._saved = 0  # persist the carried-over memory with this reply
        except Exception as err:
            self.failed[e.agent] = f"{type(err).__name__}: {err}"
            if len(self.failed) > FAILED_CREATES:
                self.failed.pop(next(iter(self.failed)))
            await self.r.hdel(self.keys.agents, e.agent)
            raise
        self.agents[e.agent] = agent
        cleared, new = agent.memory.take_changes()
        value = {"agent_id": e.agent, "server": self.name}
        return Done(job.entry_id, e.call, self._ok_reply(value), e.agent, cleared, new)

    def _class(self, path: str) -> type[Agent]:
        module, _, qual = path.partition(":")
        mod = self.loaded.get(module)
        if mod is None:
            raise UnknownClass(
                f"server {self.name} did not load module {module!r} (it loaded "
                f"{sorted(self.loaded)}); start a worker with --agents {module}"
            )
        obj: Any = mod
        for part in qual.split("."):
            obj = getattr(obj, part, None)
        if not (isinstance(obj, type) and issubclass(obj, Agent)):
            raise UnknownClass(f"{path} is not an Agent subclass in module {module!r}")
        return obj

    def _delete(self, job: Job) -> Done:
        e = job.entry
        found = self.agents.pop(e.agent, None) is not None
        self.failed.pop(e.agent, None)
        # The registry record goes with the commit below.
        return Done(job.entry_id, e.call, self._ok_reply(found), e.agent, drop_memory=True)

    async def _control(self, job: Job) -> None:
        e = job.entry
        try:
            body = ControlBody.model_validate(unpack(e.body))
            value: Any
            if body.op == "stop":
                value = True
                self.stop()
            elif body.op == "ping":
                value = self.name
            elif body.op == "list":
                value = [
                    {"agent_id": a.agent_id, "name": a.name,
                     "cls": f"{type(a).__module__}:{type(a).__qualname__}",
                     "memory_size": a.memory.size()}
                    for a in self.agents.values()
                ]
            elif body.op == "delete_all":
                ids = list(self.agents)
                self.agents.clear()
                pipe = self.r.pipeline(transaction=True)
                for i in range(0, len(ids), 1000):
                    pipe.hdel(self.keys.agents, *ids[i : i + 1000])
                    pipe.delete(*[self.keys.memory(a) for a in ids[i : i + 1000]])
                if ids:
                    await pipe.execute()
                value = len(ids)
            else:  # "delete" without an agent id
                raise ProtocolError("delete needs an agent id")
            self._commit(Done(job.entry_id, e.call, self._ok_reply(value)))
        except Exception as err:  # noqa: BLE001
            self._commit(Done(job.entry_id, e.call, self._error_reply(err)))

    # --- replies and the group commit --------------------------------------------------------

    def _ok_reply(self, value: Any) -> bytes:
        try:
            data = pack_reply(True, value)
        except NotSerializable as e:
            return self._error_reply(NotSerializable(f"the reply cannot travel on the bus: {e}"))
        if len(data) > self.settings.max_message_bytes:
            return self._error_reply(MessageTooLarge(
                f"the reply is {len(data):,} bytes, over max_message_bytes="
                f"{self.settings.max_message_bytes:,}"))
        return data

    def _error_reply(self, err: BaseException) -> bytes:
        code = err.code if isinstance(err, BusagentError) else type(err).__name__
        tb = "" if isinstance(err, BusagentError) else "".join(
            traceback.format_exception(type(err), err, err.__traceback__))
        return pack_reply(False, error=ErrorInfo(type=code, message=str(err), traceback=tb,
                                                 server=self.name))

    def _finish(self, entry_id: bytes, call_id: str | None, reply: bytes) -> None:
        self._commit(Done(entry_id, call_id or "", reply if call_id else b""))

    def _commit(self, done: Done) -> None:
        self.done.append(done)
        self._commit_wake.set()

    async def _committer(self) -> None:
        self._closing = False
        backoff = 0.05
        while True:
            if not self.done:
                if self._closing:
                    return
                self._commit_wake.clear()
                await self._commit_wake.wait()
                continue
            batch = self.done[:COMMIT_BATCH]
            try:
                await self._write(batch)
                backoff = 0.05
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError) as e:
                # Nothing is acknowledged until written: retry until Redis is back.
                log.warning("writing replies failed (%s); retrying in %.2fs", e, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                if self._closing and backoff >= 2.0:
                    return
                continue
            del self.done[: len(batch)]
            self.inflight -= len(batch)
            if self.inflight < MAX_INFLIGHT:
                self._room.set()

    async def _write(self, batch: list[Done]) -> None:
        k = self.keys
        ttl = self.settings.reply_ttl
        pipe = self.r.pipeline(transaction=True)
        ids = []
        for d in batch:
            ids.append(d.entry_id)
            if d.call_id and d.reply:
                rk = k.reply(d.call_id)
                pipe.rpush(rk, d.reply)
                pipe.expire(rk, ttl)
            if d.agent_id is None:
                continue
            mk = k.memory(d.agent_id)
            if d.drop_memory:
                pipe.delete(mk)
                pipe.hdel(k.agents, d.agent_id)
                continue
            if d.mem_cleared:
                pipe.delete(mk)
            if d.mem_new:
                pipe.rpush(mk, *d.mem_new)
        pipe.xack(self.inbox, GROUP, *ids)
        pipe.xdel(self.inbox, *ids)
        await pipe.execute()


def run(name: str | None, modules: list[str], settings: Settings, **kw: Any) -> None:
    name = name or f"{socket.gethostname()}-{os.getpid()}"
    asyncio.run(Worker(name, modules, settings, **kw).run())
