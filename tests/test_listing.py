"""Listing agents is paged (HSCAN cursors in the API and the CLI) and streamed (issue 16, item 6):
no single command or reply grows with the number of agents."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import redis

import busagent
from busagent import ServerClient, embedded
from busagent.admin import agent_page, agents, iter_agents
from busagent.records import AgentInfo
from tests.agents import Adder

from .conftest import Workers
from .test_cli import cli, js

N = 5000


@pytest.fixture
def registry(prefix: str) -> Iterator[tuple[str, redis.Redis]]:
    """A Redis of its own holding N registry records on servers s0..s3 (no workers): its command
    statistics are this test's alone."""
    server = embedded.start()
    r = redis.Redis.from_url(server.url)
    records = {f"id{i:05d}": AgentInfo(id=f"id{i:05d}", name=f"n{i}", cls="tests.agents:Adder",
                                       server=f"s{i % 4}", created=0.0).model_dump_json()
               for i in range(N)}
    r.hset(f"{prefix}:agents", mapping=records)  # type: ignore[arg-type]
    busagent.init(server.url, prefix=prefix)
    r.config_resetstat()
    try:
        yield server.url, r
    finally:
        busagent.shutdown()
        r.close()
        server.stop()


def _calls(r: redis.Redis, cmd: str) -> int:
    return int(r.info("commandstats").get(f"cmdstat_{cmd}", {}).get("calls", 0))


def test_listing_is_paged_by_cursor_and_never_one_growing_command(
        registry: tuple[str, redis.Redis], prefix: str) -> None:
    url, r = registry
    # The API: cursors from 0 back to 0 cover every record once.
    seen: list[str] = []
    cursor, pages = 0, 0
    while True:
        cursor, rows = agent_page(cursor, 500)
        seen += [a["id"] for a in rows]
        pages += 1
        if cursor == 0:
            break
    assert sorted(seen) == [f"id{i:05d}" for i in range(N)] and pages > 1
    assert {a["id"] for a in iter_agents("s1")} == {f"id{i:05d}" for i in range(1, N, 4)}
    names = [a["name"] for a in agents("s2")]
    assert names == sorted(f"n{i}" for i in range(2, N, 4))  # sorted by name
    # The CLI: pages by --limit/--cursor add up to the whole; the full listing streams valid
    # JSON and a table.
    ids: list[str] = []
    cursor = 0
    while True:
        p = cli(url, prefix, "agents", "--json", "--limit", "1000", "--cursor", str(cursor))
        ids += [a["id"] for a in js(p)]
        cursor = int(p.stderr.strip().rsplit(" ", 1)[1])
        if cursor == 0:
            break
    assert sorted(ids) == sorted(seen)
    full = cli(url, prefix, "agents", "--json", "--server", "s3")
    assert {a["id"] for a in js(full)} == {f"id{i:05d}" for i in range(3, N, 4)}
    table = cli(url, prefix, "agents").stdout.splitlines()
    assert table[0].split("\t") == ["id", "name", "cls", "server", "namespace", "registered",
                                     "lifetime"] and len(table) == N + 1
    # Nothing read the registry in one command.
    assert _calls(r, "hgetall") == 0 and _calls(r, "hvals") == 0 and _calls(r, "hkeys") == 0
    assert _calls(r, "hscan") >= N // 1000
    assert json.loads(r.hget(f"{prefix}:agents", "id00000") or b"")["server"] == "s0"


def test_a_server_lists_more_agents_than_one_reply_could_hold(
        workers: Workers, bus: busagent.bus.Bus) -> None:
    # 64 KiB per message on the worker: the whole list (~100 bytes an agent) is far larger.
    workers.start("w1", env={"BUSAGENT_MAX_MESSAGE_BYTES": str(64 * 1024)})
    made = busagent.create_many(Adder, [f"a{i}" for i in range(2000)],
                                to_dist=busagent.DistConf(server="w1"))
    made[-1].ready(timeout=60)
    made[0](busagent.Msg("user", 1)).result(timeout=30)
    listed = ServerClient("w1").get_agent_list()
    assert sorted(x["name"] for x in listed) == sorted(f"a{i}" for i in range(2000))
    sizes = {x["name"]: x["memory_size"] for x in listed}
    assert sizes["a0"] == 1 and sizes["a1"] == 0
    assert {x["cls"] for x in listed} == {"tests.agents:Adder"}
