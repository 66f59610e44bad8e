"""The worker's scheduling and execution, in-process with no Redis at all: the mailboxes (actor
ordering, parallelism, bulk-create holds, hand-backs, the inflight limit), the executor (every
kind of reply, refusals, forwarded placeholders) and the runner glue that ties them."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from typing import Any

import pytest

from busagent.agent import Agent, remote
from busagent.errors import (
    CallTimeout,
    MessageTooLarge,
    ProtocolError,
    RemoteError,
    UnknownAgent,
)
from busagent.protocol import VERSION, Entry, Ref, Reply, pack, signature
from busagent.replies import decode
from busagent.stream import Event
from busagent.worker.executor import Executor
from busagent.worker.inbox import parse
from busagent.worker.jobs import Done, Job, Rejected, Replies
from busagent.worker.mailboxes import Mailboxes, Turn
from busagent.worker.process import Worker

from .conftest import wait_for

_ids = iter(range(1, 10**9))


def job(agent: str, kind: str = "call", body: bytes | None = None, *, call: str | None = None,
        v: int = VERSION, sig: str = "", held: list[str] | None = None) -> Job:
    n = next(_ids)
    entry = Entry(v=v, call=call or f"c{n}", agent=agent, caller="test", kind=kind,
                  body=pack({"args": []}) if body is None else body, sig=sig)
    # ids as Redis makes them: its time in ms (relative deadlines count from it), a sequence
    return Job(f"{int(time.time() * 1000)}-{n}".encode(), entry, held=held)


def drain(mb: Mailboxes, agent: str) -> list[Job]:
    out = []
    while (j := mb.take(agent)) is not None:
        out.append(j)
    return out


# --- mailboxes ---------------------------------------------------------------------------------


def test_one_agents_calls_come_out_in_order_and_the_reader_runs_the_first_agent() -> None:
    mb = Mailboxes()
    assert mb.claim() is Turn.READ
    jobs = [job("a") for _ in range(5)]
    mine, rejected = mb.deliver(jobs)
    assert mine == "a" and rejected == []
    assert not mb.reading
    assert drain(mb, "a") == jobs
    # Emptied: handed back, nothing left behind.
    assert mb.busy == set() and mb.boxes == {} and not mb.ready


def test_different_agents_are_ready_in_parallel_but_each_is_claimed_once() -> None:
    mb = Mailboxes()
    assert mb.claim() is Turn.READ
    a1, b1, a2 = job("a"), job("b"), job("a")
    mine, _ = mb.deliver([a1, b1, a2])
    assert mine == "a"
    # Another thread gets b while a is still claimed: both run at once.
    assert mb.claim() == "b"
    assert mb.busy == {"a", "b"}
    assert mb.take("a") is a1
    assert mb.take("b") is b1
    # A new call to a claimed agent waits for its claimer: a is not handed to anyone else.
    assert mb.claim() is Turn.READ
    a3 = job("a")
    mine, _ = mb.deliver([a3])
    assert mine is None and not mb.ready
    assert drain(mb, "a") == [a2, a3]
    assert drain(mb, "b") == []
    assert mb.busy == set()


def test_a_reread_entry_is_not_delivered_twice_until_written() -> None:
    mb = Mailboxes()
    j = job("a")
    assert mb.deliver([j])[0] == "a"
    again = Job(j.entry_id, j.entry)
    assert mb.deliver([again]) == (None, [])
    assert mb.inflight == 1 and mb.held_ids() == {j.entry_id}
    assert mb.take("a") is j
    mb.written([Done(j.entry_id, j.entry.call, b"")])
    assert mb.inflight == 0 and mb.held_ids() == set()
    # A malformed entry is counted the same way: the reader answers it once.
    bad = Rejected(b"9-0", "c9", ProtocolError("x"))
    assert mb.deliver([], [bad]) == (None, [bad])
    assert mb.deliver([], [bad]) == (None, [])
    assert mb.inflight == 1


def test_calls_of_agents_a_bulk_create_holds_wait_for_it() -> None:
    mb = Mailboxes()
    mb.claim()
    bulk = job("", "create_many", pack({"agents": ["x", "y"]}), held=["x", "y", "z"])
    # z is claimed elsewhere already: the bulk create cannot hold it (and need not).
    mb.busy.add("z")
    x1 = job("x")
    mine, _ = mb.deliver([bulk, x1])
    assert mine == ""
    assert bulk.held == ["x", "y"]
    # x has a call, but it is held: nobody may claim it; the free thread leads instead.
    assert "x" not in mb.ready
    assert mb.claim() is Turn.READ
    mb.deliver([])
    assert mb.take("") is bulk
    mb.release(bulk.held)
    assert mb.claim() == "x"
    assert mb.take("x") is x1
    # y had no calls: released, not claimed.
    assert "y" not in mb.busy and "y" not in mb.boxes


def test_hand_back_makes_an_agent_ready_again_iff_it_has_work() -> None:
    mb = Mailboxes()
    mb.deliver([job("a")])
    first = mb.take("a")
    assert first is not None
    # It failed, say, and its claimer gives it up with nothing else queued: free.
    mb.hand_back("a")
    assert "a" not in mb.busy and "a" not in mb.boxes and not mb.ready
    # Again, with a call queued behind it: ready for the next thread.
    mb.deliver([job("a")])
    assert mb.take("a") is not None
    later = job("a")
    mb.deliver([later])
    mb.hand_back("a")
    assert list(mb.ready) == ["a"] and "a" in mb.busy
    assert mb.claim() == "a"
    assert mb.take("a") is later


def test_a_parked_agent_stays_claimed_and_comes_back_on_unpark() -> None:
    mb = Mailboxes()
    mb.deliver([job("a"), job("b")])
    ja = mb.take("a")
    jb = mb.take(mb.claim())  # type: ignore[arg-type]
    assert ja is not None and jb is not None

    async def wait() -> None:
        return None

    aw1, aw2 = wait(), wait()
    assert mb.park("a", aw1) is True  # first of a burst wakes the loop
    assert mb.park("b", aw2) is False
    assert mb.take_parked() == [("a", aw1), ("b", aw2)] and mb.take_parked() == []
    assert mb.parked == 2
    # A call arriving meanwhile waits: the agent is still claimed.
    a2 = job("a")
    assert mb.deliver([a2])[0] is None
    # a's inputs are resolved: back at the front of its mailbox, ahead of a2.
    mb.unpark("a", ja)
    assert list(mb.ready) == ["a"]
    assert mb.claim() == "a"
    assert drain(mb, "a") == [ja, a2]
    # b ended with nothing queued: free.
    mb.unpark("b")
    assert mb.parked == 0 and mb.busy == set() and mb.boxes == {}
    for aw in (aw1, aw2):
        aw.close()


def test_reading_pauses_at_the_inflight_limit_and_resumes_when_written() -> None:
    mb = Mailboxes(max_inflight=2)
    assert mb.claim() is Turn.READ
    j1, j2 = job("a"), job("b")
    mb.deliver([j1, j2])
    # Ready agents are still handed out at the limit...
    assert mb.claim() == "b"
    assert drain(mb, "a") == [j1] and drain(mb, "b") == [j2]
    # ...but nobody leads another read until something is written.
    got: list[str | Turn] = []
    t = threading.Thread(target=lambda: got.append(mb.claim()), daemon=True)
    t.start()
    t.join(0.3)
    assert t.is_alive() and got == []
    mb.written([Done(j1.entry_id, j1.entry.call, b"")])
    t.join(5)
    assert got == [Turn.READ]
    assert mb.inflight == 1


def test_threads_never_run_one_agent_twice_at_once_and_keep_its_order() -> None:
    mb = Mailboxes()
    batches = [[job(f"a{(i * 7 + k) % 5}") for k in range(8)] for i in range(40)]
    expected: dict[str, list[Job]] = {}
    for b in batches:
        for j in b:
            expected.setdefault(j.entry.agent, []).append(j)
    ran: dict[str, list[Job]] = {}
    running: set[str] = set()
    overlaps: list[str] = []
    lock = threading.Lock()
    to_read = iter(batches)

    def run_agent(agent: str) -> None:
        while (j := mb.take(agent)) is not None:
            with lock:
                if agent in running:
                    overlaps.append(agent)
                running.add(agent)
            with lock:
                running.discard(agent)
                ran.setdefault(agent, []).append(j)
            mb.written([Done(j.entry_id, "", b"")])

    def runner() -> None:
        while True:
            turn = mb.claim()
            if isinstance(turn, str):
                run_agent(turn)
            elif turn is Turn.EXIT:
                return
            else:
                batch = next(to_read, None)
                if batch is None:
                    mb.stop()
                mine, _ = mb.deliver(batch or [])
                if mine is not None:
                    run_agent(mine)

    threads = [threading.Thread(target=runner, daemon=True) for _ in range(6)]
    for t in threads:
        t.start()
    total = sum(len(b) for b in batches)
    wait_for(lambda: sum(len(v) for v in ran.values()) == total, what="every job to run")
    mb.wait_idle(5)
    for t in threads:
        t.join(5)
        assert not t.is_alive()
    assert overlaps == []
    assert ran == expected
    assert mb.inflight == 0 and mb.busy == set()


# --- executor ----------------------------------------------------------------------------------


class Echo(Agent):
    def reply(self, x: Any = None) -> Any:
        self.memory.add(x)
        return x

    @remote
    def shout(self, s: str) -> str:
        return s.upper()

    def secret(self) -> str:
        return "never"


class Failing(Agent):
    def reply(self, x: Any = None) -> Any:
        raise ValueError(f"bad input {x}")


class Doubler(Agent):
    async def reply(self, x: Any = None) -> Any:
        await asyncio.sleep(0)
        return x * 2


class Teller(Agent):
    def reply(self, x: Any = None) -> Iterator[str]:
        yield "once "
        yield "upon"
        if x == "fail":
            raise RuntimeError("lost the thread")


class FakeIO:
    """The executor's view of Redis, in memory."""

    def __init__(self, replies: dict[str, bytes] | None = None, max_bytes: int = 10_000) -> None:
        self.replies = replies or {}
        self.later: dict[str, bytes] = {}
        self.max_bytes = max_bytes
        self.peeked: list[list[str]] = []
        self.streams: dict[str, list[Event]] = {}

    def check_size(self, body: bytes, what: str) -> None:
        if len(body) > self.max_bytes:
            raise MessageTooLarge(f"{what} is {len(body)} bytes")

    def peek(self, call_ids: list[str]) -> list[bytes | None]:
        self.peeked.append(call_ids)
        return [self.replies.get(c) for c in call_ids]

    async def fetch(self, call_ids: list[str], timeout: float | None) -> dict[str, bytes]:
        self.replies.update(self.later)
        missing = [c for c in call_ids if c not in self.replies]
        if missing:
            raise CallTimeout(f"{missing} not answered")
        return {c: self.replies[c] for c in call_ids}

    def stream(self, call: str, events: Iterable[Event]) -> None:
        out = self.streams.setdefault(call, [])
        for ev in events:
            out.append(ev)

    async def astream(self, call: str, events: AsyncIterator[Event]) -> None:
        out = self.streams.setdefault(call, [])
        async for ev in events:
            out.append(ev)

    def deliver(self, agent: Agent, hub: str) -> int:
        """A hub holding one message for every agent: it observes it."""
        agent.observe(f"{hub}: hello")
        return 1


