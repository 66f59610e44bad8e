"""What the worker's collaborators pass each other: a :class:`Job` in, a :class:`Done` out.

A leaf with no Redis: the inbox makes jobs, the mailboxes queue them, the executor and hosting
turn them into ``Done``s, the committer writes those. :class:`Replies` encodes the reply bytes
a ``Done`` carries, the same way for every path, so the caller sees one error format.
"""

from __future__ import annotations

import os
import traceback
from dataclasses import dataclass
from typing import Any

from busagent.agent import Agent
from busagent.errors import BusagentError, MessageTooLarge, NotSerializable, ProtocolError
from busagent.memory import from_json
from busagent.protocol import Entry, Reply, safe_text


@dataclass(slots=True)
class Job:
    """One inbox entry to run, in its agent's mailbox (the mailbox named ``entry.agent``: ``""``
    holds server-level control calls and bulk creates)."""

    entry_id: bytes
    entry: Entry
    #: (args, kwargs) once forwarded placeholders are resolved.
    resolved: tuple[list[Any], dict[str, Any]] | None = None
    #: a bulk create: from the inbox, the agents it builds; once in a mailbox, those of them it
    #: holds (marked busy so their calls wait for it; see Mailboxes.deliver).
    held: list[str] | None = None
    #: ``time.perf_counter()`` when the executor first ran it (0: not a call); kept when a call
    #: that waited for its inputs runs again, so the latency counted covers the wait.
    started: float = 0.0


@dataclass(slots=True)
class Rejected:
    """An entry that cannot become a Job (malformed). Counted in flight like a job, so a re-read
    does not answer it twice; the reader answers it at once."""

    entry_id: bytes
    #: "" when the entry has no call id: nobody waits, so it goes to the dead letters.
    call: str
    error: BusagentError
    #: the entry's fields, for the dead-letter stream (no call id only).
    dead: dict[bytes, bytes] | None = None


@dataclass(slots=True)
class Done:
    """A finished entry for the committer: acknowledge ``entry_id``, write ``reply`` to
    ``call_id`` (skipped when either is empty: nobody waits) and apply the memory changes."""

    entry_id: bytes
    call_id: str
    reply: bytes
    agent_id: str | None = None
    mem_cleared: bool = False
    #: JSON memory items to append.
    mem_new: list[str] | None = None
    #: the agent's declared state as JSON, when it changed (None: unchanged).
    state: str | None = None
    #: the agent was deleted: drop its memory, state, registry record and spec.
    drop: bool = False
    #: copied from :attr:`Job.started`: counted as a call in the worker's stats when non-zero.
    started: float = 0.0
    #: the reply is an error (counted in the worker's stats).
    failed: bool = False
    #: the call's trace context as the tracing module keeps it (None: not traced).
    trace: Any = None


def silent(entry_id: bytes) -> Done:
    """Acknowledge an entry nobody waits on (a wake, a restore)."""
    return Done(entry_id, "", b"")


class Replies:
    """Reply bytes as the caller's :func:`busagent.bus.decode` reads them, naming ``server``.

    A value that cannot travel (not serializable, or over ``max_bytes`` encoded) becomes an error
    reply instead: the caller gets a reason, never a hang."""

    def __init__(self, server: str, max_bytes: int) -> None:
        self.server = server
        self.max_bytes = max_bytes

    def ok(self, value: Any) -> bytes:
        """``value`` as an ok reply."""
        return self._ok(value)[0]

    def _ok(self, value: Any) -> tuple[bytes, bool]:
        """The reply bytes, and whether they are an error (the value could not travel)."""
        try:
            data = Reply.ok(value)
        except NotSerializable as e:
            return self.error(NotSerializable(f"the reply cannot travel on the bus: {e}")), True
        if len(data) > self.max_bytes:
            return self.error(MessageTooLarge(
                f"the reply is {len(data):,} bytes, over max_message_bytes={self.max_bytes:,}"
            )), True
        return data, False

    def error(self, err: BaseException, tb: str | None = None) -> bytes:
        """busagent's own errors travel without a traceback (they say what to fix); anything
        else with the user's frames. Never raises (see :meth:`Reply.fail`)."""
        try:
            if tb is None:
                tb = "" if isinstance(err, BusagentError) else user_traceback(err)
            return Reply.fail(err, server=self.server, traceback=tb)
        except Exception as e:  # noqa: BLE001 - the caller must get an answer, never a hang
            return Reply.fail(ProtocolError(
                f"the call failed with a {safe_text(type(err).__name__)} whose error reply "
                f"could not be encoded ({safe_text(e)})"), server=self.server)

    def failed(self, job: Job, err: BaseException) -> Done:
        """``job`` answered with ``err``; nothing of the agent's is written."""
        return Done(job.entry_id, job.entry.call, self.error(err), started=job.started,
                    failed=True)

    def done(self, job: Job, agent: Agent, value: Any) -> Done:
        """``value`` as the reply, with the agent's memory changes since its last call and
        its declared state if it changed. If either cannot be stored the call fails with
        NotSerializable naming the item, and the agent goes back to what Redis has (memory
        changes undone, declared state reloaded as last saved) so its next call is not stuck
        on the same value."""
        saved = agent._state_saved
        try:
            state = agent._take_state()
        except NotSerializable as e:
            if saved is not None:
                agent.load_state_dict(from_json(saved))
            return self.failed(job, NotSerializable(
                f"the agent's declared state cannot be stored, so the call's reply, memory "
                f"and state changes are dropped: {e}"))
        try:
            cleared, new = agent.memory.take_changes()
        except NotSerializable as e:
            agent.memory.undo_changes()
            agent._state_saved = saved  # not written: the next commit writes it
            return self.failed(job, NotSerializable(
                f"the agent's memory changes cannot be stored, so the call's reply and memory "
                f"changes are dropped: {e}"))
        data, failed = self._ok(value)
        return Done(job.entry_id, job.entry.call, data, job.entry.agent, cleared, new, state,
                    started=job.started, failed=failed)


# Compared as the interpreter spells it in code objects: the form of this file's __file__.
_HERE = os.path.dirname(__file__)


def user_traceback(err: BaseException) -> str:
    """The traceback from the first frame outside this package: the caller wants the agent's
    frames, not the worker's."""
    tb = err.__traceback__
    while tb is not None and os.path.dirname(tb.tb_frame.f_code.co_filename) == _HERE:
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(err), err, tb))
