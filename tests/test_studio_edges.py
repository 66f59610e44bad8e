"""The studio's edges a new user hit: assets from an installed package, rates between
heartbeats, masked secrets, bad input (400) and unknown names (404), exact pages, a bad or busy
port, a dead server's uptime. Over a real redis-server and real ``busagent studio`` processes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import busagent
from busagent.records import AgentInfo, ServerInfo, redis_time
from busagent.studio import data
from busagent.studio.app import Sampler

from .conftest import FAST, wait_for
from .studio_fixtures import TOKEN, Studio, free_port, running_studio


@pytest.fixture
def studio(bus: busagent.bus.Bus, redis_url: str, prefix: str) -> Iterator[Studio]:
    with running_studio(redis_url, prefix) as s:
        yield s


def _user_env() -> dict[str, str]:
    """The user's shell: nothing pointing into this checkout (as tests/test_packaging.py)."""
    return {k: v for k, v in {**os.environ, **FAST}.items()
            if k not in ("PYTHONPATH", "MYPYPATH")}


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "busagent.cli", *args], cwd=cwd,
                          env=_user_env(), capture_output=True, text=True, timeout=60)


def test_static_assets_are_served_from_the_installed_package(
        bus: busagent.bus.Bus, redis_url: str, prefix: str, tmp_path: Path) -> None:
    # From outside the checkout the package is the README's strict editable install, whose
    # files are symlinks: the page's assets must still be served.
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "busagent.cli", "studio", "--redis", redis_url, "--prefix",
         prefix, "--port", str(port), "--token", TOKEN],
        cwd=tmp_path, env=_user_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        def up() -> bool:
            assert proc.poll() is None, f"studio exited with {proc.returncode}"
            try:
                return httpx.get(url + "/api/summary", timeout=5).status_code == 200
            except httpx.TransportError:
                return False
        wait_for(up, 30, "the studio to answer")
        where = subprocess.run(
            [sys.executable, "-c", "import busagent.studio as s; print(s.__file__)"],
            cwd=tmp_path, env=_user_env(), capture_output=True, text=True, check=True)
        assert not where.stdout.startswith(str(Path(__file__).parents[1] / "busagent"))
        page = httpx.get(url + "/", timeout=10)
        assert page.status_code == 200 and "app.js" in page.text
        for asset in ("app.js", "style.css", "vendor/uPlot.iife.min.js"):
            got = httpx.get(f"{url}/static/{asset}", timeout=10)
            assert got.status_code == 200 and len(got.content) > 100, asset
        assert httpx.get(url + "/static/nope.js", timeout=10).status_code == 404
    finally:
        proc.terminate()
        proc.wait(10)


def _server(b: busagent.bus.Bus, name: str, **kw: Any) -> None:
    rec = {"name": name, "host": "h", "pid": 1, "started": kw.pop("started", 0.0),
           "capacity": 10, **kw}
    b.redis.hset(b.keys.servers, name, ServerInfo(**rec).model_dump_json())


def _now(b: busagent.bus.Bus) -> float:
    return redis_time(b.redis.time())


def test_rates_are_taken_between_heartbeats_not_between_samples(bus: busagent.bus.Bus) -> None:
    t = _now(bus)
    sampler = Sampler(0.1)
    _server(bus, "w", started=t - 10, heartbeat=t, calls=100, errors=10, rate=3.0)
    sampler.sample()
    # The next heartbeat 2 s (Redis clock) later: 40 calls, 20 of them errors.
    _server(bus, "w", started=t - 10, heartbeat=t + 2, calls=140, errors=30)
    sampler.sample()
    # Samples between heartbeats: the same heartbeat's rates, not 0.
    sampler.sample()
    sampler.sample()
    rows = [s["servers"]["w"] for s in list(sampler.samples)[1:]]
    assert [(r["rate"], r["err"]) for r in rows] == [(20.0, 10.0)] * 3
    assert [(s["rate"], s["err"]) for s in list(sampler.samples)[1:]] == [(20.0, 10.0)] * 3
    # A worker restarted under the name (counters from 0, a later beat): no negative rate.
    _server(bus, "w", started=t + 3, heartbeat=t + 4, calls=2, errors=0)
    sampler.sample()
    assert sampler.samples[-1]["servers"]["w"]["err"] == 0.0
    assert sampler.samples[-1]["servers"]["w"]["rate"] >= 0.0


