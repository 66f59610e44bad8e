"""The game with a population (backgrounds to the model, attributes and tokens in the results,
the per-attribute analysis) and experiment sweeps (resumable, with their summary and plots),
on real worker processes, a real redis-server and the fake endpoint (issue 14)."""

from __future__ import annotations

import csv
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from busagent import fakellm, population
from busagent.fakellm import FakeLLM

from .conftest import ROOT, Workers

GAME = ROOT / "examples" / "guess_two_thirds"
PEOPLE = ROOT / "examples" / "populations" / "people.yaml"


def run(script: Path, redis_url: str, prefix: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "BUSAGENT_REDIS_URL": redis_url, "BUSAGENT_PREFIX": prefix}
    return subprocess.run([sys.executable, str(script), *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=240)


def test_game_with_a_population_and_its_analysis(tmp_path: Path, redis_url: str, prefix: str,
                                                 workers: Workers,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    n = 24
    people_file = tmp_path / "people.jsonl"
    population.build(population.load_config(PEOPLE, count=n), people_file, progress=False)
    people = population.read(people_file)
    seen: list[str] = []
    real = fakellm.answer

    def answer(messages: list[dict[str, Any]], rng: Any) -> str:
        seen.append(str(messages[0].get("content", "")))
        return real(messages, rng)

    monkeypatch.setattr(fakellm, "answer", answer)  # the fake runs in this process
    fake = FakeLLM(latency=0.01).start()
    workers.start("w1", str(GAME / "agents.py"))
    try:
        cfg = tmp_path / "models.json"
        cfg.write_text(json.dumps([fake.config("fake-pop", max_retries=3)]))
        p = run(GAME / "main.py", redis_url, prefix, "--agent-type", "llm", "--agents", str(n),
                "--shards", "3", "--rounds", "2", "--model-config", str(cfg), "--config-name",
                "fake-pop", "--population", str(people_file), "--sys-id", "5", "--by",
                "occupation", "--by", "age", "--out", str(tmp_path / "res"))
        assert p.returncode == 0, p.stderr
    finally:
        fake.stop()
    out = Path(p.stdout.strip().splitlines()[-1].split("results in ")[1])
    # every participant's own background reached the model in its system prompt
    for person in people:
        assert any(person["background"] in s for s in seen), person["id"]
    assert "tokens:" in p.stdout
    total_tokens = 0
    for r in (1, 2):
        res = json.loads((out / f"result_{r}.json").read_text())
        parts = res["participants"]
        assert [x["id"] for x in parts] == list(range(n))
        for x in parts:
            assert x["attributes"] == people[x["id"]]["attributes"]
            assert x["tokens"][0] > 0 and x["tokens"][1] > 0  # two calls' worth, reported
        assert sorted(x["value"] for x in parts if x["value"] is not None) == sorted(res["data"])
        tok = res["stats"]["tokens"]
        assert tok["prompt"] == sum(x["tokens"][0] for x in parts) and tok["reporting"] == n
        total_tokens += tok["prompt"]
        # the analysis table is the participants' values grouped by occupation
        with (out / "by_occupation.csv").open() as f:
            table = [row for row in csv.DictReader(f) if row["round"] == str(r)]
        groups: dict[str, list[float]] = {}
        for x in parts:
            groups.setdefault(x["attributes"]["occupation"], []).append(x["value"])
        assert {row["occupation"] for row in table} == set(groups)
        for row in table:
            vals = [v for v in groups[row["occupation"]] if v is not None]
            assert int(row["n"]) == len(groups[row["occupation"]])
            assert abs(float(row["mean"]) - statistics.fmean(vals)) < 1e-2
            assert abs(float(row["std"]) - statistics.pstdev(vals)) < 1e-2
    # the later round's prompt carries the first round's memory: more tokens in round 2
    run_json = json.loads((out / "run.json").read_text())
    assert [t["prompt"] for t in run_json["tokens"]][1] > run_json["tokens"][0]["prompt"]
    assert total_tokens == sum(t["prompt"] for t in run_json["tokens"])
    # age has many values: binned, every participant in one bin
    with (out / "by_age.csv").open() as f:
        ages = [row for row in csv.DictReader(f) if row["round"] == "1"]
    assert 1 < len(ages) <= 5 and sum(int(row["n"]) for row in ages) == n
    for name in ("by_occupation.png", "by_age.png"):
        assert (out / name).stat().st_size > 0


def test_a_population_smaller_than_the_game_is_refused(tmp_path: Path) -> None:
    people_file = tmp_path / "people.jsonl"
    population.build(population.load_config(PEOPLE, count=3), people_file, progress=False)
    p = subprocess.run([sys.executable, str(GAME / "main.py"), "--agents", "5", "--population",
                        str(people_file), "--out", str(tmp_path)], capture_output=True,
                       text=True, timeout=60, cwd=ROOT)
    assert p.returncode == 1
    assert p.stderr.strip().splitlines() == [
        f"error: {people_file} has 3 people, fewer than --agents 5: build more with "
        "`busagent population build ... --count 5`"]


def test_a_sweep_of_three_cases_resumes_and_summarises(tmp_path: Path, redis_url: str,
                                                       prefix: str, workers: Workers) -> None:
    workers.start("w1", str(GAME / "agents.py"))
    cases = tmp_path / "cases.csv"
    cases.write_text("agents,shards,ratio,rounds,sleep\n"
                     "20,2,2/3,2,0\n40,2,1/2,2,0\n60,3,2/3,3,0\n")
    res = tmp_path / "res"
    p = run(GAME / "experiment.py", redis_url, prefix, str(cases), "--name", "sweep", "--out",
            str(res))
    assert p.returncode == 0, p.stderr + p.stdout
    root = res / "sweep"
    state = json.loads((root / "experiment.json").read_text())["cases"]
    assert len(state) == 3
    # the paper's layout: experiment / kind / settings / timestamp
    dirs = {Path(c["run"]).relative_to(root).parent.as_posix() for c in state.values()}
    assert dirs == {"random/20-2-2_3-0", "random/40-2-1_2-0", "random/60-3-2_3-0"}
    with (root / "summary.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 + 2 + 3
    for row in rows:
        stats = json.loads((Path(row["run"]) / f"result_{row['round']}.json").read_text())
        assert abs(float(row["avg"]) - stats["stats"]["avg"]) < 1e-3
        assert int(row["cnt"]) == int(row["agents"])
    assert {row["ratio"] for row in rows} == {"2/3", "1/2"}
    for name in ("avg_per_round.png", "distributions.png", "round_time_vs_agents.png"):
        assert (root / name).stat().st_size > 0
    # run again: every case done before, nothing re-run
    runs_before = sorted(root.rglob("run.json"))
    p = run(GAME / "experiment.py", redis_url, prefix, str(cases), "--name", "sweep", "--out",
            str(res))
    assert p.returncode == 0, p.stderr
    assert p.stdout.count("done before, skipped") == 3
    assert sorted(root.rglob("run.json")) == runs_before
    # a sweep that stopped after two cases runs only the third
    state_file = root / "experiment.json"
    data = json.loads(state_file.read_text())
    third = next(k for k, c in data["cases"].items() if c["order"] == 3)
    del data["cases"][third]
    state_file.write_text(json.dumps(data))
    p = run(GAME / "experiment.py", redis_url, prefix, str(cases), "--name", "sweep", "--out",
            str(res))
    assert p.returncode == 0, p.stderr
    assert p.stdout.count("done before, skipped") == 2
    assert len(list(root.rglob("run.json"))) == len(runs_before) + 1


def test_a_case_with_an_unknown_column_is_refused(tmp_path: Path) -> None:
    cases = tmp_path / "cases.csv"
    cases.write_text("agents,colour\n10,red\n")
    p = subprocess.run([sys.executable, str(GAME / "experiment.py"), str(cases), "--out",
                        str(tmp_path)], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert p.returncode == 1 and "unknown column(s) ['colour']" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


def test_a_background_reaches_the_prompt_whatever_the_system_prompt() -> None:
    sys.path.insert(0, str(GAME))
    try:
        import agents  # the game's module, as its workers load it
    finally:
        sys.path.remove(str(GAME))
    background = "I am a 41-year-old beekeeper from Tartu."
    for sys_id in agents.prompts()["SYSTEM"]:  # the default 1, the README's 2, the slotted 5
        text = agents.system_prompt(sys_id, 100, "2/3", background)
        assert text.count(background) == 1, sys_id
        assert "{" not in text and "100" in text and "2/3" in text
        # no background: the prompt as written, no empty character section
        plain = agents.system_prompt(sys_id, 100, "2/3", None)
        assert "# Your character\n\n" not in plain or sys_id == "5"


@pytest.mark.parametrize(("extra", "says"), [
    (["--by", "shoe_size"], "error: --by shoe_size: not an attribute of {people} (its "
     "attributes: age, age_group, education, income, occupation, risk_taking)"),
    (["--by", "occupation", "--by", "nope"], "error: --by nope: not an attribute of {people}"),
])
def test_a_bad_by_is_refused_before_the_game(tmp_path: Path, extra: list[str],
                                             says: str) -> None:
    people_file = tmp_path / "people.jsonl"
    population.build(population.load_config(PEOPLE, count=3), people_file, progress=False)
    # no Redis and no workers: refused before anything starts (a game would need them)
    p = subprocess.run([sys.executable, str(GAME / "main.py"), "--agents", "3", "--population",
                        str(people_file), "--out", str(tmp_path), *extra],
                       capture_output=True, text=True, timeout=60, cwd=ROOT,
                       env={**os.environ, "BUSAGENT_REDIS_URL": "redis://127.0.0.1:1/0"})
    assert p.returncode == 1, p.stdout + p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(says.format(people=people_file)), lines
    assert not list(tmp_path.rglob("result_1.json"))


def test_by_without_a_population_is_refused_before_the_game(tmp_path: Path) -> None:
    p = subprocess.run([sys.executable, str(GAME / "main.py"), "--agents", "3", "--by", "age",
                        "--out", str(tmp_path)], capture_output=True, text=True, timeout=60,
                       cwd=ROOT, env={**os.environ, "BUSAGENT_REDIS_URL": "redis://127.0.0.1:1/0"})
    assert p.returncode == 1
    assert p.stderr.strip().splitlines() == [
        "error: --by age needs --population: only a population's people have attributes to "
        "group by"]


def test_fake_llm_never_overwrites_a_stored_config(tmp_path: Path, redis_url: str, prefix: str,
                                                  workers: Workers) -> None:
    import busagent
    from busagent import models

    shared = {"config_name": "fake", "model_type": "openai_chat", "model_name": "shared",
              "base_url": "http://shared-host:8000/v1"}
    models.load_model_configs(shared)
    before = models.list_model_configs()
    workers.start("w1", str(GAME / "agents.py"))
    p = run(GAME / "main.py", redis_url, prefix, "--agent-type", "llm", "--agents", "3",
            "--shards", "1", "--rounds", "1", "--fake-llm", "0", "--out", str(tmp_path / "res"))
    assert p.returncode == 0, p.stderr
    # the game played against its own endpoint, under the results' usual folder name ...
    out = Path(p.stdout.strip().splitlines()[-1].split("results in ")[1])
    assert out.parts[-3] == "fake"
    assert json.loads((out / "result_1.json").read_text())["stats"]["cnt"] > 0
    # ... and left the stored configs as they were: the shared one intact, nothing added
    assert models.list_model_configs() == before
    assert busagent.models.list_model_configs()["fake"].base_url == shared["base_url"]


def _game_module(name: str) -> Any:
    sys.path.insert(0, str(GAME))
    try:
        return __import__(name)
    finally:
        sys.path.remove(str(GAME))


@pytest.mark.parametrize("values", [list(range(20, 81)), list(range(18, 30)),
                                    [0, 3, 7, 8, 9, 10, 11, 12, 13, 100]])
def test_integer_attributes_get_integer_bins(values: list[int]) -> None:
    groups = _game_module("analysis").groups_of(values)
    assert 1 < len(set(groups.values())) <= 5
    for v, label in groups.items():
        a, b = label.split("-")
        assert a.isdigit() and b.isdigit(), label  # "20-31", never "20-31.2"
        assert int(a) <= v <= int(b)
    # the bins do not overlap: each label's range holds only its own values
    for label in set(groups.values()):
        a, b = map(int, label.split("-"))
        assert {v for v in values if a <= v <= b} == {v for v, x in groups.items() if x == label}


@pytest.mark.parametrize("n", [2, 4, 12, 25])
def test_each_case_of_the_sweep_plot_has_its_own_colour(n: int) -> None:
    colours = _game_module("experiment").case_colours(list(range(1, n + 1)))
    assert len(set(colours.values())) == n
