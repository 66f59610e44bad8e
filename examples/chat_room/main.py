"""A chat room: three roles, a moderator that picks the speakers and one human, on the bus.

    python examples/chat_room/main.py                       # a scripted model: no LLM needed
    python examples/chat_room/main.py --model-config models.json --config-name my-llm
    python examples/chat_room/main.py --human-timeout 0     # no human turns (scripts, CI)

The roles and the moderator run on worker processes (started for you, or already running with
``--agents examples/chat_room/agents.py``); the human types in this terminal and is skipped
when they do not answer within ``--human-timeout`` seconds. Replies stream in as they are
produced. A watcher writes the whole transcript to ``--log``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
from pathlib import Path

import busagent
from busagent import Hub, Human, StepEvent, TaskCenter

sys.path.insert(0, str(Path(__file__).resolve().parent))
from agents import Moderator, Role

SCRIPTED = {
    "config_name": "scripted",
    "model_type": "scripted",
    "lines": [
        "Good point about '{last}'. We should keep it simple first.",
        "I disagree a little: we need numbers before deciding.",
        "What if we try it on one machine, then on many?",
        "Let us write that down as the plan.",
    ],
}
ROLES = [
    ("Ada", "a careful engineer who asks for measurements"),
    ("Ben", "a product manager who wants to ship this week"),
    ("Cleo", "a designer who speaks for the users"),
]


def show(event: StepEvent) -> None:
    if event.type == "start" and event.role != "you":
        print(f"{event.name}: ", end="", flush=True)
    elif event.type == "chunk" and event.role != "you":
        print(event.data, end="", flush=True)
    elif event.type == "end" and event.role != "you":
        print(flush=True)
    elif event.type == "end":
        print(f"you: {event.data}")
    elif event.type == "skipped":
        print(f"({event.name} skipped: {event.data})")
    elif event.type == "error":
        print(f"\n({event.name} failed: {event.data})")


def transcript(hub: Hub, path: Path, stop: threading.Event) -> None:
    """A watcher: sees every message, publishes nothing."""
    with path.open("w") as f:
        for m in hub.watch(start="0", block_ms=200, stop=stop):
            f.write(f"[{m.seq}] {m.sent_from} -> {','.join(m.send_to)}: {m.msg.content}\n")
            f.flush()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--topic", default="How should we launch busagent?",
                    help="what the room talks about (the first message)")
    ap.add_argument("--steps", type=int, default=6, help="speaker turns to run")
    ap.add_argument("--model-config", help="JSON file of model configs (OpenAI-compatible)")
    ap.add_argument("--config-name", default="scripted",
                    help="the model config the roles and the moderator use")
    ap.add_argument("--human-timeout", type=float, default=30.0,
                    help="seconds you have to answer; 0: no human in the room")
    ap.add_argument("--deadline", type=float, default=120.0, help="seconds per step")
    ap.add_argument("--workers", type=int, default=2,
                    help="child worker processes to start when no worker runs")
    # Not the working tree: running an example must not leave files in a checkout.
    ap.add_argument("--log", default=str(Path(tempfile.gettempdir()) / "busagent-chat-room.log"),
                    help="file the transcript is written to (default: %(default)s)")
    args = ap.parse_args()

    busagent.init(child_workers=args.workers)
    busagent.load_model_configs(args.model_config or SCRIPTED)
    center = TaskCenter(f"chat-room-{busagent.bus.new_id()[:8]}", deadline=args.deadline)
    roles = [Role(name, persona, args.config_name, to_dist=True) for name, persona in ROLES]
    moderator = Moderator("moderator", args.config_name, to_dist=True)
    center.add_agents(roles, roles=[n for n, _ in ROLES])
    if args.human_timeout > 0:
        center.add_agents([Human("you", timeout=args.human_timeout, echo=False)], roles=["you"])
    stop = threading.Event()
    watcher = threading.Thread(target=transcript, args=(center.hub, Path(args.log), stop),
                               daemon=True)
    watcher.start()

    print(f"topic: {args.topic}")
    center.send_task_request(args.topic, send_from="host")
    for _ in range(args.steps):
        for event in center.step(speakers=moderator):
            show(event)
    stop.set()
    watcher.join()  # it stops once it has caught up
    servers = sorted({a["server"] for a in busagent.agents()
                      if a["name"] in {n for n, _ in ROLES}})
    print(f"roles ran on {servers}; transcript in {args.log}")


if __name__ == "__main__":
    main()
