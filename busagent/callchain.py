"""The call chain: which agents' calls are up the stack of the call being made.

A call made from inside an agent's ``reply`` (or ``observe`` or a ``@remote`` method) on a worker
carries the chain of the call that is running (``CallBody.chain``: ``[agent id, name, call id]``
triples, outermost first) plus that agent and its call. A call to an agent of the chain is a
cycle exactly when that agent is still busy with the very call named there: its mailbox runs one
call at a time, so the new call could only run after the call that (directly or through others)
waits for it, and would hang until the deadline. Such a call is refused at once with
:class:`~busagent.errors.CallCycle`: by the sender when the agent runs in its process, else by
the agent's worker as the call arrives (it knows which call each of its agents is running).

An agent of the chain that is no longer busy with that call is no cycle: a callback pattern (A
calls B without waiting and returns; B's reply calls A and waits) runs. Decided like Ray and
AgentScope users would expect from a deadlock they hit: refused even when the caller would not
block on the reply (fire and forget to itself while its call runs), because a refusal at the
send is the only place the caller learns it; an agent that wants to work on itself later can
queue the work in its own state and return.

Threads: on a worker, a thread started while a call runs (``threading.Thread.start``, which
``ThreadPoolExecutor`` uses) carries the chain of that call (:func:`inherit_in_threads`), so a
cycle closed from such a thread is refused too. A thread started earlier and reused later (a
pool made at import) carries the chain of the call that started it, or none: a cycle closed
from there is not seen and waits for its deadline. :func:`bind` carries the current chain into
any callable, for such pools.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextvars import ContextVar
from typing import Any, TypeVar

from .errors import CallCycle

#: ``(agent id, name, call id)`` of the calls up the stack, outermost first; empty in a
#: program's own code (the top of every chain). The call id is "" when an older sender left it
#: out (then the agent counts as busy with it).
Chain = tuple[tuple[str, str, str], ...]

_current: ContextVar[Chain] = ContextVar("busagent_call_chain", default=())

#: (agent id, call id) of the calls running in this process, counted (a call is entered once
#: per context that runs it: the thread, or the task of an async reply).
_running: Counter[tuple[str, str]] = Counter()
_running_lock = threading.Lock()

T = TypeVar("T")


def current() -> Chain:
    """The chain a call made here would carry (``()`` outside any agent's call)."""
    return _current.get()


def normal(chain: Sequence[Sequence[str]]) -> Chain:
    """``chain`` as triples (an older sender's pairs get call id "")."""
    return tuple((str(c[0]), str(c[1]), str(c[2]) if len(c) > 2 else "") for c in chain)


def busy(agent_id: str, call_id: str) -> bool:
    """Whether this process runs call ``call_id`` of agent ``agent_id`` right now."""
    with _running_lock:
        return _running[(agent_id, call_id)] > 0


@contextlib.contextmanager
def running(chain: Sequence[Sequence[str]], agent_id: str, name: str,
            call_id: str) -> Iterator[Chain]:
    """While an agent runs call ``call_id`` that came with ``chain``: calls it makes carry the
    chain with the agent and its call appended, and :func:`busy` says it runs it. Raises
    CallCycle when the agent is in ``chain`` and still busy with the call named there."""
    outer = normal(chain)
    refuse(outer, [(agent_id, name)])
    token = _current.set((*outer, (agent_id, name, call_id)))
    key = (agent_id, call_id)
    with _running_lock:
        _running[key] += 1
    try:
        yield _current.get()
    finally:
        with _running_lock:
            _running[key] -= 1
            if _running[key] <= 0:
                del _running[key]
        _current.reset(token)


def refuse(chain: Sequence[Sequence[str]], targets: Iterable[tuple[str, str]],
           local_only: bool = False) -> None:
    """Raise CallCycle if one of ``targets`` (``(agent id, name)``) is in ``chain`` and busy
    with the call named there: running it in this process, or (``local_only`` False) named
    with no call id (an older sender). An agent of the chain that runs elsewhere is left to its
    worker (:func:`refuse` there, as the call arrives)."""
    if not chain:
        return
    links = normal(chain)
    where: dict[str, list[int]] = {}
    for i, (a, _, _) in enumerate(links):
        where.setdefault(a, []).append(i)
    for agent_id, name in targets:
        for i in where.get(agent_id, ()):
            call = links[i][2]
            if busy(agent_id, call) or (not call and not local_only):
                loop = " -> ".join(n for _, n, _ in links[i:]) + f" -> {name}"
                raise CallCycle(
                    f"call cycle refused: {loop} (agent id {agent_id}); {name} is still "
                    "running the call that waits up this chain and runs one call at a time, so "
                    "this call would wait for itself until its deadline. Return a placeholder "
                    "or restructure the flow instead")


def bind(fn: Callable[..., T]) -> Callable[..., T]:
    """``fn`` to run with the current call chain, in whatever thread runs it (a pool made
    before the call): a cycle closed from there is refused instead of waiting its deadline."""
    ctx = contextvars.copy_context()
    chain = ctx.get(_current, ())

    @functools.wraps(fn)
    def bound(*args: Any, **kwargs: Any) -> T:
        token = _current.set(chain)
        try:
            return fn(*args, **kwargs)
        finally:
            _current.reset(token)

    return bound


_inheriting = False


def inherit_in_threads() -> None:
    """On a worker: a thread started while a call runs carries that call's chain (Python's
    threads start with an empty context). Idempotent."""
    global _inheriting
    if _inheriting:
        return
    _inheriting = True
    start = threading.Thread.start

    def start_with_chain(self: threading.Thread) -> None:
        chain = _current.get()
        if chain:
            run = self.run

            def run_with_chain() -> None:
                _current.set(chain)
                run()

            self.run = run_with_chain  # type: ignore[method-assign]
        start(self)

    threading.Thread.start = start_with_chain  # type: ignore[method-assign]
