"""Chaos soak: many calls while worker processes are killed (-9) at random and Redis is
restarted, then an audit of every call.

    python benchmarks/soak.py --calls 100000 --kills 20 --redis-restarts 2
    python benchmarks/soak.py ... --client-kills 10 --squeezes 3     # Redis misbehaving too

Runs its own redis-server (append-only file, fsync always) and worker processes. Calls go out in
windows; kills and restarts happen while a window is in flight. Killed workers are replaced,
alternately under the same name (which rebuilds its agents itself) and a new one (the others
recover the agents). At the end, for every call id: the number of replies in Redis (1 is right),
and for every agent: that its memory holds each delivered message exactly once.

``--client-kills N``: in N windows, CLIENT KILL of up to five random connections (workers'
readers, their pools, the caller's), as a proxy or load balancer dropping connections would.
``--squeezes N``: in N windows, maxmemory set below Redis's used memory for ``--squeeze-seconds``
(noeviction: every write refused, heartbeats included), then lifted. Calls whose routing Redis
refused are sent again, like those refused while Redis was down.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import psutil
import redis

import busagent
from busagent import Agent, Msg, embedded
from busagent.spawn import stop_processes

HERE = Path(__file__).resolve()
FAST = {"BUSAGENT_HEARTBEAT": "0.3", "BUSAGENT_DEAD_AFTER": "1.5", "BUSAGENT_SWEEP_AFTER": "30"}


class Tally(Agent):
    """Remembers every message it gets and answers with how many it has seen."""

    def reply(self, x: Msg | None = None) -> int:
        self.memory.add(x)
        return self.memory.size()


class Chaos:
    def __init__(self, url: str, prefix: str, workers: int) -> None:
        self.url, self.prefix = url, prefix
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.serial = 0
        self.log = open(Path(tempfile.gettempdir()) / "busagent-soak-workers.log", "ab")  # noqa: SIM115
        for _ in range(workers):
            self.start(self.fresh_name())

    def fresh_name(self) -> str:
        self.serial += 1
        return f"soak-{self.serial}"

    def start(self, name: str) -> None:
        env = {**os.environ, **FAST, "PYTHONPATH": str(HERE.parent.parent)}
        self.procs[name] = subprocess.Popen(
            [sys.executable, "-m", "busagent.cli", "worker", "--name", name, "--redis", self.url,
             "--prefix", self.prefix, "--agents", str(HERE), "--log-level", "WARNING"],
            env=env, stdout=self.log, stderr=self.log)

    def wait_ready(self, b: busagent.bus.Bus) -> None:
        for name in self.procs:
            b.redis.blpop([b.keys.ready(name)], timeout=30)

    def kill_one(self, rng: random.Random, same_name: bool) -> str:
        name = rng.choice(sorted(n for n, p in self.procs.items() if p.poll() is None))
        p = self.procs.pop(name)
        p.send_signal(signal.SIGKILL)
        p.wait()
        self.start(name if same_name else self.fresh_name())
        return name

    def stop(self) -> None:
        stop_processes(self.procs.values())


def diagnose(b: busagent.bus.Bus, ps: list[Any]) -> None:
    """Where the unanswered calls are: which inbox holds them, pending or not."""
    missing = {p.call_id for p in ps if not b.redis.exists(b.keys.reply(p.call_id))}
    print(f"{len(missing)} calls unanswered", file=sys.stderr)
    for name in b.redis.hkeys(b.keys.servers):
        inbox = b.keys.inbox(name.decode())
        if not b.redis.exists(inbox):
            continue
        pending = {e["message_id"]: e["consumer"] for e in
                   b.redis.xpending_range(inbox, "workers", "-", "+", 100000)}
        found = [(i, pending.get(i)) for i, f in b.redis.xrange(inbox)
                 if f.get(b"call", b"").decode() in missing]
        info = json.loads(b.redis.hget(b.keys.servers, name) or b"{}")
        running = psutil.pid_exists(info.get("pid", 0))
        age = time.time() - info.get("heartbeat", 0)
        print(f"  {name.decode()} ({info.get('status')}, age {age:.1f} s, "
              f"process {'running' if running else 'gone'}): {len(found)} of them in its "
              f"inbox, pending to {Counter(c for _, c in found)}", file=sys.stderr)
        if found and running:
            print("   ", json.dumps(busagent.ServerClient(name.decode()).state()),
                  file=sys.stderr)
            for i, f in b.redis.xrange(inbox):
                if f.get(b"call", b"").decode() not in missing:
                    continue
                rec = json.loads(b.redis.hget(b.keys.agents, f[b"agent"]) or b"{}")
                det = b.redis.xpending_range(inbox, "workers", i, i, 1)
                print(f"    entry {i.decode()} kind={f.get(b'kind')} tries={f.get(b'tries')} "
                      f"agent on {rec.get('server')} delivered={det[0]['times_delivered']} "
                      f"idle={det[0]['time_since_delivered']}ms", file=sys.stderr)


def kill_clients(url: str, rng: random.Random) -> int:
    """CLIENT KILL up to five random connections other than this one's; how many."""
    r = redis.Redis.from_url(url)
    try:
        me = r.client_id()
        others = [c["id"] for c in r.client_list() if int(c["id"]) != me]
        victims = rng.sample(others, min(5, len(others)))
        for v in victims:
            r.client_kill_filter(_id=v)
        return len(victims)
    finally:
        r.close()