def executor(*agents: Agent, io: FakeIO | None = None, secret: str | None = None
             ) -> tuple[Executor, FakeIO]:
    hosted = {a.agent_id: a for a in agents}

    def find(agent_id: str) -> Agent:
        if agent_id not in hosted:
            raise UnknownAgent(f"agent {agent_id} is not hosted")
        return hosted[agent_id]

    fio = io or FakeIO()
    return Executor(fio, Replies("w1", 10_000), find, secret), fio


def call(agent: Agent, *args: Any, kind: str = "call", **body: Any) -> Job:
    return job(agent.agent_id, kind, pack({"args": list(args), **body}))


def finished(out: Any) -> Done:
    assert isinstance(out, Done), f"expected a Done, got {out!r}"
    return out


def test_a_sync_reply_is_an_ok_done_with_the_memory_changes() -> None:
    a = Echo("e")
    ex, _ = executor(a)
    j = call(a, "hello")
    done = finished(ex.run(j))
    assert (done.entry_id, done.call_id, done.agent_id) == (j.entry_id, j.entry.call, a.agent_id)
    assert decode(done.reply) == "hello"
    assert done.mem_new == ['"hello"'] and not done.mem_cleared


def test_a_marked_method_runs_and_an_unmarked_one_is_refused() -> None:
    a = Echo("e")
    ex, _ = executor(a)
    assert decode(finished(ex.run(call(a, "hi", kind="method", method="shout"))).reply) == "HI"
    refused = finished(ex.run(call(a, kind="method", method="secret")))
    with pytest.raises(ProtocolError, match=r"Echo\.secret is not marked @busagent\.remote"):
        decode(refused.reply)
    assert refused.agent_id is None and refused.mem_new is None


