"""Time population builds: attribute-only rows, and LLM-written rows through the bus against
the fake endpoint (its own process) at a given latency, beside the model's own limit
(requests in flight / latency).

    python benchmarks/population_bench.py --attributes 1000000 --llm 10000 --latency 0.05

Uses a private embedded Redis and child workers (no --redis given), like a user's first run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "examples" / "populations" / "people.yaml"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--attributes", type=int, default=1_000_000)
    ap.add_argument("--llm", type=int, default=10_000)
    ap.add_argument("--latency", type=float, default=0.05)
    ap.add_argument("--concurrency", type=int, default=64, help="per worker process")
    ap.add_argument("--workers", type=int, default=2, help="child worker processes")
    ap.add_argument("--writers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--port", type=int, default=18431)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="population-bench-"))
    cli = [sys.executable, "-m", "busagent.cli"]
    if args.attributes:
        t = time.perf_counter()
        subprocess.run([*cli, "population", "build", str(CONFIG), "--count",
                        str(args.attributes), "--out", str(tmp / "attrs.jsonl")], check=True)
        took = time.perf_counter() - t
        print(f"attribute-only: {args.attributes:,} rows in {took:.1f} s "
              f"({args.attributes / took:,.0f} rows/s, whole command)")
        (tmp / "attrs.jsonl").unlink()
    if args.llm:
        fake = subprocess.Popen([*cli, "fake-llm", "--port", str(args.port), "--latency",
                                 str(args.latency)], stdout=subprocess.DEVNULL)
        try:
            models = tmp / "models.json"
            models.write_text(json.dumps([{
                "config_name": "fake", "model_type": "openai_chat", "model_name": "fake",
                "base_url": f"http://127.0.0.1:{args.port}/v1", "api_key": "none",
                "concurrency": args.concurrency}]))
            env = {**os.environ, "BUSAGENT_CHILD_WORKERS": str(args.workers)}
            t = time.perf_counter()
            subprocess.run([*cli, "population", "build", str(CONFIG), "--count", str(args.llm),
                            "--out", str(tmp / "llm.jsonl"), "--model-config", str(models),
                            "--config-name", "fake", "--writers", str(args.writers), "--batch",
                            str(args.batch)], check=True, env=env)
            took = time.perf_counter() - t
            limit = args.concurrency * args.workers / args.latency
            print(f"LLM-written: {args.llm:,} rows in {took:.1f} s ({args.llm / took:,.0f} "
                  f"rows/s, whole command with Redis and worker start-up); the model's own "
                  f"limit: {args.concurrency} x {args.workers} in flight / {args.latency} s = "
                  f"{limit:,.0f} rows/s")
        finally:
            fake.terminate()
            fake.wait(10)
    print(f"files in {tmp}")


if __name__ == "__main__":
    main()