def squeeze(url: str, seconds: float) -> None:
    """Refuse every write (maxmemory under used memory, noeviction) for ``seconds``."""
    r = redis.Redis.from_url(url)
    r.config_set("maxmemory", max(int(r.info("memory")["used_memory"]) // 2, 1))

    def lift() -> None:
        for _ in range(50):  # Redis may be restarting: keep trying
            try:
                r.config_set("maxmemory", 0)
                r.close()
                return
            except redis.exceptions.RedisError:
                time.sleep(0.2)

    threading.Timer(seconds, lift).start()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=100_000)
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--redis-restarts", type=int, default=2)
    ap.add_argument("--agents", type=int, default=200)
    ap.add_argument("--workers", type=int, default=3)
    ap.add_argument("--window", type=int, default=500)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--client-kills", type=int, default=0)
    ap.add_argument("--squeezes", type=int, default=0)
    ap.add_argument("--squeeze-seconds", type=float, default=1.0)
    o = ap.parse_args()
    rng = random.Random(o.seed)
    d = tempfile.mkdtemp(prefix="busagent-soak-")
    server = embedded.start(appendonly=True, fsync="always", directory=d)
    for k, v in FAST.items():
        os.environ[k] = v
    prefix = "soak"
    b = busagent.init(server.url, prefix=prefix, call_timeout=120)
    chaos = Chaos(server.url, prefix, o.workers)
    chaos.wait_ready(b)
    agents = [Tally(f"t{i}", to_dist=True) for i in range(o.agents)]
    busagent.gather([a._created for a in agents if a._created], timeout=60)

    n_windows = -(-o.calls // o.window)
    kill_at = set(rng.sample(range(1, n_windows - 1), min(o.kills, n_windows - 2)))
    restart_at = {n_windows * (i + 1) // (o.redis_restarts + 1) for i in range(o.redis_restarts)}
    restart_at -= kill_at
    free = [x for x in range(1, n_windows - 1) if x not in kill_at and x not in restart_at]
    client_kill_at = set(rng.sample(free, min(o.client_kills, len(free))))
    free = [x for x in free if x not in client_kill_at]
    squeeze_at = set(rng.sample(free, min(o.squeezes, len(free))))
    client_kills = squeezes = killed_connections = 0
    sent: dict[str, tuple[int, str]] = {}  # call id -> (agent index, message id)
    refused = kills = restarts = 0
    worst_window = 0.0
    recoveries: list[float] = []
    t0 = time.perf_counter()
    seq = 0
    for w in range(n_windows):
        todo = [(seq + j) % o.agents for j in range(min(o.window, o.calls - seq))]
        seq += len(todo)
        while todo:
            start = time.perf_counter()
            batch = []
            for i in todo:
                m = Msg("soak", i)
                batch.append((i, m, agents[i](m)))
            b.sender.flush()
            event = None
            if w in kill_at:
                chaos.kill_one(rng, same_name=kills % 2 == 0)
                kills += 1
                kill_at.discard(w)
                event = time.perf_counter()
            elif w in restart_at:
                server.kill()
                server = embedded.start(appendonly=True, fsync="always", directory=d)
                restarts += 1
                restart_at.discard(w)
                event = time.perf_counter()
            elif w in client_kill_at:
                killed_connections += kill_clients(server.url, rng)
                client_kills += 1
                client_kill_at.discard(w)
                event = time.perf_counter()
            elif w in squeeze_at:
                squeeze(server.url, o.squeeze_seconds)
                squeezes += 1
                squeeze_at.discard(w)
                event = time.perf_counter()
            try:
                out = busagent.gather([p for _, _, p in batch], return_exceptions=True)
            except busagent.CallTimeout:
                diagnose(b, [p for _, _, p in batch])
                raise
            end = time.perf_counter()
            worst_window = max(worst_window, end - start)
            if event is not None:
                recoveries.append(end - event)
            todo = []
            for (i, m, p), r in zip(batch, out, strict=True):
                # Never accepted (Redis was down, or full, when it was sent): send again.
                if isinstance(r, busagent.BusError) and b.redis.llen(
                        b.keys.reply(p.call_id)) == 0:
                    refused += 1
                    todo.append(i)
                else:
                    sent[p.call_id] = (i, m.id)
        done = seq
        if w % 20 == 0:
            print(f"  {done:>7} calls  {kills} kills  {restarts} redis restarts  "
                  f"{time.perf_counter() - t0:6.1f} s", flush=True)
    took = time.perf_counter() - t0

    # Audit: replies per call id, and each agent's memory.
    counts: Counter[int] = Counter()
    ids = list(sent)
    for i in range(0, len(ids), 1000):
        pipe = b.redis.pipeline(transaction=False)
        for c in ids[i : i + 1000]:
            pipe.llen(b.keys.reply(c))
        counts.update(pipe.execute())
    mem_dups = mem_missing = 0
    expected: dict[int, set[str]] = {}
    for i, mid in sent.values():
        expected.setdefault(i, set()).add(mid)
    for i, a in enumerate(agents):
        got = [m.id for m in a.memory.get()]
        mem_dups += len(got) - len(set(got))
        mem_missing += len(expected.get(i, set()) - set(got))
    result = {
        "calls": len(sent), "kills": kills, "redis_restarts": restarts,
        "client_kills": client_kills, "connections_killed": killed_connections,
        "memory_squeezes": squeezes,
        "answered_once": counts[1], "lost": counts[0],
        "duplicated": sum(v for k, v in counts.items() if k > 1),
        "memory_duplicates": mem_dups, "memory_missing": mem_missing,
        "refused_while_redis_down_or_full_and_resent": refused,
        "worst_recovery_s": round(max(recoveries, default=0.0), 2),
        "worst_window_s": round(worst_window, 2), "seconds": round(took, 1),
        "calls_per_s": round(len(sent) / took),
    }
    chaos.stop()
    busagent.shutdown()
    server.stop()
    print(json.dumps(result, indent=2))
    out = HERE.parent / "results"
    out.mkdir(exist_ok=True)
    (out / "soak.json").write_text(json.dumps({"result": result, "args": vars(o)}, indent=2))
    bad = result["lost"] or result["duplicated"] or mem_dups or mem_missing
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
