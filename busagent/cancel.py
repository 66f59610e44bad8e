"""Cancelling calls: ``busagent.cancel(p)`` in the caller, ``busagent.cancelled()`` in a reply.

What a cancel does depends on where the call is when its worker reads the cancel (Ray's
``ray.cancel`` and Celery's ``revoke`` are the models):

* queued (read, waiting in its agent's mailbox, or waiting for forwarded placeholders): removed
  and answered with :class:`~busagent.errors.Cancelled` at once; it never runs;
* running an ``async`` reply: ``asyncio.CancelledError`` is raised inside it at its current
  ``await``; the call is answered with Cancelled;
* running a plain reply: threads cannot be interrupted safely, so :func:`cancelled` turns True
  for the reply to check. Whatever it then returns, or if it ignores the flag and completes,
  its reply is discarded and the caller gets Cancelled. Decided so that a cancelled
  placeholder always ends the same way, whatever the call was doing: the caller gave it up.
  The memory and declared-state changes it made are kept (the agent in the worker has them;
  undoing them would leave it different from Redis);
* already answered: nothing changes, the reply stays.

The cancel travels as a ``cancel`` entry routed to the call's agent like a call, so it lands in
the same inbox behind the calls it names; the worker handles it as soon as it reads it. No
extra Redis round trip is added to any call: a call costs the worker one dict insert and one
removal (under a lock) to be findable.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterable
from typing import Any

from .errors import ConfigError

#: the running call's flag, set by the worker around a reply (None outside a call).
_current: contextvars.ContextVar[CallFlag | None] = contextvars.ContextVar(
    "busagent_call_flag", default=None)


class CallFlag:
    """A running call's cancellation flag (worker side). ``task`` is the asyncio task running
    it while it waits on the worker's loop."""

    __slots__ = ("cancelled", "task")

    def __init__(self) -> None:
        self.cancelled = False
        self.task: Any = None

    def cancel_task(self) -> None:
        """On the loop thread: raise CancelledError in the call's task, if it still runs."""
        if self.task is not None and not self.task.done():
            self.task.cancel()


def cancelled() -> bool:
    """True inside a reply (or ``@remote`` method) whose call was cancelled with
    :func:`cancel`: a long plain reply checks it and returns early. False anywhere else."""
    flag = _current.get()
    return flag is not None and flag.cancelled


def cancel(placeholders: Any) -> None:
    """Cancel the calls of a placeholder or of an iterable of them (see the module's docstring
    for what happens to each). Returns at once, once the cancels are sent; placeholders whose
    reply is already here are left alone. Reading a cancelled placeholder then raises
    :class:`~busagent.errors.Cancelled`, unless its call had finished first.

    Raises ConfigError for something that is not a placeholder, or for one made with
    ``Placeholder.from_id`` (it does not know its agent; cancel from the process that made the
    call, or the agent that did), and BusError when Redis fails."""
    from . import bus as _bus
    from .placeholder import Placeholder
    from .protocol import CancelBody

    ps = [placeholders] if isinstance(placeholders, Placeholder) else _listed(placeholders)
    by_agent: dict[str, list[str]] = {}
    for p in ps:
        if not isinstance(p, Placeholder):
            raise ConfigError(f"busagent.cancel takes placeholders, not {type(p).__name__}")
        if not p.agent_id:
            raise ConfigError(f"cannot cancel call {p.call_id}: a placeholder made from a call "
                              "id does not know its agent; cancel it where the call was made")
        if not p.done():
            by_agent.setdefault(p.agent_id, []).append(p.call_id)
    if not by_agent:
        return
    b = _bus.current()
    # The calls first: routed before it, they are in the inbox ahead of the cancel.
    b.sender.flush()
    for agent, calls in by_agent.items():
        body = CancelBody(calls=calls).pack()
        # An agent gone meanwhile: its calls are answered UnknownAgent already.
        b.sender.route(agent, _bus.new_id(), "cancel", body, lambda _e: None)
    b.sender.flush()


def _listed(placeholders: Any) -> list[Any]:
    if not isinstance(placeholders, Iterable) or isinstance(placeholders, str | bytes):
        raise ConfigError("busagent.cancel takes a placeholder or a list of placeholders, not "
                          f"{type(placeholders).__name__}")
    return list(placeholders)
