"""Agents of the chat room: roles that talk through a model (streamed, token by token) and a
moderator that picks who speaks next. Workers load this file (``--agents
examples/chat_room/agents.py``), or the program starts child workers for it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from busagent import Agent, Msg, models


class Role(Agent):
    """A participant with a persona. Its reply streams: the model's pieces travel on the bus as
    they come, so the room prints them while the role is still talking."""

    def __init__(self, name: str, persona: str, model_config_name: str) -> None:
        super().__init__(name)
        self.model = models.get(model_config_name)
        self.system = Msg("system", f"You are {name}, {persona}. You are in a chat room with "
                          "others; answer in one or two sentences, in character.", role="system")

    async def reply(self, x: Msg | None = None) -> AsyncIterator[str]:  # type: ignore[override]
        self.memory.add(x)
        async for piece in self.model.astream([self.system, *self.memory.get(recent_n=20)],
                                              name=self.name):
            yield piece


class Moderator(Agent):
    """Picks the next speaker. It asks its model, and takes the first candidate the answer
    names; when the answer names none (a scripted model, a confused LLM) it picks whoever has
    been quiet longest, so the conversation never stalls on one voice."""

    def __init__(self, name: str, model_config_name: str) -> None:
        super().__init__(name)
        self.model = models.get(model_config_name)
        self.spoken: list[str] = []

    async def reply(self, x: Msg | None = None) -> str:  # type: ignore[override]
        content: dict[str, Any] = x.content if x is not None else {}
        candidates: list[str] = content.get("candidates", [])
        history = "\n".join(content.get("history", [])[-10:])
        ask = Msg("user", f"Conversation so far:\n{history}\n\nWho should speak next? Answer "
                  f"with one name from: {', '.join(candidates)}.", role="user")
        answer = (await self.model.acall([ask], name=self.name)).text
        named = [c for c in candidates if c.lower() in answer.lower()]
        if named:
            pick = named[0]
        else:
            pick = min(candidates, key=lambda c: (self.spoken.count(c), -self._last(c)))
        self.spoken.append(pick)
        return pick

    def _last(self, who: str) -> int:
        return max((i for i, c in enumerate(self.spoken) if c == who), default=-1)
