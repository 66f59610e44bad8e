"""Populations (issue 14): sampling from a config, reproducible from the seed, backgrounds
written by an LLM through the bus (real worker and redis-server, the fake endpoint), a killed
build resumed without duplicates; models on the openai client with token usage."""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from busagent import population
from busagent.errors import ConfigError, ModelError
from busagent.fakellm import FakeLLM

from .conftest import ROOT, Workers, wait_for

CONFIG = ROOT / "examples" / "populations" / "people.yaml"


def rows_of(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def within(count: int, n: int, p: float) -> bool:
    """A binomial count within 4.5 standard deviations of n*p (fails ~1 in 150,000 runs)."""
    return abs(count - n * p) <= 4.5 * math.sqrt(n * p * (1 - p)) + 1


def test_sampled_counts_match_the_weights_and_conditions(tmp_path: Path) -> None:
    n = 600
    cfg = population.load_config(CONFIG, count=n)
    population.build(cfg, tmp_path / "p.jsonl", progress=False)
    rows = rows_of(tmp_path / "p.jsonl")
    assert sorted(r["id"] for r in rows) == list(range(n))
    attrs = [r["attributes"] for r in rows]
    groups = Counter(a["age_group"] for a in attrs)
    for value, weight in {"18-29": 0.3, "30-49": 0.4, "50+": 0.3}.items():
        assert within(groups[value], n, weight), (value, groups)
    edu = Counter(a["education"] for a in attrs)
    for value, weight in {"secondary": 0.35, "bachelor": 0.35, "master": 0.2, "phd": 0.1}.items():
        assert within(edu[value], n, weight), (value, edu)
    # conditional: the young get only their own occupations, the rest only theirs
    young = [a for a in attrs if a["age_group"] == "18-29"]
    assert {a["occupation"] for a in young} == {"student", "clerk", "engineer"}
    assert within(sum(a["occupation"] == "student" for a in young), len(young), 0.5)
    assert not {a["occupation"] for a in attrs if a["age_group"] != "18-29"} & {"student",
                                                                                "clerk"}
    assert all(18 <= a["age"] <= 29 for a in young)
    assert all(50 <= a["age"] <= 80 for a in attrs if a["age_group"] == "50+")
    incomes = [a["income"] for a in attrs]
    assert all(isinstance(v, int) and 0 <= v <= 200000 for v in incomes)
    assert abs(sum(incomes) / n - 45000) < 4.5 * 15000 / math.sqrt(n)
    assert all(0 <= a["risk_taking"] <= 1 for a in attrs)
    # attribute-only background from the template, provenance on every row
    r = rows[0]
    assert r["background"].startswith(f"I am {r['attributes']['age']} years old")
    assert r["provenance"] == {"config_hash": cfg.digest(), "seed": 7, "model": None}


def test_same_seed_same_people_whatever_the_count(tmp_path: Path) -> None:
    cfg = population.load_config(CONFIG, count=200)
    population.build(cfg, tmp_path / "a.jsonl", progress=False)
    population.build(cfg, tmp_path / "b.jsonl", progress=False)
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    # more people later: the first 200 are kept, the next ones are the same as built at once
    report = population.build(population.load_config(CONFIG, count=300), tmp_path / "a.jsonl",
                              progress=False)
    assert (report.kept, report.written) == (200, 100)
    population.build(population.load_config(CONFIG, count=300), tmp_path / "c.jsonl",
                     progress=False)
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "c.jsonl").read_bytes()
    other = population.load_config(CONFIG, count=200, seed=8)
    population.build(other, tmp_path / "d.jsonl", progress=False)
    assert rows_of(tmp_path / "d.jsonl")[0]["attributes"] != rows_of(
        tmp_path / "a.jsonl")[0]["attributes"]
    # another config's file is never mixed into
    with pytest.raises(ConfigError, match="another config"):
        population.build(other, tmp_path / "a.jsonl", progress=False)


def test_a_half_written_row_is_rebuilt_not_duplicated(tmp_path: Path) -> None:
    cfg = population.load_config(CONFIG, count=50)
    out = tmp_path / "p.jsonl"
    population.build(population.load_config(CONFIG, count=20), out, progress=False)
    whole = out.read_bytes()
    out.write_bytes(whole + b'{"id": 20, "attributes": {"age_gr')  # killed mid-write
    report = population.build(cfg, out, progress=False)
    assert (report.kept, report.written) == (20, 30)
    ids = [r["id"] for r in rows_of(out)]
    assert sorted(ids) == list(range(50)) and len(ids) == len(set(ids))


