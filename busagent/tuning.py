"""Tuning constants: batch sizes and intervals that are not user settings, named in one place.

Settings a user may change (timeouts, capacity, TTLs) are in :mod:`busagent.config`; these are
the engine's own sizes, chosen by measurement (``make bench``, the game benchmark) on a 2-core
machine. Units are in each name's comment.
"""

from __future__ import annotations

# --- callers -------------------------------------------------------------------------------------

#: calls per routing script call, and queued sends per pipeline (count).
SEND_BATCH = 1000
#: replies read per collect.lua call (count).
PEEK_BATCH = 2000
#: bytes of replies one collect.lua call returns at most (beyond its first reply): well under
#: the 16-32 MB output-buffer limits managed Redis sets for normal clients (bytes).
PEEK_BYTES = 4 * 2**20
#: how long sends wait out a Redis outage before their placeholders fail (seconds).
SEND_PATIENCE = 20.0
#: how long a routed call id is remembered, so a resent call is routed once (seconds). Must
#: outlast SEND_PATIENCE: route.lua receives it as an argument.
SENT_MARK_TTL = 30
#: how long queued sends wait for a resolve (or more sends) before the sender thread sends them
#: (seconds).
LINGER = 0.002
#: agents whose servers a long wait checks for liveness at each check (count): the first
#: pending calls' agents; a gather over more finds a stranded one as the others are answered.
CHECK_AGENTS = 100
#: how long a placement decision reuses its snapshot of the servers hash (seconds).
PLACEMENT_SNAPSHOT = 1.0
#: how long a program waits for the child workers it started to serve (seconds).
CHILD_START_TIMEOUT = 60.0
#: a child worker's grace on stop (seconds): it is stopped only when its program exits, and then
#: nobody is left to read the replies of calls still running, so they are cut short.
CHILD_GRACE = 1.0
#: how long an exiting program waits for its child workers before it kills them (seconds).
CHILD_STOP_WAIT = 3.0
#: an exit that has waited this long for something says what it waits for (seconds).
EXIT_NOTICE_AFTER = 0.5
#: a program's liveness key lives this many of its heartbeats (count): it is renewed every
#: heartbeat, so a program is declared gone by Redis's clock within this many after it dies.
PROGRAM_TTL_BEATS = 4
#: owned agents a worker deletes per round trip when it sweeps a program that is gone (count).
SWEEP_BATCH = 1000
#: a worker sweeps programs that are gone every this many of its heartbeats (count).
SWEEP_PROGRAMS_EVERY = 2
#: how often a worker re-reads model configs from Redis (seconds).
MODEL_CONFIG_REFRESH = 5.0

# --- workers -------------------------------------------------------------------------------------

#: inbox entries per XREADGROUP (count).
READ_COUNT = 256
#: how often a worker re-reads its own pending entries (seconds).
HISTORY_EVERY = 5.0
#: completions per commit.lua call (count).
COMMIT_BATCH = 1000
#: calls to one agent run back to back before their replies are written together (count).
DRAIN_BATCH = 64
#: a worker stops reading new calls while this many are read and not yet answered (count).
MAX_INFLIGHT = 20000
#: calls running now that a worker lists in its heartbeat record, oldest first (count).
RUNNING_SHOWN = 50
#: log lines a worker keeps in its capped log stream ``{p}:logs:{server}`` (count, about).
LOG_LINES = 5000
#: log lines a worker writes per round trip, and how long a line waits for more (count, seconds).
LOG_BATCH, LOG_LINGER = 200, 0.2
#: extra runner threads a worker starts at most while its threads block in nested calls
#: (count): each blocked one holds a thread and a Redis connection; a chain of nested calls
#: a thousand wide and two deep fits.
MAX_LENT_THREADS = 4096
#: remembered constructor failures, so calls that queued behind a failed create say why (count).
FAILED_CREATES = 10000

# --- recovery ------------------------------------------------------------------------------------

#: agents per move.lua call (count).
MOVE_BATCH = 500
#: how long the lock on a dead server's recovery is held at most (milliseconds).
RECOVERY_LOCK_MS = 120_000