def test_an_exception_is_an_error_done_with_the_users_traceback() -> None:
    a = Failing("f")
    ex, _ = executor(a)
    done = finished(ex.run(call(a, 7)))
    with pytest.raises(RemoteError) as ei:
        decode(done.reply)
    err = ei.value
    assert err.type == "ValueError" and err.message == "bad input 7" and err.server == "w1"
    assert "raise ValueError" in err.traceback and "test_worker_units.py" in err.traceback
    assert "busagent/worker" not in err.traceback


def test_an_async_reply_returns_an_awaitable_of_done() -> None:
    a = Doubler("d")
    ex, _ = executor(a)
    out = ex.run(call(a, 21))
    assert not isinstance(out, Done)
    done = asyncio.run(out)  # type: ignore[arg-type]
    assert isinstance(done, Done) and decode(done.reply) == 42


def test_a_generator_streams_through_the_writer_and_replies_the_joined_text() -> None:
    a = Teller("t")
    ex, io = executor(a)
    j = call(a, None)
    done = finished(ex.run(j))
    assert decode(done.reply) == "once upon"
    events = io.streams[j.entry.call]
    assert [(e.seq, e.type, e.data) for e in events] == [
        (0, "start", {"agent": a.agent_id, "name": "t"}),
        (1, "chunk", "once "), (2, "chunk", "upon"), (3, "end", None)]