@pytest.mark.parametrize(("config", "says"), [
    ({"count": 3, "attributes": {"a": {"type": "conditional", "on": "b", "cases": {}}}},
     "'b', which is not an attribute"),
    ({"count": 3, "attributes": {
        "a": {"type": "conditional", "on": "b", "cases": {"x": {"type": "integer", "low": 1,
                                                                "high": 2}}},
        "b": {"type": "conditional", "on": "a", "cases": {}}}}, "circle"),
    ({"count": 3, "attributes": {"a": {"type": "gaussian", "mean": 1}}}, "attributes.a"),
    ({"count": 3, "attributes": {"a": {"type": "categorical", "values": {"x": -1}}}},
     "weights"),
    ({"count": 3, "attributes": {"a": {"type": "categorical", "values": []}}}, "at least one"),
    ({"count": 3, "attributes": {"a": {"type": "integer", "low": 1, "high": 2}},
      "template": "{b}"}, "not an attribute"),
    ({"count": -1, "attributes": {}}, "count"),
    ({"count": 3, "attributes": {}, "colour": 1}, "colour"),
])
def test_bad_configs_get_one_line(config: dict[str, Any], says: str) -> None:
    with pytest.raises(ConfigError, match=says) as e:
        population.load_config(config)
    assert "\n" not in str(e.value)


def test_a_value_without_a_case_is_one_clear_error(tmp_path: Path) -> None:
    cfg = population.load_config({"count": 5, "attributes": {
        "a": {"type": "categorical", "values": ["x"]},
        "b": {"type": "conditional", "on": "a", "cases": {"y": {"type": "integer", "low": 1,
                                                                "high": 2}}}}})
    with pytest.raises(ConfigError, match="no case for 'x'"):
        population.build(cfg, tmp_path / "p.jsonl", progress=False)


def test_yaml_bare_on_and_bad_yaml(tmp_path: Path) -> None:
    good = tmp_path / "c.yaml"
    good.write_text("count: 2\nattributes:\n  a: {type: categorical, values: [x]}\n"
                    "  b:\n    type: conditional\n    on: a\n    cases:\n"
                    "      x: {type: integer, low: 1, high: 1}\n")
    assert population.sample(population.load_config(good), 0) == {"a": "x", "b": 1}
    bad = tmp_path / "bad.yaml"
    bad.write_text("count: [1\n")
    with pytest.raises(ConfigError, match="cannot read") as e:
        population.load_config(bad)
    assert "\n" not in str(e.value)


def build_cli(out: Path, redis_url: str, prefix: str, models: Path, count: int
              ) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-m", "busagent.cli", "population", "build", str(CONFIG), "--out",
         str(out), "--count", str(count), "--model-config", str(models), "--config-name",
         "writer", "--redis", redis_url, "--prefix", prefix, "--writers", "2", "--batch", "8"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_llm_backgrounds_through_the_bus_resume_after_a_kill(
        tmp_path: Path, redis_url: str, prefix: str, workers: Workers) -> None:
    fake = FakeLLM(latency=0.05, fail_every=13).start()  # failures are retried by the client
    workers.start("w1", "busagent.population")
    try:
        models = tmp_path / "models.json"
        models.write_text(json.dumps([fake.config("writer", concurrency=16, max_retries=4)]))
        out = tmp_path / "people.jsonl"
        n = 300
        first = build_cli(out, redis_url, prefix, models, n)
        wait_for(lambda: out.exists() and out.read_text().count("\n") >= 60, timeout=60,
                 what="the first rows")
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        kept = len(rows_of(out)) if out.read_text().endswith("\n") else out.read_text().count(
            "\n")
        assert kept < n, "the build was killed before it finished"
        second = build_cli(out, redis_url, prefix, models, n)
        stdout, stderr = second.communicate(timeout=120)
        assert second.returncode == 0, stderr
        assert f"{n - kept} rows written, {kept} kept from before" in stdout
        rows = rows_of(out)
        ids = [r["id"] for r in rows]
        assert sorted(ids) == list(range(n)), "every id exactly once"
        cfg = population.load_config(CONFIG, count=n)
        for r in rows:
            assert r["attributes"] == population.sample(cfg, r["id"])
            # the fake endpoint's answer to the writer's prompt quotes it: this row's prompt
            assert "I agree" in r["background"] and "\n" not in r["background"]
            assert r["provenance"] == {"config_hash": cfg.digest(), "seed": 7,
                                       "model": {"config_name": "writer", "model_name": "fake"}}
        assert "tokens" in stdout and " 0 prompt" not in stdout
        # resumed, not restarted: the second run asked for about the missing rows only
        assert fake.requests - fake.failed < n + 2 * 2 * 8 + kept
    finally:
        fake.stop()


