"""The call chain: which agents are waiting, up the stack, for the call being made.

A call made from inside an agent's ``reply`` (or ``observe`` or a ``@remote`` method) on a worker
carries the chain of the call that is running (``CallBody.chain``: ``[agent id, name]`` pairs,
outermost first) plus that agent. An agent is in its chain exactly when it is busy up the stack:
its mailbox runs one call at a time, so a call to it from there (itself, or a cycle A -> B -> A)
could only run after the call that waits for it, and would hang until the deadline. Such a call
is refused at once with :class:`~busagent.errors.CallCycle`, by the sender and again by the
worker (a sender that did not check).

Decided like Ray and AgentScope users would expect from a deadlock they hit: refused even when
the caller would not block on the reply (fire and forget to itself), because a refusal at the
send is the only place the caller learns it; an agent that wants to work on itself later can
queue the work in its own state and return.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from contextvars import ContextVar

from .errors import CallCycle

#: ``(agent id, name)`` pairs of the calls waiting up the stack, outermost first; empty in a
#: program's own code (the top of every chain).
Chain = tuple[tuple[str, str], ...]

_current: ContextVar[Chain] = ContextVar("busagent_call_chain", default=())


def current() -> Chain:
    """The chain a call made here would carry (``()`` outside any agent's call)."""
    return _current.get()


@contextlib.contextmanager
def running(chain: Sequence[Sequence[str]], agent_id: str, name: str) -> Iterator[Chain]:
    """While an agent runs a call that came with ``chain``: calls it makes carry the chain with
    the agent appended. Raises CallCycle when the agent is already in ``chain``."""
    outer: Chain = tuple((str(a), str(n)) for a, n in chain)
    refuse(outer, [(agent_id, name)])
    token = _current.set((*outer, (agent_id, name)))
    try:
        yield _current.get()
    finally:
        _current.reset(token)


def refuse(chain: Chain, targets: Iterable[tuple[str, str]]) -> None:
    """Raise CallCycle if one of ``targets`` (``(agent id, name)``) is in ``chain``, naming the
    cycle from that agent back to itself."""
    if not chain:
        return
    where = {a: i for i, (a, _) in enumerate(chain)}
    for agent_id, name in targets:
        i = where.get(agent_id)
        if i is None:
            continue
        loop = " -> ".join(n for _, n in chain[i:]) + f" -> {name}"
        raise CallCycle(
            f"call cycle refused: {loop} (agent id {agent_id}); {name} is waiting up this call "
            "chain and runs one call at a time, so this call would wait for itself until its "
            "deadline. Return a placeholder or restructure the flow instead"
        )
