"""The scheduler's state: one mailbox per agent, and who may run what.

Actor semantics live here. An agent with work is *claimed* by one thread at a time (it is in
``busy`` from the moment it is ready until it is handed back), which runs its mailbox in order;
different agents run in parallel. The runner threads take turns leading: at most one reads the
inbox (``reading``) while the others run agents, and reading pauses while ``max_inflight`` calls
are read and not yet written.

Everything is guarded by one condition variable, held only for a few dict and deque operations
(never during a call or a Redis round trip). No Redis here: the worker's ordering rules can be
tested in-process.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Awaitable, Iterable, Sequence
from enum import Enum
from typing import Any

from busagent.tuning import MAX_INFLIGHT, MAX_LENT_THREADS

from .jobs import Done, Job, Rejected


class Turn(Enum):
    """What :meth:`Mailboxes.claim` tells a runner thread to do when no agent is handed to it."""

    READ = "read"  # lead: read the inbox, then :meth:`Mailboxes.deliver` what was read
    EXIT = "exit"  # the worker is shutting down


class Mailboxes:
    def __init__(self, max_inflight: int = MAX_INFLIGHT, threads: int = 1) -> None:
        self.max_inflight = max_inflight
        #: runner threads that should be free to run agents (``--threads``).
        self.threads = threads
        #: runner threads alive (the worker starts ``threads``; :meth:`block` adds more).
        self.runners = threads
        #: runner threads blocked in a nested call's wait (:meth:`block`).
        self.blocked = 0
        self.cond = threading.Condition()
        self.boxes: dict[str, deque[Job]] = {}
        #: claimed agents: ready, running, parked on the loop, or held by a bulk create.
        self.busy: set[str] = set()
        #: claimed agents with work that no thread runs yet, in the order they became ready.
        self.ready: deque[str] = deque()
        self.reading = False
        #: entries read and not yet written (jobs and rejected entries alike).
        self.inflight = 0
        #: the ids of those entries: a re-read of this worker's pending entries (after a
        #: reconnect) must not run them twice.
        self.held: set[bytes] = set()
        #: agents whose call waits on the loop thread.
        self.parked = 0
        #: parked awaitables the loop thread has not started yet (see :meth:`park`).
        self.to_park: list[tuple[str, Awaitable[Any]]] = []
        self.stopping = False
        self.exiting = False

    # --- the runner threads' turns ---------------------------------------------------------

    def claim(self) -> str | Turn:
        """Block until this thread has something to do: an agent id (claimed: run its mailbox
        with :meth:`take` until it returns None), :attr:`Turn.READ` or :attr:`Turn.EXIT`."""
        with self.cond:
            while True:
                if self.ready:
                    agent = self.ready.popleft()
                    if self.ready or not self.reading:
                        # Wake one more: for the rest, or to lead the next read. One at a time:
                        # quick calls are then run by the few threads that are already awake,
                        # and blocking ones wake the pool a thread at a time.
                        self.cond.notify()
                    return agent
                if self.exiting:
                    return Turn.EXIT
                if self.runners - self.blocked > self.threads:
                    self.runners -= 1  # lent while another blocked, which is back: retire
                    return Turn.EXIT
                if not self.reading and not self.stopping and self.inflight < self.max_inflight:
                    self.reading = True
                    return Turn.READ
                self.cond.wait(1.0)

    def deliver(self, jobs: Iterable[Job], rejected: Sequence[Rejected] = ()
                ) -> tuple[str | None, list[Rejected]]:
        """End a read: put ``jobs`` in their mailboxes in order, and count ``rejected`` in
        flight. Entries already held are dropped (a re-read of pending entries). Returns the
        agent the reader runs itself (claimed, or None) and the rejected entries it must
        answer."""
        with self.cond:
            self.reading = False
            fresh = [r for r in rejected if self._admit(r.entry_id)]
            for job in jobs:
                if not self._admit(job.entry_id):
                    continue
                agent = job.entry.agent
                box = self.boxes.get(agent)
                if box is None:
                    box = self.boxes[agent] = deque()
                if job.held is not None:
                    job.held = self._hold(job.held)
                box.append(job)
                if agent not in self.busy:
                    self.busy.add(agent)
                    self.ready.append(agent)
            mine = self.ready.popleft() if self.ready else None
            # A follower takes the rest (and wakes another while some are left) or leads the
            # next read.
            self.cond.notify()
        return mine, fresh

    def admit(self, jobs: Iterable[Job]) -> list[Job]:
        """Count entries that are handled at once, not queued (``cancel``), in flight; those
        already held (a re-read) are left out."""
        with self.cond:
            return [j for j in jobs if self._admit(j.entry_id)]

    def remove(self, agent: str, calls: Iterable[str]) -> list[Job]:
        """Take the jobs of ``calls`` out of ``agent``'s mailbox (``busagent.cancel``); they
        stay in flight until the caller answers them. A job already taken is not here."""
        wanted = set(calls)
        with self.cond:
            box = self.boxes.get(agent)
            if not box:
                return []
            gone = [j for j in box if j.entry.call in wanted and j.held is None]
            if gone:
                out = {id(j) for j in gone}
                self.boxes[agent] = deque(j for j in box if id(j) not in out)
            return gone

    def read_failed(self) -> None:
        """End a read that raised, so another thread can lead."""
        with self.cond:
            self.reading = False

    def _admit(self, entry_id: bytes) -> bool:
        if entry_id in self.held:
            return False
        self.held.add(entry_id)
        self.inflight += 1
        return True

    def _hold(self, agents: list[str]) -> list[str]:
        # A bulk create runs in its own mailbox, not its agents': until it is done, their calls
        # (read after it) wait, as they would behind a single agent's create. Marking them busy
        # keeps their mailboxes from being handed out.
        held = []
        for agent in agents:
            if agent not in self.busy:
                self.busy.add(agent)
                held.append(agent)
        return held

    def held_ids(self) -> set[bytes]:
        """A copy of the ids of the entries in flight."""
        with self.cond:
            return set(self.held)

    # --- a claimed agent ---------------------------------------------------------------------

    def take(self, agent: str) -> Job | None:
        """The claimed agent's next job; None when its mailbox is empty, and then the agent is
        handed back (no longer claimed)."""
        with self.cond:
            box = self.boxes.get(agent)
            if not box:
                self._hand_back(agent)
                return None
            return box.popleft()

    def has_more(self, agent: str) -> bool:
        """Whether the claimed agent's mailbox has more jobs. Read without the lock: only the
        claimer takes from a mailbox, so the answer can only grow before its next :meth:`take`."""
        return bool(self.boxes.get(agent))

    def hand_back(self, agent: str) -> None:
        """Give up a claim: the agent becomes ready again if its mailbox has work."""
        with self.cond:
            self._hand_back(agent)

    def release(self, agents: list[str]) -> None:
        """Hand back the agents a bulk create held, however it ended."""
        with self.cond:
            for agent in agents:
                self._hand_back(agent)

    def _hand_back(self, agent: str) -> None:
        if self.boxes.get(agent):
            self.busy.add(agent)
            self.ready.append(agent)
            self.cond.notify()
        else:
            self.busy.discard(agent)
            self.boxes.pop(agent, None)

    # --- runner threads blocked in nested calls -------------------------------------------

    def block(self) -> bool:
        """A runner thread is about to block until other agents answer (a nested call's
        ``.content`` inside ``reply``). True: start one more runner thread, so ``threads``
        stay free to run agents, the ones it waits for included (Ray releases a task's CPU
        while it blocks in ``ray.get`` for the same reason). Surplus threads retire once the
        blocked ones are back and they find nothing to do. Beyond MAX_LENT_THREADS extra
        threads a blocking wait holds its thread like any blocking call."""
        with self.cond:
            self.blocked += 1
            if (self.runners - self.blocked < self.threads
                    and self.runners < self.threads + MAX_LENT_THREADS):
                self.runners += 1
                return True
            return False

    def unblock(self) -> None:
        """The thread that :meth:`block` counted is running again."""
        with self.cond:
            self.blocked -= 1

    def lent(self) -> None:
        """The thread :meth:`block` asked for could not start: count it out again."""
        with self.cond:
            self.runners -= 1

    # --- parking on the loop thread ----------------------------------------------------------

    def park(self, agent: str, aw: Awaitable[Any]) -> bool:
        """Queue a claimed agent's awaitable for the loop thread; the agent stays claimed until
        :meth:`unpark`. True when the loop must be woken (the first of a burst: one wake-up per
        burst, not per call)."""
        with self.cond:
            self.parked += 1
            self.to_park.append((agent, aw))
            return len(self.to_park) == 1

    def take_parked(self) -> list[tuple[str, Awaitable[Any]]]:
        """What :meth:`park` queued since the last call (on the loop thread)."""
        with self.cond:
            batch, self.to_park = self.to_park, []
        return batch

    def unpark(self, agent: str, job: Job | None = None) -> None:
        """A parked agent's awaitable ended: put ``job`` (inputs now resolved) back at the front
        of its mailbox, and hand the agent back."""
        with self.cond:
            self.parked -= 1
            if job is not None:
                self.boxes.setdefault(agent, deque()).appendleft(job)
            self._hand_back(agent)

    # --- accounting and lifecycle ------------------------------------------------------------

    def written(self, batch: Sequence[Done]) -> None:
        """The committer wrote ``batch``: those entries are no longer in flight."""
        with self.cond:
            full = self.inflight >= self.max_inflight
            self.inflight -= len(batch)
            self.held.difference_update(d.entry_id for d in batch)
            if full:
                self.cond.notify()  # reading was paused: someone may lead again

    def stop(self) -> bool:
        """Read no more; True if a read is in progress (the caller may wake it)."""
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
            return self.reading

    def wait_idle(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for every read job to finish, then release the runner
        threads (:attr:`Turn.EXIT`) whatever is left."""
        deadline = time.monotonic() + timeout
        with self.cond:
            # Polled: emptying a mailbox notifies nobody, and need not on the hot path.
            while (self.boxes or self.reading or self.parked) and time.monotonic() < deadline:
                self.cond.wait(0.1)
            self.exiting = True
            self.cond.notify_all()

    def snapshot(self) -> dict[str, Any]:
        """A read-only view for diagnosis (the ``state`` control op), 50 agents at most each."""
        with self.cond:
            return {
                "reading": self.reading, "inflight": self.inflight, "parked": self.parked,
                "runners": self.runners, "blocked": self.blocked,
                "ready": list(self.ready)[:50], "busy": sorted(self.busy)[:50],
                "mailboxes": {a: len(q) for a, q in list(self.boxes.items())[:50]},
            }