def test_a_generator_that_fails_ends_its_stream_with_an_error_event() -> None:
    a = Teller("t")
    ex, io = executor(a)
    j = call(a, "fail")
    done = finished(ex.run(j))
    with pytest.raises(RemoteError, match="lost the thread"):
        decode(done.reply)
    assert [e.type for e in io.streams[j.entry.call]] == ["start", "chunk", "chunk", "error"]


def test_stream_true_on_a_plain_reply_writes_one_chunk() -> None:
    a = Echo("e")
    ex, io = executor(a)
    j = call(a, "whole", stream=True)
    assert decode(finished(ex.run(j)).reply) == "whole"
    assert [(e.type, e.data) for e in io.streams[j.entry.call]][1:] == [
        ("chunk", "whole"), ("end", None)]


def test_wrong_version_bad_signature_and_oversized_calls_are_refused() -> None:
    a = Echo("e")
    ex, _ = executor(a, secret="s3cret")
    body = pack({"args": ["x"]})

    def signed(v: int = VERSION, sig: str | None = None) -> Job:
        j = job(a.agent_id, "call", body, v=v)
        good = signature("s3cret", v, j.entry.call, a.agent_id, "call", body)
        return Job(j.entry_id, j.entry.model_copy(update={"sig": good if sig is None else sig}))

    assert decode(finished(ex.run(signed())).reply) == "x"
    with pytest.raises(ProtocolError, match="not signed"):
        decode(finished(ex.run(signed(sig="0" * 64))).reply)
    with pytest.raises(ProtocolError, match=f"protocol version {VERSION + 1}"):
        decode(finished(ex.run(signed(v=VERSION + 1))).reply)
    with pytest.raises(MessageTooLarge):
        decode(finished(ex.run(job(a.agent_id, "call", pack({"args": ["y" * 20_000]})))).reply)
    # Nothing ran for the refused calls.
    assert a.memory.get() == ["x"]


