"""The guess-2/3 example, small: files, stats, no participant dropped, and LLM participants
against a local fake OpenAI-compatible endpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import busagent
from busagent.fakellm import FakeLLM

from .conftest import ROOT, Workers

MAIN = ROOT / "examples" / "guess_two_thirds" / "main.py"


def run_game(tmp_path: Path, redis_url: str, prefix: str, *args: str) -> tuple[Path, list[str]]:
    env = {**os.environ, "BUSAGENT_REDIS_URL": redis_url, "BUSAGENT_PREFIX": prefix}
    p = subprocess.run([sys.executable, str(MAIN), *args, "--out", str(tmp_path)],
                       env=env, cwd=ROOT, capture_output=True, text=True, timeout=150)
    assert p.returncode == 0, p.stderr
    lines = [x for x in p.stdout.splitlines() if x.startswith("Moderator:")]
    return Path(p.stdout.strip().splitlines()[-1].split("results in ")[1]), lines


def check_round(out: Path, r: int, n: int) -> dict[str, Any]:
    res = json.loads((out / f"result_{r}.json").read_text())
    data, stats = res["data"], res["stats"]
    assert len(data) == stats["cnt"] and stats["cnt"] + stats["invalid"] == n
    assert all(0 <= v <= 100 for v in data)
    assert abs(stats["avg"] - sum(data) / len(data)) < 1e-9
    assert abs(stats["win"] - stats["avg"] * 2 / 3) < 1e-9
    assert stats["min"] == min(data) and stats["max"] == max(data)
    assert (out / f"result_{r}.png").stat().st_size > 0
    assert (out / f"result_{r}.pdf").stat().st_size > 0
    return dict(stats)


def test_guess_two_thirds_small(tmp_path: Path, redis_url: str, prefix: str) -> None:
    # 50 participants over 3 shards: 17 + 17 + 16, none dropped.
    out, lines = run_game(tmp_path, redis_url, prefix, "--agents", "50", "--shards", "3",
                          "--rounds", "2", "--sleep", "0.2")
    assert len(lines) == 2 and "The average value of round 1 is" in lines[0]
    assert out.parent.name == "50-3-2_3-0.2"
    for r in (1, 2):
        stats = check_round(out, r, 50)
        assert stats["cnt"] == 50
        # 50 participants sleeping 0.2 s each overlap: a round is far below 50 x 0.2 s.
        assert stats["time"] < 5
    run = json.loads((out / "run.json").read_text())
    assert run["agents"] == 50 and len(run["rounds"]) == 2


def test_llm_participants_against_fake_endpoint(tmp_path: Path, redis_url: str, prefix: str,
                                                workers: Workers) -> None:
    fake = FakeLLM(latency=0.05, fail_every=9).start()  # every 9th request fails: retried
    # A worker already running, as on a cluster: the game uses it instead of starting its own,
    # and the agents outlive the game so that their memories can be read.
    workers.start("w1", str(ROOT / "examples" / "guess_two_thirds" / "agents.py"))
    try:
        cfg = tmp_path / "models.json"
        cfg.write_text(json.dumps([fake.config("fake-game", max_retries=5)]))
        out, lines = run_game(tmp_path, redis_url, prefix, "--agent-type", "llm", "--agents",
                              "12", "--shards", "2", "--rounds", "2", "--model-config",
                              str(cfg), "--config-name", "fake-game", "--keep")
        assert len(lines) == 2
        for r in (1, 2):
            assert check_round(out, r, 12)["cnt"] == 12
        # two model calls per participant per round, plus the retried failures
        assert fake.requests - fake.failed == 12 * 2 * 2 and fake.failed >= 1
        # memories grew by the prompt and the answer each round, and are in Redis
        ids = [a["id"] for a in busagent.agents("w1") if a["name"] == "p0"]
        assert len(ids) == 1, "participant p0 is hosted by w1"
        mem = busagent.admin.agent_memory(ids[0])
        assert len(mem) == 4 and "next round" in str(mem[2].content)
    finally:
        fake.stop()