def test_openai_client_usage_errors_and_extra_args() -> None:
    from busagent.models import ModelConfig, OpenAIChatModel

    fake = FakeLLM().start()
    try:
        cfg = fake.config("f", generate_args={"temperature": 0.1, "top_k": 5})  # top_k: vLLM's
        m = OpenAIChatModel(ModelConfig.model_validate(cfg))
        msgs = [{"role": "user", "content": "hello there"}]

        async def two() -> list[Any]:
            return [await m.acall(msgs), await m.acall(msgs)]

        a, b = asyncio.run(two())
        assert a.usage is not None and a.usage.prompt == len(json.dumps(msgs)) // 4
        assert a.usage.completion == len(a.text) // 4 and a.usage.calls == 1
        assert m.usage.calls == 2 and m.usage.total == a.usage.total + b.usage.total  # type: ignore[union-attr]
    finally:
        fake.stop()
    # a refusal not worth retrying (a wrong key): at once, one line, naming the config
    seen: list[str] = []

    class Refuse(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_POST(self) -> None:
            seen.append(self.path)
            raw = b'{"error": {"message": "Incorrect API key\\nprovided"}}'
            self.send_response(401)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Refuse)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        refusing = OpenAIChatModel(ModelConfig.model_validate(
            {"config_name": "g", "model_type": "vllm", "base_url": f"http://127.0.0.1:{port}/v1",
             "api_key": "wrong"}))
        with pytest.raises(ModelError, match=r"HTTP 401.*'g'") as e:
            refusing(msgs)
        assert "\n" not in str(e.value)
        assert seen == ["/v1/chat/completions"]  # not retried
    finally:
        server.shutdown()
        server.server_close()


def test_rows_that_keep_failing_are_retried_then_reported_and_resumable(
        tmp_path: Path, workers: Workers) -> None:
    import busagent

    workers.start("w1", "busagent.population")
    down = FakeLLM(fail_every=1).start()  # every request answers 503
    try:
        busagent.load_model_configs(down.config("down", max_retries=0))
        cfg = population.load_config(CONFIG, count=10)
        out = tmp_path / "p.jsonl"
        with pytest.raises(ModelError, match=r"10 background\(s\) failed after 4 tries") as e:
            population.build(cfg, out, model_config_name="down", writers=2, batch=4,
                             progress=False)
        assert "\n" not in str(e.value) and "run the build again" in str(e.value)
        assert down.requests == 10 * 4  # each row sent once and retried three times
        assert out.read_text() == ""
    finally:
        down.stop()
    # another endpoint: the same build finishes the rows (each row's provenance names the
    # model that wrote it)
    up = FakeLLM().start()
    try:
        busagent.load_model_configs(up.config("up"))
        report = population.build(cfg, out, model_config_name="up", writers=2, batch=4,
                                  progress=False)
        assert (report.written, report.kept, report.failed) == (10, 0, [])
        assert sorted(r["id"] for r in rows_of(out)) == list(range(10))
        assert up.requests == 10
    finally:
        up.stop()
    # the worker is still serving
    assert any(s["name"] == "w1" for s in busagent.servers(include_dead=False))


def _attr(spec: dict[str, Any]) -> dict[str, Any]:
    return {"count": 3, "attributes": {"a": spec}}


