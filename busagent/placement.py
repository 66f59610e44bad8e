"""Where a new agent goes: the named server, the least loaded live one, or child workers.

Child workers are private to the program that started them (``ServerInfo.private_to``): other
programs never place agents there, since those workers stop when their program exits.

Callers place agents (:func:`place`, used by ``proxy.create`` and ``create_many``); workers
never do, so nothing here is imported by :mod:`busagent.worker` (recovery picks servers with
:func:`busagent.records.pick`, the same rule). Placement reads the servers hash through a short
snapshot (:class:`Placement`, one per :class:`~busagent.bus.Bus`): a burst of creates costs one
``HGETALL`` per ``PLACEMENT_SNAPSHOT`` seconds, and :func:`~busagent.records.pick` counts each
placement on the snapshot's record so the burst still spreads before the next heartbeat.

This module imports :mod:`busagent.bus` only for type checking, so ``bus.py`` can build a
:class:`Placement` without an import cycle.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from . import records
from .errors import PlacementError
from .records import ServerInfo, pick
from .tuning import PLACEMENT_SNAPSHOT

if TYPE_CHECKING:
    from .bus import Bus


class Placement:
    """One process's snapshot of the live servers, for placing agents.

    ``servers`` are the records that were alive (``up`` or ``late``) when read, at ``at``
    (``time.monotonic()`` seconds); a snapshot older than ``PLACEMENT_SNAPSHOT`` is re-read.
    Not locked: two threads placing at once may both re-read, which costs a round trip, not
    correctness (the records are replaced whole)."""

    def __init__(self) -> None:
        self.at = 0.0
        self.servers: list[ServerInfo] = []

    def live(self, b: Bus, fresh: bool = False) -> list[ServerInfo]:
        """The live servers, re-read from ``{p}:servers`` if ``fresh`` or the snapshot is old.
        Raises RedisUnavailable or BusError if Redis fails."""
        now = time.monotonic()
        if fresh or now - self.at > PLACEMENT_SNAPSHOT:
            with b.errors():
                found = records.read_servers(b.redis, b.keys.servers)
            self.servers = [s for s in found if s.alive(b.settings.dead_after)]
            self.at = now
        return self.servers


def place(b: Bus, module: str, load: str, server: str | None, count: int = 1) -> str:
    """The name of the server ``count`` new agents of ``module`` go to: ``server`` if given
    (it must be alive, have loaded ``module`` and have room), else the least loaded live server
    that loaded it, else worker processes started for this program with ``--agents load``
    (:mod:`busagent.spawn`). Raises PlacementError when none can take them."""
    snap = b.placement
    if server is not None:
        for s in snap.live(b, fresh=True):
            if s.name == server and not s.serves(b.private_to):
                raise PlacementError(
                    f"server {server!r} is a child worker private to another program; start "
                    f"a worker of your own with `busagent worker --name NAME --agents {load}`")
            if s.name == server:
                if module not in s.modules:
                    raise PlacementError(
                        f"server {server!r} did not load module {module!r} (it loaded "
                        f"{s.modules}); restart it with `busagent worker --name {server} "
                        f"--agents {load}`"
                    )
                if s.agents + count > s.capacity:
                    raise PlacementError(f"server {server!r} is full ({s.capacity} agents)")
                s.agents += count
                return server
        raise PlacementError(
            f"no live server named {server!r}; start it with `busagent worker --name {server} "
            f"--agents {load}` against the same Redis, or see `busagent servers`{b.where()}"
        )
    def ours(servers: list[ServerInfo]) -> list[ServerInfo]:
        # Another program's child workers stop when it exits: never place there.
        return [s for s in servers if s.serves(b.private_to)]

    for fresh in (False, True):
        best = pick(ours(snap.live(b, fresh)), module, count)
        if best is not None:
            return best.name
    # Imported here: spawn starts processes, which only a placement that found no server needs.
    from .spawn import ensure_children

    names = ensure_children(b, load)
    best = pick([s for s in snap.live(b, fresh=True) if s.name in names and s.serves(b.private_to)],
                module, count)
    if best is None:
        raise PlacementError(
            f"worker processes for {load} started but none can take {count} more agent(s): "
            "they are full or not registered; raise their capacity (BUSAGENT_CAPACITY, "
            "`busagent worker --capacity`) or child_workers")
    return best.name


__all__ = ["Placement", "place"]
