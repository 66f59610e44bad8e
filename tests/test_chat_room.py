"""The chat room example runs as the README says, with its scripted model and no human."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from .conftest import ROOT


def test_chat_room_runs(tmp_path: Path, redis_url: str, prefix: str) -> None:
    env = {**os.environ, "BUSAGENT_REDIS_URL": redis_url, "BUSAGENT_PREFIX": prefix}
    log = tmp_path / "chat.log"
    p = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "chat_room" / "main.py"), "--human-timeout",
         "0", "--steps", "4", "--log", str(log)],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert p.returncode == 0, p.stderr
    said = [x.split(":")[0] for x in p.stdout.splitlines()[1:-1]]
    # the moderator gives everyone a turn before anyone speaks twice
    assert sorted(said[:3]) == ["Ada", "Ben", "Cleo"] and len(said) == 4
    assert "roles ran on ['" in p.stdout
    lines = log.read_text().splitlines()
    assert len(lines) == 5 and "host -> *: How should we launch busagent?" in lines[0]