@pytest.mark.parametrize(("spec", "says"), [
    ({"type": "integer", "low": 5, "high": 1}, "integer low 5 is above high 1"),
    ({"type": "uniform", "low": 2.5, "high": 1}, "uniform low 2.5 is above high 1"),
    ({"type": "normal", "mean": 50, "std": 10, "min": 60, "max": 40}, "min 60 is above max 40"),
    ({"type": "normal", "mean": 50, "std": 10, "min": 100, "max": 200}, "mass"),
    ({"type": "normal", "mean": 50, "std": 10, "max": -10}, "mass"),
    ({"type": "normal", "mean": 50, "std": 0, "min": 60}, "std 0"),
    # the same faults one level down, inside a conditional
    ({"type": "conditional", "on": "b", "cases": {}, "default": {"type": "integer", "low": 9,
                                                                  "high": 0}}, "above high"),
])
def test_impossible_distribution_parameters_are_refused_at_load(spec: dict[str, Any],
                                                                says: str) -> None:
    config = _attr(spec)
    config["attributes"]["b"] = {"type": "categorical", "values": ["x"]}
    with pytest.raises(ConfigError, match=says) as e:
        population.load_config(config)
    assert "\n" not in str(e.value)


def test_a_bounded_normal_is_truncated_not_piled_on_its_bounds(tmp_path: Path) -> None:
    # bounds a std either side of the mean keep 68% of the mass: the draws spread inside,
    # none lands outside, and the bounds are not where a clamp would heap the rest
    cfg = population.load_config({"count": 2000, "attributes": {
        "x": {"type": "normal", "mean": 0, "std": 1, "min": -1, "max": 1, "digits": 3}}})
    xs = [population.sample(cfg, i)["x"] for i in range(cfg.count)]
    assert all(-1 <= x <= 1 for x in xs)
    at_bounds = sum(x in (-1, 1) for x in xs)
    assert at_bounds <= 5, at_bounds  # clamping would put ~32% (~640) there


class _Odd(BaseHTTPRequestHandler):
    """An endpoint that answers 200 with a body that is no chat completion: ``/bad/`` a body
    that is not JSON, ``/badsse/`` a stream whose chunk is not JSON, ``/old/`` a server that
    refuses ``stream_options`` (HTTP 400) but streams without it and reports no usage."""

    seen: list[dict[str, Any]] = []

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
        _Odd.seen.append(body)
        if self.path.startswith("/bad/"):
            self._send(200, "application/json", b"not json")
        elif self.path.startswith("/badsse/"):
            self._send(200, "text/event-stream", b"data: not json\n\n")
        elif "stream_options" in body:
            self._send(400, "application/json",
                       b'{"error": {"message": "unknown field stream_options"}}')
        else:
            chunk = {"object": "chat.completion.chunk", "model": "m",
                     "choices": [{"index": 0, "delta": {"content": "hi there"}}]}
            self._send(200, "text/event-stream",
                       f"data: {json.dumps(chunk)}\n\ndata: [DONE]\n\n".encode())

    def _send(self, status: int, kind: str, raw: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)


def _model(name: str, base_url: str) -> Any:
    from busagent.models import ModelConfig, OpenAIChatModel

    return OpenAIChatModel(ModelConfig.model_validate(
        {"config_name": name, "model_type": "vllm", "base_url": base_url, "max_retries": 0}))


async def _stream(m: Any) -> str:
    return "".join([piece async for piece in m.astream([{"role": "user", "content": "hi"}])])


def test_every_model_client_error_is_a_one_line_model_error_naming_the_config() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Odd)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    try:
        for path in ("bad", "badsse"):
            m = _model(f"odd-{path}", f"http://127.0.0.1:{port}/{path}/v1")
            for call in (lambda m=m: m([{"role": "user", "content": "hi"}]),
                         lambda m=m: asyncio.run(_stream(m))):
                with pytest.raises(ModelError, match=f"'odd-{path}'") as e:
                    call()
                assert "\n" not in str(e.value)
    finally:
        server.shutdown()
        server.server_close()


def test_streamed_calls_count_their_tokens_and_a_refusing_server_still_streams() -> None:
    fake = FakeLLM().start()
    try:
        m = _model("streamy", fake.url)
        text = asyncio.run(_stream(m))
        assert text and m.usage.calls == 1
        assert m.usage.completion == len(text) // 4 and m.usage.prompt > 0
    finally:
        fake.stop()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Odd)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        _Odd.seen.clear()
        old = _model("old", f"http://127.0.0.1:{server.server_address[1]}/old/v1")
        assert asyncio.run(_stream(old)) == "hi there"
        assert asyncio.run(_stream(old)) == "hi there"
        assert old.usage.calls == 0  # a server that sends no usage counts nothing
        # asked once with the option, refused, then never again
        assert ["stream_options" in b for b in _Odd.seen] == [True, False, False]
    finally:
        server.shutdown()
        server.server_close()


