"""The guess-2/3 example, small: files, stats and that no participant is dropped."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from .conftest import ROOT


def test_guess_two_thirds_small(tmp_path: Path, redis_url: str, prefix: str) -> None:
    env = {**os.environ, "BUSAGENT_REDIS_URL": redis_url, "BUSAGENT_PREFIX": prefix}
    # 50 participants over 3 shards: 17 + 17 + 16, none dropped.
    p = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "guess_two_thirds" / "main.py"), "--agents",
         "50", "--shards", "3", "--rounds", "2", "--sleep", "0.2", "--out", str(tmp_path)],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    lines = [x for x in p.stdout.splitlines() if x.startswith("Moderator:")]
    assert len(lines) == 2 and "The average value of round 1 is" in lines[0]
    out = Path(p.stdout.strip().splitlines()[-1].split("results in ")[1])
    assert out.parent.name == "50-3-2_3"
    for r in (1, 2):
        res = json.loads((out / f"result_{r}.json").read_text())
        data, stats = res["data"], res["stats"]
        assert len(data) == 50 and stats["cnt"] == 50
        assert all(0 <= v <= 100 for v in data)
        assert abs(stats["avg"] - sum(data) / 50) < 1e-9
        assert abs(stats["win"] - stats["avg"] * 2 / 3) < 1e-9
        assert stats["min"] == min(data) and stats["max"] == max(data)
        # 50 participants sleeping 0.2 s each overlap: a round is far below 50 x 0.2 s.
        assert stats["time"] < 5
        assert (out / f"result_{r}.png").stat().st_size > 0
        assert (out / f"result_{r}.pdf").stat().st_size > 0
