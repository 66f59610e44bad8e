"""Child-process mode: the program starts workers for classes no live worker can host, including
classes defined in the program's own script."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from .conftest import ROOT


def run_script(path: Path, url: str, prefix: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "BUSAGENT_REDIS_URL": url, "BUSAGENT_PREFIX": prefix,
           "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(path)], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def test_quickstart_distributes_and_overlaps(redis_url: str, prefix: str) -> None:
    p = run_script(ROOT / "examples" / "quickstart.py", redis_url, prefix)
    assert p.returncode == 0, p.stderr
    assert "D: D[B[A[task]] + C[A[task]]]" in p.stdout
    took = float(p.stdout.split("total ")[1].split(" s")[0])
    assert took < 5.0  # 6 s one after another; the longest path is 3 s
    servers = {x.split("@")[1] for x in p.stdout.splitlines()[0][len("agents: "):].split(", ")}
    assert len(servers) == 2 and all(s.startswith("child-") for s in servers)


def test_top_level_script_style_and_children_stop(tmp_path: Path, redis_url: str,
                                                  prefix: str) -> None:
    script = tmp_path / "flow.py"
    script.write_text(textwrap.dedent("""
        import os
        import busagent
        from busagent import Agent, Msg

        busagent.init()

        class Adder(Agent):
            def __init__(self, name, inc=1):
                super().__init__(name)
                self.inc = inc

            def reply(self, x=None):
                return Msg(self.name, [(x.content if x else 0) + self.inc, os.getpid()])

        a = Adder("a", inc=2, to_dist=True)
        p = a(Msg("user", 1))
        value, pid = p.content
        print("VALUE", value, "REMOTE", pid != os.getpid())
        print("CHILDREN", " ".join(str(c.pid) for c in
                                   busagent.bus.current().children.procs.values()))
    """))
    p = run_script(script, redis_url, prefix)
    assert p.returncode == 0, p.stderr
    assert "VALUE 3 REMOTE True" in p.stdout
    pids = [int(x) for x in p.stdout.split("CHILDREN ")[1].split()]
    assert pids
    for pid in pids:  # the children exited with the program
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(
            f"/proc/{pid}/status").read_text().lower()