def test_a_passed_deadline_gives_call_timeout_without_running() -> None:
    a = Echo("e")
    ex, _ = executor(a)
    done = finished(ex.run(call(a, "late", timeout=-1)))
    with pytest.raises(CallTimeout, match="deadline passed"):
        decode(done.reply)
    assert a.memory.get() == []


def test_an_unknown_agent_is_an_error_done() -> None:
    ex, _ = executor()
    with pytest.raises(UnknownAgent):
        decode(finished(ex.run(job("ghost"))).reply)


def test_resolved_inputs_are_substituted_at_once() -> None:
    a = Echo("e")
    io = FakeIO({"p1": Reply.ok(41)})
    ex, _ = executor(a, io=io)
    done = finished(ex.run(call(a, [Ref("p1"), Ref("p1")])))
    assert decode(done.reply) == [41, 41]
    assert io.peeked == [["p1"]]  # each placeholder peeked once


def test_unresolved_inputs_give_an_awaitable_that_resolves_them() -> None:
    a = Echo("e")
    io = FakeIO()
    ex, _ = executor(a, io=io)
    j = call(a, Ref("p1"))
    out = ex.run(j)
    assert not isinstance(out, Done)
    assert io.peeked == [["p1"]] and a.memory.get() == []
    io.later["p1"] = Reply.ok("forwarded")
    back = asyncio.run(out)  # type: ignore[arg-type]
    # The job comes back with its inputs resolved, to run on a runner thread.
    assert back is j and j.resolved == (["forwarded"], {})
    assert decode(finished(ex.run(j)).reply) == "forwarded"
    assert len(io.peeked) == 1


def test_an_input_that_failed_fails_the_call() -> None:
    a = Echo("e")
    failed = Reply.fail(UnknownAgent("gone"))
    ex, _ = executor(a, io=FakeIO({"p1": failed}))
    with pytest.raises(UnknownAgent, match=r"an input placeholder \(p1\) failed"):
        decode(finished(ex.run(call(a, Ref("p1")))).reply)
    # Not there yet, then not in time: the awaitable ends in the error Done.
    ex, _ = executor(a)
    out = ex.run(call(a, Ref("p2"), timeout=60))
    done = asyncio.run(out)  # type: ignore[arg-type]
    with pytest.raises(CallTimeout):
        decode(finished(done).reply)


def test_a_hub_notice_is_delivered_and_a_turn_is_streamed() -> None:
    a = Echo("e")
    ex, io = executor(a)
    notice = job(a.agent_id, "deliver", pack({"hub": "room"}))
    assert decode(finished(ex.run(notice)).reply) == 1
    assert a.memory.get() == ["room: hello"]
    turn = job(a.agent_id, "deliver", pack({"hub": "room", "speak": True}))
    done = finished(ex.run(turn))
    # The turn replies from memory (reply() with no input) and always streams.
    assert decode(done.reply) is None
    assert [e.type for e in io.streams[turn.entry.call]] == ["start", "chunk", "end"]
    assert a.memory.get() == ["room: hello", "room: hello"]  # (adding None adds nothing)


# --- parsing and the runner glue ---------------------------------------------------------------


