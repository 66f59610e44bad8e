"""Settings, read from ``BUSAGENT_*`` environment variables and overridden by arguments.

Defaults live here and nowhere else; the tuning constants that are not settings (batch sizes,
intervals) are named in :mod:`busagent.tuning`.
"""

from __future__ import annotations

import os
import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import ConfigError

#: what a key prefix may be (see ``Settings._prefix``)
_PREFIX = re.compile(r"[A-Za-z0-9_.-]{1,64}")

NAMESPACE_RULE = ("a namespace is 1-200 printable characters, without spaces, braces or glob "
                  "characters")


def namespace_ok(v: str) -> bool:
    """A namespace goes into key names (``{p}:names:{namespace}``) and SCAN patterns."""
    return (0 < len(v) <= 200 and v.isprintable()
            and not any(c.isspace() or c in "{}*?[]" for c in v))


class Settings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    #: None means: the shared embedded Redis if ``busagent redis`` started one, else a private one.
    redis_url: str | None = None
    #: every key starts with this, so several applications can share one Redis.
    prefix: str = "busagent"
    #: scopes registered names, listings and deletion (Ray's namespace). None: an anonymous one
    #: of this program's own (``anon-<program id>``), so two programs never see each other's
    #: names unless they choose the same namespace.
    namespace: str | None = None
    #: seconds between a worker's registry updates.
    heartbeat: float = Field(2.0, gt=0)
    #: a server whose last heartbeat is older than this is shown dead.
    dead_after: float = Field(10.0, gt=0)
    #: a dead server's registry entry is removed after this long.
    sweep_after: float = Field(60.0, gt=0)
    #: how long a reply stays readable after it is written (seconds).
    reply_ttl: int = Field(3600, gt=0)
    #: default deadline for resolving a placeholder; None waits forever.
    call_timeout: float | None = Field(300.0, gt=0)
    #: encoded calls and replies larger than this are refused with MessageTooLarge.
    max_message_bytes: int = Field(8 * 1024 * 1024, gt=0)
    #: worker processes the caller starts when no live worker can host a class.
    child_workers: int = Field(2, ge=1)
    #: Redis socket timeout; blocking reads are sliced well below it so a dead peer is noticed.
    socket_timeout: float = Field(15.0, gt=1)
    #: a call whose worker died this many times is dead-lettered instead of delivered again.
    max_deliveries: int = Field(3, ge=1)
    #: entries kept in the dead-letter stream (approximately).
    deadletter_max: int = Field(10000, ge=1)
    #: messages a hub keeps as history (approximately; older ones are trimmed).
    hub_history: int = Field(100_000, ge=10)
    #: a worker: most agents it hosts (``busagent worker --capacity``).
    capacity: int = Field(1_000_000, ge=1)
    #: a worker: threads that run sync replies (at least 2: one reads while one runs).
    threads: int = Field(32, ge=2)
    #: a worker: seconds the calls it already read get to finish on a graceful stop.
    grace: float = Field(30.0, ge=0)
    #: shared secret: callers sign calls (HMAC-SHA256), workers refuse calls without a valid one.
    secret: str | None = Field(None, repr=False)
    #: OpenTelemetry spans for calls (needs ``pip install busagent[otel]``); off: no cost.
    tracing: bool = False

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        # Letters, digits, "_", "-", "." only: ":" separates a key's parts (a prefix "a:b"
        # would share keys with prefix "a"'s keys named "b..."), "*", "?" and "[" are SCAN
        # patterns (listing "bad*:..." would match other applications' keys), and spaces or
        # braces break redis-cli use and cluster hash tags.
        if not _PREFIX.fullmatch(v):
            raise ValueError("prefix must be 1-64 letters, digits, '_', '-' or '.'")
        return v

    @field_validator("namespace")
    @classmethod
    def _namespace(cls, v: str | None) -> str | None:
        if v is not None and not namespace_ok(v):
            raise ValueError(NAMESPACE_RULE)
        return v

    @property
    def block_slice(self) -> float:
        """Longest single blocking Redis read: below the socket timeout with room to spare."""
        return min(5.0, self.socket_timeout / 3)

    @classmethod
    def load(cls, **overrides: Any) -> Settings:
        """Environment first (``BUSAGENT_REDIS_URL``, ``BUSAGENT_PREFIX``, ...), then arguments
        that are not None."""
        values: dict[str, Any] = {}
        for name in cls.model_fields:
            env = os.environ.get(f"BUSAGENT_{name.upper()}")
            # An empty variable counts as unset, except the prefix: BUSAGENT_PREFIX='' reads as
            # "no prefix", which busagent cannot do, so it is refused rather than defaulted.
            if env is not None and (env != "" or name == "prefix"):
                values[name] = None if env.lower() == "none" else env
        values.update({k: v for k, v in overrides.items() if v is not None})
        unknown = set(values) - set(cls.model_fields)
        if unknown:
            raise ConfigError(
                f"unknown setting(s) {sorted(unknown)}; known: {sorted(cls.model_fields)}"
            )
        try:
            return cls(**values)
        except ValidationError as e:
            # One line per the CLI's rule: "name: what is wrong (got value)" for each setting.
            bad = "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']} (got {x['input']!r})"
                            for x in e.errors())
            raise ConfigError(f"invalid busagent settings: {bad}") from None