SECRETS = ["sk-TOPKEY", "pw-INURL", "hdr-BEARER", "xkey-HDR", "tok-DEEP", "pw-DEEP",
           "qs-KEY", "proxy-PW"]


def test_model_secrets_are_masked_at_any_depth(studio: Studio, redis_url: str,
                                               prefix: str) -> None:
    busagent.load_model_configs([{
        "config_name": "m1", "model_type": "openai_chat", "model_name": "gpt",
        "api_key": "sk-TOPKEY", "base_url": "http://user:pw-INURL@llm.local:8000/v1",
        "client_args": {"default_headers": {"Authorization": "Bearer hdr-BEARER",
                                            "X-Api-Key": "xkey-HDR"},
                        "http": {"auth": {"token": "tok-DEEP", "password": "pw-DEEP"}},
                        "proxy": "https://me:proxy-PW@proxy.local"},
        "generate_args": {"max_tokens": 77, "extra_url": "https://x.local/?api_key=qs-KEY"},
    }])
    shown = studio.get("/api/models")
    assert shown.status_code == 200
    cli_json = _cli("models", "--json", "--redis", redis_url, "--prefix", prefix)
    cli_table = _cli("models", "--redis", redis_url, "--prefix", prefix)
    assert cli_json.returncode == 0 and cli_table.returncode == 0, cli_json.stderr
    for text in (shown.text, cli_json.stdout, cli_table.stdout):
        leaked = [s for s in SECRETS if s in text]
        assert not leaked, text
    m = shown.json()[0]
    assert json.loads(cli_json.stdout)[0] == m
    # What is not secret stays readable, masks keep their place.
    assert m["base_url"] == "http://user:***@llm.local:8000/v1"
    assert m["generate_args"]["max_tokens"] == 77
    assert m["client_args"]["default_headers"]["Authorization"] == "***"
    assert m["client_args"]["http"]["auth"] == "***"
    assert m["api_key"] == "***"


def _hub_and_logs(b: busagent.bus.Bus) -> None:
    b.redis.xadd(b.keys.hub("h1"), {"from": "x", "to": "[]", "msg": b"?"})
    b.redis.xadd(b.keys.logs("w1"), {"t": "1", "level": "INFO", "logger": "l", "msg": "hi"})


BAD = [
    "/api/agents?cursor=-1", "/api/agents?cursor=zzz", "/api/agents?cursor=99999999999999999999",
    "/api/agents?cursor=1.5x&count=-1", "/api/agents?count=0", "/api/agents?count=-1",
    "/api/agents?count=1&q=x&cursor=-3", "/api/agents/a1?mem_count=0",
    "/api/deadletters?count=-1", "/api/deadletters?count=0",
    "/api/hubs/h1/messages?after=zzz", "/api/hubs/h1/messages?after=1-2-3",
    "/api/hubs/h1/messages?after=99999999999999999999999", "/api/hubs/h1/messages?count=0",
    "/api/logs/w1?after=zzz", "/api/logs/w1?after=-5", "/api/logs/w1?count=-1",
    "/api/hubs/h1/events?after=bogus",
]


def test_bad_input_is_a_400_with_one_line(studio: Studio, bus: busagent.bus.Bus) -> None:
    _hub_and_logs(bus)
    wrong = {}
    for path in BAD:
        # A stream that answered 200 would never end: read the status line only.
        with httpx.stream("GET", studio.url + path, timeout=15) as got:
            err = json.loads(got.read())["error"] if got.status_code == 400 else ""
            if got.status_code != 400 or not err or "\n" in err:
                wrong[path] = got.status_code
    assert not wrong


def test_the_same_inputs_well_formed_answer(studio: Studio, bus: busagent.bus.Bus) -> None:
    _hub_and_logs(bus)
    got: Any = bus.redis.xrange(bus.keys.hub("h1"))
    seq = got[0][0].decode()
    for path in ("/api/agents?cursor=0&count=1", f"/api/hubs/h1/messages?after={seq}",
                 "/api/logs/w1?after=0-0", "/api/deadletters?count=1", "/api/hubs/h1"):
        assert studio.get(path).status_code == 200, path
    with httpx.stream("GET", studio.url + f"/api/hubs/h1/events?after={seq}",
                      timeout=10) as r:
        assert r.status_code == 200