def test_parse_turns_fields_into_jobs_and_rejects_malformed_entries() -> None:
    v = str(VERSION).encode()
    j = parse(b"1-0", {b"v": v, b"call": b"c", b"agent": b"a", b"kind": b"call",
                       b"body": b""})
    assert isinstance(j, Job) and j.entry.agent == "a" and j.held is None
    bulk = parse(b"2-0", {b"v": v, b"call": b"c", b"kind": b"create_many",
                          b"body": pack({"agents": ["x", "y"]})})
    assert isinstance(bulk, Job) and bulk.held == ["x", "y"]
    bad = parse(b"3-0", {b"call": b"c", b"kind": b"exec"})
    assert isinstance(bad, Rejected) and bad.call == "c" and bad.dead is None
    anon = parse(b"4-0", {b"junk": b"\x00"})
    assert isinstance(anon, Rejected) and anon.call == ""
    assert anon.dead == {b"junk": b"\x00"}  # kept as it came; the inbox adds the reason


class FakeCommitter:
    def __init__(self) -> None:
        self.added: list[tuple[Done, bool]] = []
        self.flushes = 0

    def add(self, done: Done, flush: bool = True) -> None:
        self.added.append((done, flush))

    def flush(self) -> None:
        self.flushes += 1


def test_drain_commits_a_run_of_calls_together_and_survives_an_error() -> None:
    w = Worker("w1", [])
    a, f = Echo("e"), Failing("f")
    w.executor, _ = executor(a, f)
    fake = FakeCommitter()
    w.committer = fake  # type: ignore[assignment]
    jobs = [call(a, 1), call(a, kind="method", method="secret"), call(a, 3)]
    mb = w.mailboxes
    mine, _ = mb.deliver(jobs)
    assert mine == a.agent_id
    w._drain(a.agent_id)
    assert [d.entry_id for d, _ in fake.added] == [j.entry_id for j in jobs]
    assert decode(fake.added[0][0].reply) == 1 and decode(fake.added[2][0].reply) == 3
    with pytest.raises(ProtocolError):
        decode(fake.added[1][0].reply)
    # Only the last of the run asks for a flush: one commit for the three.
    assert [flush for _, flush in fake.added] == [False, False, True]
    assert mb.busy == set() and mb.boxes == {}

    # A call whose agent raises, alone: an error reply committed at once, and the agent is
    # handed back all the same.
    g = call(f, "x")
    mb.deliver([g])
    w._drain(f.agent_id)
    done, flush = fake.added[-1]
    assert flush and done.entry_id == g.entry_id
    with pytest.raises(RemoteError, match="bad input x"):
        decode(done.reply)
    assert mb.busy == set()


def test_a_reread_of_pending_entries_skips_those_in_flight() -> None:
    fakeredis = pytest.importorskip("fakeredis")
    from types import SimpleNamespace

    from busagent.config import Settings
    from busagent.keys import Keys
    from busagent.worker.inbox import Inbox

    r = fakeredis.FakeRedis()
    bus = SimpleNamespace(redis=r, keys=Keys("t"), settings=Settings())
    held: set[bytes] = set()
    inbox = Inbox(bus, "w1", threading.Event(), lambda: set(held),  # type: ignore[arg-type]
                  reader=r)
    inbox.ensure_group()
    fields = {"v": "1", "agent": "a", "kind": "call", "body": pack({"args": []})}
    ids = [r.xadd(inbox.key, {**fields, "call": f"c{i}"}) for i in range(3)]
    assert inbox.read() == ([], [])  # nothing pending from a predecessor: now read new ones
    assert [j.entry_id for j in inbox.read()[0]] == ids
    # All three are pending. Two are in flight here; the third was delivered by a read whose
    # reply got lost (redis-py retried it): the periodic look at pending entries finds it.
    held.update(ids[:2])
    inbox._start = "0"
    jobs, rejected = inbox.read()
    assert [j.entry_id for j in jobs] == ids[2:] and rejected == []
    # The stream vanished under us (Redis lost its data): the group is made again.
    r.delete(inbox.key)
    inbox._start = ">"
    assert inbox.read() == ([], [])
    assert [g["name"] for g in r.xinfo_groups(inbox.key)] == [b"workers"]
