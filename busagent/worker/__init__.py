"""The worker runtime (``busagent worker`` runs it): :class:`Worker` in :mod:`.process`, and the
collaborators it wires together, each owning one concept:

* :mod:`.inbox`: reading the server's inbox stream into jobs;
* :mod:`.mailboxes`: per-agent mailboxes and which thread runs what (no Redis);
* :mod:`.executor`: running one call on its agent (Redis only through :class:`.executor.CallIO`);
* :mod:`.hosting`: the hosted agents: build, restore, create, delete;
* :mod:`.committer`: writing finished calls with ``commit.lua`` (group commit);
* :mod:`.heartbeat`: the registry record, fencing, sweeping dead servers into :mod:`.recovery`;
* :mod:`.jobs`: the Job and Done they pass each other, and reply encoding;
* :mod:`.load`: loading the modules agents come from.
"""

from .process import Worker, run

__all__ = ["Worker", "run"]
