"""Agents of the guess-2/3-of-the-average game (the seeds' large-scale simulation).

Workers load this module (``--agents examples/guess_two_thirds/agents.py``, or the program
starts child workers for it).
"""

from __future__ import annotations

import asyncio
import functools
import json
import random
import re
import string
from pathlib import Path
from typing import Any

import busagent
from busagent import Agent, Msg, models

#: a number in a model's answer (a literal: a worker that loads this file by path runs only
#: definitions, and an assignment from a call such as re.compile(...) is not one; see the README)
NUMBER = r"(\d+(?:\.\d+)?)"


@functools.cache
def prompts() -> dict[str, Any]:
    """The prompts (data: system and user prompts by id, as in the paper's configs), read on
    first use: in the program and on each worker."""
    return dict(json.loads((Path(__file__).resolve().parent / "configs" / "prompts.json")
                           .read_text()))


def system_prompt(sys_id: str, max_value: int, ratio: str, background: str | None) -> str:
    """System prompt ``sys_id`` filled in. A background (a --persona or a --population row)
    reaches the model whatever the prompt: one without a ``{background}`` slot gets it
    appended as a "# Your character" section (dropping it silently would play a game without
    the population the user asked for)."""
    text: str = prompts()["SYSTEM"][sys_id]
    slots = {f for _, f, _, _ in string.Formatter().parse(text) if f}
    out = text.format(max_value=max_value, ratio=ratio, background=background or "")
    if background and "background" not in slots:
        out = out.rstrip("\n") + f"\n\n# Your character\n{background}\n\n"
    return out


class RandomParticipant(Agent):
    """Answers a uniformly random integer in [0, max_value] after ``sleep_time`` seconds (the
    paper's stand-in for a model call, so it waits like one: asynchronously, and thousands of
    waits overlap on a worker). Keeps no memory: a million of them must stay cheap."""

    def __init__(self, name: str, max_value: int = 100, sleep_time: float = 1.0) -> None:
        super().__init__(name)
        self.max_value = max_value
        self.sleep_time = sleep_time

    def reply(self, x: Msg | None = None) -> Any:
        if self.sleep_time:
            return self._answer_later()  # the worker awaits it on its event loop
        return random.randint(0, self.max_value)

    async def _answer_later(self) -> int:
        await asyncio.sleep(self.sleep_time)
        return random.randint(0, self.max_value)


class LLMParticipant(Agent):
    """Asks a model for its number, then asks again to extract the number from that answer (two
    model calls a round, as in the paper). Its memory grows by the round's prompt and its answer,
    so later rounds see the earlier ones; it is saved to Redis with each reply and survives a
    worker's death. Answers -1 (counted invalid) when no number can be extracted."""

    def __init__(self, name: str, model_config_name: str, max_value: int = 100,
                 ratio: str = "2/3", sys_id: str = "1", background: str | None = None) -> None:
        super().__init__(name)
        self.model = models.get(model_config_name)
        self.max_value = max_value
        self.system = Msg("system", system_prompt(sys_id, max_value, ratio, background),
                          role="system")

    async def reply(self, x: Msg | None = None) -> dict[str, Any]:
        """``{"value": the number (-1: none), "usage": [prompt, completion] tokens of the
        round's two calls, or None when the endpoint reports none]}``."""
        self.memory.add(x)
        r = await self.model.acall([self.system, *self.memory.get()])
        value, used = await self.parse_value(r.text)
        self.memory.add(Msg(self.name, r.text, role="assistant"))
        usage = [u for u in (r.usage, used) if u is not None]
        return {"value": value,
                "usage": [sum(u.prompt for u in usage), sum(u.completion for u in usage)]
                if usage else None}

    async def parse_value(self, text: str) -> tuple[float, models.Usage | None]:
        parse = prompts()["PARSE"]
        r = await self.model.acall([
            Msg("system", parse["system"].format(text=text), role="system"),
            Msg("user", parse["user"], role="user"),
        ])
        found = re.findall(NUMBER, r.text)
        return (float(found[0]) if found else -1.0), r.usage


class Group(Agent):
    """A shard: fans a round's prompt out to its participants, waits for them all with one
    batched gather, and returns their valid values with their sum and count."""

    def __init__(self, name: str, participants: list[str], max_value: int = 100) -> None:
        super().__init__(name)
        # Agent ids: the shard calls participants directly (routing finds each one's worker),
        # never through the moderator.
        self.participants = participants
        self.max_value = max_value

    async def reply(self, x: Msg | None = None) -> dict[str, Any]:
        prompt = Msg("Moderator", x.content if x else "", role="user")
        # One encoded prompt, a thousand calls per routing step, one batched gather; the
        # shard is the replies' only reader, so they leave Redis as soon as it has them.
        answers = await busagent.agather(busagent.fanout(self.participants, prompt),
                                         return_exceptions=True, release=True)
        # An LLM participant answers {"value", "usage"}: the value counts, the tokens are
        # summed per participant so a user sees what a round cost.
        values = [a.get("value") if isinstance(a, dict) else a for a in answers]
        usage = [a.get("usage") if isinstance(a, dict) else None for a in answers]
        ok = [isinstance(v, int | float) and not isinstance(v, bool)
              and 0 <= v <= self.max_value for v in values]
        valid = [v for v, good in zip(values, ok, strict=True) if good]
        return {"sum": sum(valid), "cnt": len(valid), "values": valid,
                "invalid": len(values) - len(valid),
                # per participant, in this shard's order: its value (None: invalid), its tokens
                "each": [v if good else None for v, good in zip(values, ok, strict=True)],
                # None unless some participant reported tokens: random ones never do
                "usage": usage if any(u is not None for u in usage) else None}