def _cli_commands() -> dict[str, tuple[set[str], int]]:
    """Every `busagent` command line (``population build`` included) -> (its long options, how
    many positional arguments it takes)."""
    import click
    import typer.main

    from busagent.cli import app

    out: dict[str, tuple[set[str], int]] = {}

    def walk(cmd: Any, path: str) -> None:
        params = getattr(cmd, "params", [])
        out[path] = ({o for p in params for o in p.opts if o.startswith("--")},
                     sum(isinstance(p, click.Argument) for p in params))
        for name, sub in getattr(cmd, "commands", {}).items():
            walk(sub, f"{path} {name}".strip())

    walk(typer.main.get_command(app), "")
    return out


def test_error_texts_name_only_commands_that_exist() -> None:
    # every `busagent ...` command a message or docstring of the package or the examples tells a
    # user to run must be a real command with real options (`busagent models load FILE` was not)
    commands = _cli_commands()
    said = re.compile(r"`busagent ([a-z][a-z-]*(?: [a-z][a-z-]*)?)((?: [^`]*)?)`")
    bad = []
    for root in ("busagent", "examples"):
        for f in sorted((ROOT / root).rglob("*.py")):
            for m in said.finditer(f.read_text()):
                words, rest = m.group(1), m.group(2)
                cmd = words if words in commands else words.split(" ")[0]
                if cmd not in commands:
                    bad.append(f"{f.name}: `busagent {words}{rest}`: no command {cmd!r}")
                    continue
                opts, positional = commands[cmd]
                if cmd != words:  # the second word is an argument, or a subcommand that isn't
                    rest = " " + words.split(" ", 1)[1] + rest
                    if not positional:
                        bad.append(f"{f.name}: {m.group(0)}: {cmd} takes no "
                                   f"{words.split(' ', 1)[1]!r}")
                bad += [f"{f.name}: {m.group(0)}: {cmd} has no {o}"
                        for o in re.findall(r"(--[a-z][a-z-]*)", rest) if o not in opts]
    assert not bad, bad


def test_the_population_cli_refusal_is_a_whole_sentence(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from busagent.cli import app

    r = CliRunner().invoke(app, ["population", "build", str(CONFIG), "--out",
                                 str(tmp_path / "p.jsonl"), "--model-config", "m.json"])
    assert isinstance(r.exception, ConfigError)
    assert str(r.exception) == ("--model-config needs --config-name: the name of the config in "
                                "it that writes the backgrounds")


_KILLED = """
import sys
import busagent
from busagent import population
from busagent.fakellm import FakeLLM
busagent.init(child_workers=2)
fake = FakeLLM(latency=0.05).start()
busagent.load_model_configs(fake.config("k9", concurrency=8))
cfg = population.load_config(sys.argv[1], count=5000)
def on_row(i):
    if i == 40:
        procs = busagent.bus.current().children.procs.values()
        print(" ".join(str(p.pid) for p in procs), flush=True)
        sys.stderr.write("--- killed here ---\\n")
        sys.stderr.flush()
population.build(cfg, sys.argv[2], model_config_name="k9", progress=False, on_row=on_row)
"""


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True
    return "\\nState:\\tZ" in state


def test_child_workers_of_a_killed_build_exit_quietly(tmp_path: Path) -> None:
    # a model build on a private Redis with child workers, killed -9 mid-build: the children
    # (SIGTERM by the parent's death, their Redis gone too) must exit without writing a line
    # to the dead program's terminal
    err = (tmp_path / "stderr").open("w+")
    env = {k: v for k, v in os.environ.items() if k != "BUSAGENT_REDIS_URL"}
    p = subprocess.Popen([sys.executable, "-c", _KILLED, str(CONFIG), str(tmp_path / "p.jsonl")],
                         stdout=subprocess.PIPE, stderr=err, text=True, env=env, cwd=ROOT)
    try:
        assert p.stdout is not None
        pids = [int(x) for x in p.stdout.readline().split()]
        assert len(pids) == 2
    finally:
        p.kill()
        p.wait()
    try:
        wait_for(lambda: all(_gone(x) for x in pids), timeout=60, what="the children to exit")
    finally:
        for x in pids:
            if not _gone(x):
                os.kill(x, signal.SIGKILL)
    err.seek(0)
    after = err.read().split("--- killed here ---\n", 1)[1]
    assert after.strip() == "", after[:2000]
