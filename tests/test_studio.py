"""busagent studio: the JSON API, /metrics, the token, and the page in a real browser
(Debian's chromium driven by Playwright), over real worker processes and a real Redis."""

from __future__ import annotations

import concurrent.futures
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

import busagent
from busagent import Hub, Msg, Placeholder
from busagent.protocol import CallBody, Entry, deadletter

from .agents import Adder
from .conftest import ROOT, Workers, wait_for
from .studio_agents import Boom, Keeper
from .studio_fixtures import Studio, running_studio

CHROMIUM = "/usr/bin/chromium"
CHROME_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run"]
MODULES = ("tests.agents", "tests.studio_agents")


def _dead_letter(b: busagent.bus.Bus, agent_id: str, content: Any) -> tuple[str, str]:
    """A call to ``agent_id`` in the dead-letter stream as recovery leaves one (reason, tries,
    server): the entry id and its call id."""
    call = busagent.bus.new_id()
    body = CallBody(args=[Msg("user", content)]).pack()
    fields = {k.encode(): str(v).encode() if not isinstance(v, bytes) else v
              for k, v in Entry.new(None, "call", body, call=call, agent=agent_id,
                                    caller="test").fields().items()}
    fields[b"tries"] = b"3"
    entry = b.redis.xadd(b.keys.deadletter, deadletter(fields, "worker died 3 times", "gone-1"))
    return entry.decode(), call


@pytest.fixture
def studio(bus: busagent.bus.Bus, redis_url: str, prefix: str) -> Iterator[Studio]:
    with running_studio(redis_url, prefix) as s:
        yield s