def test_unknown_hubs_and_servers_are_404(studio: Studio, bus: busagent.bus.Bus) -> None:
    _hub_and_logs(bus)
    wrong = {}
    for path in ("/api/logs/nope", "/api/logs/nope?after=0-0", "/api/hubs/nope",
                 "/api/hubs/nope/messages", "/api/hubs/nope/events"):
        with httpx.stream("GET", studio.url + path, timeout=15) as got:
            kind = json.loads(got.read()).get("type") if got.status_code == 404 else None
            if kind != "UnknownName":
                wrong[path] = got.status_code
    assert not wrong


def _agents(b: busagent.bus.Bus, n: int) -> dict[str, str]:
    names = {f"id{i:04d}": f"{'odd' if i % 2 else 'even'}-{i}" for i in range(n)}
    b.redis.hset(b.keys.agents, mapping={
        i: AgentInfo(id=i, name=name, cls="m:K", server="s1" if int(i[2:]) % 3 else "s2",
                     created=0.0).model_dump_json() for i, name in names.items()})
    return names


@pytest.mark.parametrize("registry", [40, 300])  # a small hash comes whole; a big one pages
@pytest.mark.parametrize(("count", "query"), [
    (1, {}), (3, {}), (7, {}), (1, {"q": "odd"}), (3, {"q": "odd"}), (5, {"server": "s2"}),
    (2, {"cls": "K", "q": "even"}),
])
def test_count_is_a_page_size_and_the_cursor_goes_on_exactly(
        studio: Studio, bus: busagent.bus.Bus, registry: int, count: int,
        query: dict[str, str]) -> None:
    names = _agents(bus, registry)
    want = {i for i, n in names.items()
            if ("q" not in query or query["q"] in n)
            and ("server" not in query or (query["server"] == "s2") == (int(i[2:]) % 3 == 0))}
    seen: list[str] = []
    cursor, pages = "0", 0
    client = httpx.Client(base_url=studio.url, timeout=15)
    while True:
        page = client.get("/api/agents", params={"cursor": cursor, "count": count, **query})
        assert page.status_code == 200, page.text
        body = page.json()
        assert len(body["items"]) <= count
        seen += [a["id"] for a in body["items"]]
        cursor, pages = body["cursor"], pages + 1
        if cursor == "0":
            break
        assert pages < 2 * registry
    client.close()
    assert len(seen) == len(set(seen)) and set(seen) == want
    if registry < 100:  # nothing to search through between matches: every page but the last full
        assert pages == -(-len(want) // count) or pages == -(-len(want) // count) + 1


def test_studio_refuses_a_bad_or_busy_port_in_one_line(redis_url: str, prefix: str) -> None:
    base = ["studio", "--redis", redis_url, "--prefix", prefix, "--token", TOKEN]
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = str(busy.getsockname()[1])
        for port, says in (("99999", "0 to 65535"), ("-1", "0 to 65535"), (taken, "in use")):
            got = _cli(*base, "--port", port)
            assert got.returncode == 1, (port, got.returncode, got.stderr)
            lines = got.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], (
                port, got.stderr)
            assert "http://" not in got.stdout and "token" not in got.stdout


def test_a_dead_servers_uptime_stops_at_its_last_heartbeat(bus: busagent.bus.Bus) -> None:
    t = _now(bus)
    _server(bus, "gone", started=t - 500, heartbeat=t - 200, status="dead")
    _server(bus, "silent", started=t - 500, heartbeat=t - 100)  # dead by silence
    _server(bus, "live", started=t - 30, heartbeat=t)
    rows = {s["name"]: s for s in data.servers()}
    assert rows["gone"]["state"] == "dead" and rows["silent"]["state"] == "dead"
    assert rows["gone"]["uptime"] == pytest.approx(300, abs=1)
    assert rows["silent"]["uptime"] == pytest.approx(400, abs=1)
    assert rows["live"]["uptime"] == pytest.approx(30, abs=5)