def _off_loop(fn: Any) -> Any:
    """Playwright's sync API runs an event loop in this thread, where busagent refuses a
    blocking read: resolve on another thread."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(fn).result()


def test_api_reads_servers_agents_memory_calls_and_metrics(workers: Workers,
                                                          studio: Studio) -> None:
    workers.start("s1", *MODULES)
    workers.start("s2", *MODULES)
    # Past 128 entries Redis keeps a hash as a table, so HSCAN really pages.
    ags = busagent.create_many(Keeper, [f"t{i}" for i in range(300)])
    for a in ags:
        a.ready(timeout=30)
    busagent.gather([a(Msg("user", i)) for i, a in enumerate(ags[:30])], timeout=30)
    boom = Boom("boom", to_dist=True)
    with pytest.raises(busagent.RemoteError):
        boom(None).result(timeout=30)

    # Servers: both, with the counters the workers now publish.
    def counted() -> list[dict[str, Any]] | None:
        rows = studio.get("/api/servers").json()
        done = sum(s["calls"] for s in rows) >= 31 and sum(s["errors"] for s in rows) >= 1
        return rows if done and len(rows) == 2 else None
    rows = wait_for(counted, 15, "heartbeats with the call counters")
    assert {s["name"] for s in rows} == {"s1", "s2"}
    assert all(s["state"] == "up" and s["mem"] > 0 and s["p50"] is not None for s in rows)

    # Agents: pages with a cursor until the end, every agent exactly once.
    seen: list[str] = []
    cursor, pages = 0, 0
    while True:
        pages += 1
        page = studio.get("/api/agents", params={"cursor": cursor, "count": 7}).json()
        seen += [a["id"] for a in page["items"]]
        cursor = page["cursor"]
        if cursor == "0":
            break
    assert sorted(seen) == sorted([a.agent_id for a in ags] + [boom.agent_id])
    assert pages > 10
    found = studio.get("/api/agents", params={"q": "t217"}).json()["items"]
    assert [a["name"] for a in found] == ["t217"]
    found = studio.get("/api/agents", params={"q": "t1", "count": 500}).json()["items"]
    assert sorted(a["name"] for a in found) == sorted(a.name for a in ags if "t1" in a.name)
    on_s1 = studio.get("/api/agents", params={"server": "s1", "count": 500}).json()["items"]
    assert on_s1 and all(a["server"] == "s1" for a in on_s1)
    assert studio.get("/api/agents", params={"cls": "Boom"}).json()["items"][0]["name"] == "boom"
    assert studio.get("/api/agents", params={"count": "x"}).status_code == 400

    one = studio.get(f"/api/agents/{ags[5].agent_id}").json()
    assert one["cls"].endswith(":Keeper") and one["args"] == ["t5"]
    assert one["memory"]["total"] == 1 and one["memory"]["items"][0]["content"] == 5
    assert studio.get("/api/agents/nope").status_code == 404

    # /metrics parses with Prometheus' own parser and carries the counters.
    text = studio.get("/metrics").text
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    calls = {s.labels["server"]: s.value for s in fams["busagent_calls"].samples
             if s.name == "busagent_calls_total"}
    assert set(calls) == {"s1", "s2"} and sum(calls.values()) >= 31
    errs = sum(s.value for s in fams["busagent_call_errors"].samples
               if s.name == "busagent_call_errors_total")
    assert errs >= 1
    inf = [s for s in fams["busagent_call_duration_seconds"].samples
           if s.name.endswith("_bucket") and s.labels["le"] == "+Inf"]
    assert sum(s.value for s in inf) == sum(calls.values())
    assert fams["busagent_registered_agents"].samples[0].value == 301
    assert {s.labels["server"] for s in fams["busagent_server_memory_bytes"].samples} == {
        "s1", "s2"}


def test_calls_now_lists_a_running_call(workers: Workers, studio: Studio) -> None:
    from .studio_agents import Slow

    workers.start("s1", *MODULES)
    slow = Slow("slow", seconds=3.0, to_dist=True)
    slow.ready(timeout=30)
    p = slow(None)
    running = wait_for(lambda: studio.get("/api/calls").json(), 10, "the call to be listed")
    assert running[0]["agent"] == slow.agent_id and running[0]["kind"] == "call"
    assert running[0]["call"] == p.call_id and running[0]["server"] == "s1"
    p.result(timeout=30)
    wait_for(lambda: studio.get("/api/calls").json() == [], 10, "the call to leave the list")


def test_changes_need_the_token(workers: Workers, studio: Studio) -> None:
    workers.start("s1", *MODULES)
    a = Adder("keep", to_dist=True)
    a.ready(timeout=30)
    for method, path in [("DELETE", f"/api/agents/{a.agent_id}"), ("POST", "/api/servers/s1/stop"),
                         ("POST", "/api/servers/s1/drain"), ("DELETE", "/api/servers/s1"),
                         ("POST", "/api/deadletters/1-0/replay")]:
        for tok in (None, "wrong"):
            r = studio.send(method, path, token=tok)
            assert r.status_code == 401, (method, path, r.text)
            assert "token" in r.json()["error"]
    assert busagent.ServerClient("s1").is_alive()
    assert busagent.admin.agent_info(a.agent_id).server == "s1"
    # Bad input with the token: a clear error, nothing lost.
    r = studio.send("DELETE", "/api/servers/s1")
    assert r.status_code == 400 and "only a dead server" in r.json()["error"]
    r = studio.send("POST", "/api/servers/s1/reboot")
    assert r.status_code == 400
    assert studio.send("DELETE", "/api/agents/none").status_code == 404
    assert busagent.ServerClient("s1").is_alive()


def test_forget_a_dead_server_and_models_masked(workers: Workers, studio: Studio,
                                                raw: redis.Redis, prefix: str) -> None:
    busagent.load_model_configs({"config_name": "gpt", "model_type": "openai_chat",
                                 "model_name": "m", "api_key": "sk-very-secret",
                                 "client_args": {"base_url": "http://x/v1", "auth_token": "t0p"}})
    shown = studio.get("/api/models").json()
    assert shown[0]["api_key"] == "***" and shown[0]["client_args"]["auth_token"] == "***"
    assert "sk-very-secret" not in studio.get("/api/models").text

    p = workers.start("s1", *MODULES)
    p.kill()
    p.wait()
    wait_for(lambda: [s["state"] for s in studio.get("/api/servers").json()] == ["dead"], 15,
             "s1 to be shown dead")
    r = studio.send("DELETE", "/api/servers/s1")
    assert r.status_code == 200, r.text
    assert raw.hget(f"{prefix}:servers", "s1") is None
    assert studio.send("DELETE", "/api/servers/s1").status_code == 404


def test_a_token_is_made_and_printed_when_none_is_given(bus: busagent.bus.Bus, redis_url: str,
                                                       prefix: str) -> None:
    import httpx

    from .studio_fixtures import free_port

    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.Popen([sys.executable, "-m", "busagent.cli", "studio", "--redis", redis_url,
                          "--prefix", prefix, "--port", str(port)], stdout=subprocess.PIPE,
                         text=True, env=env, cwd=ROOT)
    try:
        assert p.stdout is not None
        line = p.stdout.readline()
        assert line.startswith(f"busagent studio on http://127.0.0.1:{port}/?token=")
        token = line.strip().rsplit("=", 1)[1]
        assert len(token) >= 24

        def answers() -> bool:
            try:
                return httpx.get(f"http://127.0.0.1:{port}/api/summary").status_code == 200
            except httpx.TransportError:
                return False
        wait_for(answers, 30, "the studio")
        url = f"http://127.0.0.1:{port}/api/agents/none"
        assert httpx.delete(url).status_code == 401
        ok = httpx.delete(url, headers={"Authorization": f"Bearer {token}"})
        assert ok.status_code == 404  # past the gate: no such agent
    finally:
        p.terminate()
        p.wait(10)


def test_binding_beyond_loopback_needs_a_token(redis_url: str, prefix: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "busagent.cli", "studio", "--host", "0.0.0.0",
                        "--redis", redis_url, "--prefix", prefix],
                       capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 1
    assert r.stderr.startswith("error: refusing to listen on 0.0.0.0 without a token")
    assert r.stderr.count("\n") == 1


def test_page_in_a_real_browser(workers: Workers, studio: Studio, raw: redis.Redis,
                                prefix: str) -> None:
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} is missing: .ci/run installs Debian's chromium")
        pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium)")
    from playwright.sync_api import expect, sync_playwright

    shots = os.environ.get("BUSAGENT_SCREENSHOTS")
    b = busagent.bus.current()
    workers.start("s1", *MODULES)
    workers.start("s2", *MODULES)
    ags = busagent.create_many(Keeper, [f"agent-{i:03d}" for i in range(100)])
    for a in ags:
        a.ready(timeout=30)
    target = ags[42]
    busagent.gather([target(Msg("user", "remember me")), ags[7](Msg("user", 1))], timeout=30)
    busagent.fanout(ags, Msg("user", 2))
    hub = Hub("room")
    hub.join(ags[1], role="writer")
    hub.join(ags[2], role="critic")
    hub.publish(Msg("user", "first words"))
    entry, call = _dead_letter(b, ags[3].agent_id, 40)

    with sync_playwright() as pw:
        # Deadlines, not speed: five other test runs may share these two cores.
        expect.set_options(timeout=20_000)
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROME_ARGS)
        page = browser.new_page(viewport={"width": 1500, "height": 900})
        page.set_default_timeout(20_000)
        page.on("dialog", lambda d: d.accept())
        script_errors: list[str] = []
        page.on("pageerror", lambda e: script_errors.append(str(e)))
        page.goto(f"{studio.url}/?token={studio.token}#servers")

        # Servers: both, with cpu and memory.
        for name in ("s1", "s2"):
            row = page.locator(f'#servers-table tr[data-server="{name}"]')
            expect(row.locator("td.cpu")).to_contain_text("%", timeout=15000)
            expect(row.locator("td.mem")).to_contain_text("MiB")
            expect(row.locator(".badge")).to_have_text("up")
        expect(page.locator("#summary")).to_contain_text("100")
        if shots:
            page.wait_for_timeout(1500)  # a few samples for the sparklines
            page.screenshot(path=f"{shots}/studio-servers.png")

        # Agents: find one by name, open it, see its memory, delete it.
        page.click('a[href="#agents"]')
        page.fill("#agent-q", "agent-042")
        page.click("#agent-search")
        link = page.locator("#agents-table tbody tr a")
        expect(link).to_have_count(1)
        expect(link).to_have_text("agent-042")
        if shots:
            page.fill("#agent-q", "")
            page.click("#agent-search")
            expect(page.locator("#agents-table tbody tr").first).to_be_visible()
            page.screenshot(path=f"{shots}/studio-agents.png")
            page.fill("#agent-q", "agent-042")
            page.click("#agent-search")
            expect(link).to_have_count(1)
        link.click()
        expect(page.locator("#agent-name")).to_have_text("agent-042")
        expect(page.locator("#agent-memory")).to_contain_text("remember me")
        if shots:
            page.screenshot(path=f"{shots}/studio-agent.png")
        page.click("#agent-delete")
        wait_for(lambda: raw.hget(f"{prefix}:agents", target.agent_id) is None, 15,
                 "the agent to leave the registry")

        # Dead letters: shown with its reason, replayed, answered.
        page.goto(f"{studio.url}/#deadletters")
        row = page.locator(f'#dead-table tr[data-entry="{entry}"]')
        expect(row.locator(".reason")).to_have_text("worker died 3 times")
        if shots:
            page.screenshot(path=f"{shots}/studio-deadletters.png")
        row.locator("button.replay").click()
        assert _off_loop(lambda: Placeholder.from_id(call).result(timeout=30)).content == (
            "heard 40")
        wait_for(lambda: raw.xlen(f"{prefix}:deadletter") == 0, 10, "the entry to go")

        # Hub: members and a live transcript.
        page.goto(f"{studio.url}/#hub/room")
        expect(page.locator("#hub-members")).to_contain_text("critic")
        expect(page.locator("#transcript")).to_contain_text("first words")
        hub.publish(Msg("moderator", "a live one"))
        expect(page.locator("#transcript .msg")).to_have_count(2, timeout=10000)
        expect(page.locator("#transcript")).to_contain_text("a live one")
        if shots:
            page.screenshot(path=f"{shots}/studio-hub.png")
            page.goto(f"{studio.url}/#charts")
            _off_loop(lambda: busagent.gather(busagent.fanout(ags[50:], Msg("user", 3)),
                                              timeout=30))
            page.wait_for_timeout(2000)
            page.screenshot(path=f"{shots}/studio-charts.png")

        # Every other view draws without a script error.
        for view, sel in [("calls", "#calls-table"), ("hubs", "#hubs-table"),
                          ("logs/s1", "#log-lines"), ("models", "#models-table"),
                          ("charts", "#chart-rate .uplot")]:
            page.goto(f"{studio.url}/#{view}")
            expect(page.locator(sel)).to_be_visible()
        page.goto(f"{studio.url}/#hubs")
        expect(page.locator("#hubs-table")).to_contain_text("room")
        assert script_errors == []

        # A page without the token: the drain is refused with a reason, nothing happens.
        anon = browser.new_page()
        anon.set_default_timeout(20_000)
        anon.on("dialog", lambda d: d.accept())
        anon.goto(f"{studio.url}/#servers")
        expect(anon.locator("#token-state")).to_contain_text("read-only")
        anon.locator('#servers-table tr[data-server="s2"] button.drain').click()
        expect(anon.locator("#flash")).to_contain_text("needs the studio's token")
        assert busagent.ServerClient("s2").is_alive()

        # Drain s2 with the token: its agents move to s1, it leaves the registry.
        page.goto(f"{studio.url}/#servers")
        page.locator('#servers-table tr[data-server="s2"] button.drain').click()
        wait_for(lambda: raw.hget(f"{prefix}:servers", "s2") is None, 30, "s2 to drain")
        assert {a["server"] for a in busagent.agents()} == {"s1"}
        assert len(busagent.agents()) == 99
        expect(page.locator('#servers-table tr[data-server="s2"]')).to_have_count(0,
                                                                                  timeout=10000)
        browser.close()
    if shots:
        assert all(Path(shots, f"studio-{n}.png").exists() for n in ("servers", "agents"))


def test_static_assets_ship_with_their_licence() -> None:
    # The page needs no build step: its files are package data, the vendored chart library
    # beside its licence.
    static = Path(busagent.__file__).parent / "studio" / "static"
    for name in ("index.html", "app.js", "style.css", "vendor/uPlot.iife.min.js",
                 "vendor/uPlot.LICENSE"):
        assert (static / name).is_file(), name
    assert "MIT" in (static / "vendor" / "uPlot.LICENSE").read_text()
