"""Model configs and model wrappers, looked up by ``config_name`` as in AgentScope.

Configs live in Redis so that every worker sees the same ones (``{p}:models``), and a server may
override them for itself (``{p}:models:{server}``, set with ``ServerClient.set_model_configs``):
the paper's setup, where each machine talks to its own local vLLM, is one global config whose
``base_url`` says ``localhost``, or one override per server.

    busagent.load_model_configs("configs/model_configs.json")
    model = busagent.models.get("qwen")           # inside an agent, on any worker
    text = (await model.acall(messages)).text     # async: hundreds in flight per worker
    text = model(messages).text                   # or blocking, from a plain reply

Model types: ``openai_chat`` (any ``/v1/chat/completions`` endpoint: vLLM, llama.cpp, OpenAI)
and ``scripted`` (canned lines, for examples and tests that need no model at all).
"""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import re
import threading
import time
import weakref
from collections.abc import AsyncIterator, Iterable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import openai
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from . import bus as _bus
from .errors import ConfigError, ModelError
from .message import Msg
from .tuning import MODEL_CONFIG_REFRESH

#: HTTP statuses the client retries: rate limits and a busy or restarting server
RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})


class ModelConfig(BaseModel):
    """One model config. Unknown fields are kept (AgentScope configs carry many)."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())

    config_name: str
    model_type: str
    model_name: str = ""
    api_key: str | None = None
    base_url: str | None = None
    #: AgentScope puts base_url here: ``{"base_url": ...}``
    client_args: dict[str, Any] = Field(default_factory=dict)
    generate_args: dict[str, Any] = Field(default_factory=dict)
    timeout: float = 60.0
    max_retries: int = 3
    #: requests one worker process keeps in flight to this model at most
    concurrency: int = 64
    #: for ``scripted``: the lines it says, in turn
    lines: list[str] = Field(default_factory=list)


class Usage(BaseModel):
    """Tokens a call (or a sum of calls) used, as the server reported them."""

    model_config = ConfigDict(frozen=True)

    prompt: int = 0
    completion: int = 0
    #: how many calls these tokens are the sum of
    calls: int = 0

    @property
    def total(self) -> int:
        return self.prompt + self.completion

    def __add__(self, other: Usage) -> Usage:
        return Usage(prompt=self.prompt + other.prompt,
                     completion=self.completion + other.completion,
                     calls=self.calls + other.calls)

    @classmethod
    def of(cls, usage: Any) -> Usage | None:
        """From an OpenAI ``usage`` object or dict; None when the server sent none."""
        if usage is None:
            return None
        if not isinstance(usage, dict):
            usage = {k: getattr(usage, k, None) for k in ("prompt_tokens", "completion_tokens")}
        return cls(prompt=int(usage.get("prompt_tokens") or 0),
                   completion=int(usage.get("completion_tokens") or 0), calls=1)


class ModelResponse(BaseModel):
    text: str
    #: tokens this call used; None when the endpoint does not report them
    usage: Usage | None = None
    raw: dict[str, Any] | None = None


Messages = Sequence[Msg | dict[str, Any]]


def format_messages(msgs: Messages | Msg) -> list[dict[str, Any]]:
    """Chat-completion messages from Msgs (or dicts already in that shape)."""
    items: Iterable[Msg | dict[str, Any]] = [msgs] if isinstance(msgs, Msg) else msgs
    out = []
    for m in items:
        if isinstance(m, Msg):
            out.append({"role": m.role if m.role in ("system", "user", "assistant") else "user",
                        "name": m.name, "content": m.content if isinstance(m.content, str)
                        else json.dumps(m.content, default=str)})
        else:
            out.append(dict(m))
    return out


class Model:
    """Base class: ``await model.acall(messages)``, ``model(messages)``, ``model.astream(...)``."""

    def __init__(self, config: ModelConfig) -> None:
        self.config = config
        self.config_name = config.config_name

    async def acall(self, messages: Messages | Msg, **kwargs: Any) -> ModelResponse:
        raise NotImplementedError

    async def astream(self, messages: Messages | Msg, **kwargs: Any) -> AsyncIterator[str]:
        """The reply in pieces as they come (the whole reply at once unless overridden)."""
        yield (await self.acall(messages, **kwargs)).text

    def __call__(self, messages: Messages | Msg, **kwargs: Any) -> ModelResponse:
        """Blocking call, for a plain (not async) reply running on a worker thread. It runs on
        one background loop per process, so blocking callers share the pool and the cap."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run_coroutine_threadsafe(self.acall(messages, **kwargs),
                                                    _background()).result()
        raise ConfigError("model(...) blocks; inside async code use `await model.acall(...)`")


_loop: asyncio.AbstractEventLoop | None = None
_loop_lock = threading.Lock()


def _background() -> asyncio.AbstractEventLoop:
    global _loop
    with _loop_lock:
        if _loop is None:
            _loop = asyncio.new_event_loop()
            threading.Thread(target=_loop.run_forever, name="busagent-models",
                             daemon=True).start()
        return _loop


class ScriptedModel(Model):
    """Says its ``lines`` in turn (with ``{name}`` and ``{last}`` filled in: the speaker's name
    and the last message's text); without lines, a short acknowledgement of the last message."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self._turn = 0
        self._lock = threading.Lock()

    def _next(self, messages: Messages | Msg, name: str) -> str:
        msgs = format_messages(messages)
        last = str(msgs[-1]["content"]) if msgs else ""
        with self._lock:
            turn = self._turn
            self._turn += 1
        if not self.config.lines:
            return f"{name or 'I'} heard: {last[:80]}"
        return self.config.lines[turn % len(self.config.lines)].format(name=name, last=last)

    async def acall(self, messages: Messages | Msg, **kwargs: Any) -> ModelResponse:
        return ModelResponse(text=self._next(messages, str(kwargs.get("name", ""))))

    async def astream(self, messages: Messages | Msg, **kwargs: Any) -> AsyncIterator[str]:
        text = self._next(messages, str(kwargs.get("name", "")))
        for i, word in enumerate(text.split(" ")):
            yield word if i == 0 else " " + word


#: the vendor's endpoint, for ``openai_chat`` and ``openai`` configs without a base_url
OPENAI_BASE_URL = "https://api.openai.com/v1"
#: model types whose missing base_url means the vendor's endpoint (``vllm`` has no vendor)
VENDOR_TYPES = frozenset({"openai_chat", "openai"})
#: what the openai client sends as the key to a local server that wants none (vLLM's own docs
#: use "EMPTY"); the client refuses to start without one
NO_KEY = "EMPTY"
#: keyword arguments ``chat.completions.create`` takes itself; any other generate arg (vLLM's
#: ``top_k``, ``repetition_penalty``...) goes into the request body as ``extra_body``
_CREATE_ARGS = frozenset(inspect.signature(
    openai.resources.chat.AsyncCompletions.create).parameters) - {"self"}


class OpenAIChatModel(Model):
    """An OpenAI-compatible ``/v1/chat/completions`` endpoint, through the official ``openai``
    package's async client (what vLLM, llama.cpp server and Ollama users already use).

    The client does the HTTP: every request has the config's ``timeout`` (s); timeouts, refused
    connections and 408/409/429/5xx are retried ``max_retries`` times with its jittered
    exponential backoff, honouring ``Retry-After``. busagent adds the per-process cap: at most
    ``concurrency`` requests are in flight per worker, the rest wait their turn instead of
    overloading the server. Every failure raises ``ModelError`` (one line, naming the config).

    The endpoint is ``base_url`` (or ``client_args.base_url``); an ``openai_chat`` or ``openai``
    config without one uses ``OPENAI_BASE_URL`` or the vendor's ``https://api.openai.com/v1``,
    and ``OPENAI_API_KEY`` when it has no ``api_key``, as AgentScope (through the same SDK)
    does. Raises ConfigError for a ``vllm`` config without a base_url.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        args = config.client_args
        base = config.base_url or args.get("base_url")
        api_key = config.api_key or args.get("api_key")
        if config.model_type in VENDOR_TYPES:
            # No base_url means the vendor's endpoint (or OPENAI_BASE_URL), no api_key means
            # OPENAI_API_KEY, both read where the model runs (the worker).
            base = base or os.environ.get("OPENAI_BASE_URL") or OPENAI_BASE_URL
            api_key = api_key or os.environ.get("OPENAI_API_KEY")
        if not base:
            raise ConfigError(
                f"model config {config.config_name!r} ({config.model_type}) has no base_url: "
                "set \"base_url\" (or client_args.base_url) to the endpoint, e.g. "
                "http://localhost:8000/v1"
            )
        self.base_url = str(base).rstrip("/")
        self.url = self.base_url + "/chat/completions"
        self.api_key = str(api_key) if api_key else None
        self.headers = {"Content-Type": "application/json"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        organization = config.model_extra.get("organization") if config.model_extra else None
        self.organization = str(organization or args.get("organization") or "") or None
        if self.organization:
            self.headers["OpenAI-Organization"] = self.organization
        #: tokens used by this process through this config: ``prompt``, ``completion``, ``calls``
        self.usage = Usage()
        self._usage_lock = threading.Lock()
        #: ask streams for their usage until the server refuses the option once
        self._stream_usage = True
        # One client and one cap per event loop: the client's connection pool is bound to the
        # loop that made it, and a worker has one loop, the calling program another.
        self._per_loop: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, tuple[openai.AsyncOpenAI, asyncio.Semaphore]
        ] = weakref.WeakKeyDictionary()

    def _client(self) -> tuple[openai.AsyncOpenAI, asyncio.Semaphore]:
        loop = asyncio.get_running_loop()
        got = self._per_loop.get(loop)
        if got is None:
            n = max(1, self.config.concurrency)
            client = openai.AsyncOpenAI(
                api_key=self.api_key or NO_KEY, organization=self.organization,
                base_url=self.base_url, timeout=self.config.timeout,
                max_retries=max(0, self.config.max_retries))
            got = (client, asyncio.Semaphore(n))
            self._per_loop[loop] = got
        return got

    def _args(self, messages: Messages | Msg, kwargs: dict[str, Any]) -> dict[str, Any]:
        body: dict[str, Any] = {**self.config.generate_args,
                                **{k: v for k, v in kwargs.items() if k != "name"}}
        extra = {k: body.pop(k) for k in list(body) if k not in _CREATE_ARGS}
        if extra:
            body["extra_body"] = {**body.get("extra_body", {}), **extra}
        return {"model": self.config.model_name, "messages": format_messages(messages), **body}

    async def acall(self, messages: Messages | Msg, **kwargs: Any) -> ModelResponse:
        """One completion: ``.text`` and ``.usage`` (tokens, when the server reports them).
        Raises ModelError when the endpoint fails after its retries or answers nonsense."""
        client, cap = self._client()
        async with cap:
            try:
                r = await client.chat.completions.create(**self._args(messages, kwargs))
            except Exception as e:  # the client's, httpx's, a body that is not JSON: all one
                raise self._error(e) from e
        try:
            text = r.choices[0].message.content or ""
        except (AttributeError, IndexError, TypeError) as e:
            raise ModelError(f"{self.url} sent a reply that is not a chat completion: "
                             f"{_line(str(r))[:300]!r} (check model config "
                             f"{self.config_name!r})") from e
        usage = Usage.of(r.usage)
        self._count(usage)
        return ModelResponse(text=text, usage=usage, raw=r.model_dump(exclude_unset=True))

    def _count(self, usage: Usage | None) -> None:
        if usage is not None:
            with self._usage_lock:
                self.usage = self.usage + usage

    async def astream(self, messages: Messages | Msg, **kwargs: Any) -> AsyncIterator[str]:
        """Content deltas as they come. The client retries only before the stream starts: a
        stream that broke halfway cannot be resumed without repeating text (ModelError).

        Tokens: the request asks for usage (``stream_options: {include_usage: true}``, sent
        back in the last chunk) and adds it to ``model.usage``. A server that refuses the
        option (HTTP 400/422) is asked again without it, and not asked again by this
        process; a server that sends no usage counts nothing."""
        client, cap = self._client()
        async with cap:
            try:
                args = self._args(messages, kwargs)
                stream = None
                if self._stream_usage and "stream_options" not in args:
                    try:
                        stream = await client.chat.completions.create(
                            **args, stream=True, stream_options={"include_usage": True})
                    except (openai.BadRequestError, openai.UnprocessableEntityError):
                        stream = await client.chat.completions.create(**args, stream=True)
                        self._stream_usage = False  # refused the option, not the request
                if stream is None:
                    stream = await client.chat.completions.create(**args, stream=True)
                usage, chunks = None, 0
                async with stream:
                    async for chunk in stream:
                        chunks += 1
                        if getattr(chunk, "usage", None):
                            usage = Usage.of(chunk.usage)
                        if chunk.choices and chunk.choices[0].delta.content:
                            yield chunk.choices[0].delta.content
                if not chunks:  # a real stream has at least its role chunk
                    raise ModelError(f"{self.url} sent no stream (not server-sent events) "
                                     f"(check model config {self.config_name!r})")
                self._count(usage)
            except Exception as e:  # the client's, httpx's, a chunk that is not JSON: all one
                raise self._error(e) from e

    def _error(self, e: Exception) -> ModelError:
        """One line saying what failed, naming the config."""
        if isinstance(e, ModelError):
            return e
        where = f"(is the endpoint of model config {self.config_name!r} up?)"
        if isinstance(e, openai.APIStatusError):
            status = e.status_code
            body = _line(str(e.message))[:300]
            if status in RETRY_STATUS:
                return ModelError(f"{self.url} failed {self.config.max_retries + 1} times, "
                                  f"last: HTTP {status}: {body} {where}")
            return ModelError(f"{self.url} answered HTTP {status}: {body} "
                              f"(check model config {self.config_name!r})")
        if isinstance(e, openai.APIConnectionError):  # timeouts included
            return ModelError(f"{self.url} failed {self.config.max_retries + 1} times, last: "
                              f"{type(e).__name__}: {_line(str(e))} {where}")
        if isinstance(e, ValueError):  # JSONDecodeError among them: a body that is not JSON
            return ModelError(f"{self.url} sent a reply that is not a chat completion "
                              f"({type(e).__name__}: {_line(str(e))[:200]}) (check model "
                              f"config {self.config_name!r})")
        return ModelError(f"{self.url}: {type(e).__name__}: {_line(str(e))[:300]} "
                          f"(check model config {self.config_name!r})")


def _line(text: str) -> str:
    return " ".join(text.split())


MODEL_TYPES: dict[str, type[Model]] = {
    "openai_chat": OpenAIChatModel,
    "openai": OpenAIChatModel,
    "vllm": OpenAIChatModel,
    "scripted": ScriptedModel,
}

# config_name -> (raw JSON, model, fetched at). Models are shared by every agent of a process,
# so the concurrency cap and the connection pool are per worker, not per agent.
_cache: dict[str, tuple[str, Model, float]] = {}
_cache_lock = threading.Lock()


def parse_configs(configs: Any) -> list[ModelConfig]:
    """Configs from a JSON file path, a dict or a list of dicts."""
    if isinstance(configs, str | Path):
        try:
            configs = json.loads(Path(configs).read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot read model configs from {configs}: {e}") from e
    if isinstance(configs, dict | ModelConfig):
        configs = [configs]
    out = []
    for c in configs:
        try:
            cfg = c if isinstance(c, ModelConfig) else ModelConfig.model_validate(c)
        except ValidationError as e:
            # One line, "field: what is wrong", never pydantic's multi-line dump.
            bad = "; ".join(f"{'.'.join(map(str, x['loc'])) or 'config'}: {x['msg']}"
                            for x in e.errors())
            raise ConfigError(f"bad model config {c!r}: {bad}") from None
        if cfg.model_type not in MODEL_TYPES:
            raise ConfigError(f"model config {cfg.config_name!r}: unknown model_type "
                              f"{cfg.model_type!r}; use one of {sorted(MODEL_TYPES)}")
        if (MODEL_TYPES[cfg.model_type] is OpenAIChatModel and cfg.model_type not in VENDOR_TYPES
                and not (cfg.base_url or cfg.client_args.get("base_url"))):
            # Refused when stored, not only when a worker first uses it: the same words
            # OpenAIChatModel would say, before any agent depends on the config.
            raise ConfigError(
                f"model config {cfg.config_name!r} ({cfg.model_type}) has no base_url: set "
                "\"base_url\" (or client_args.base_url) to the endpoint, e.g. "
                "http://localhost:8000/v1")
        out.append(cfg)
    return out


def load_model_configs(configs: Any, server: str | None = None) -> list[str]:
    """Store configs in Redis for every worker (or for one ``server``); returns their names.
    Raises ConfigError for a bad config, RedisUnavailable or BusError if Redis fails."""
    parsed = parse_configs(configs)
    b = _bus.current()
    if parsed:
        with b.errors():
            b.redis.hset(b.keys.models(server),
                         mapping={c.config_name: c.model_dump_json() for c in parsed})
    return [c.config_name for c in parsed]


def clear_model_configs(server: str | None = None) -> None:
    """Remove the global configs, or ``server``'s overrides."""
    b = _bus.current()
    with b.errors():
        b.redis.delete(b.keys.models(server))


MASK = "***"
#: words that make a field a secret wherever it is (split on _, -, . and camelCase; whole words
#: only, so ``max_tokens`` and ``top_k`` stay visible).
SECRET_WORDS = frozenset({"key", "apikey", "token", "password", "passwd", "pwd", "secret",
                          "authorization", "auth", "credential", "credentials", "cookie",
                          "signature", "bearer", "passphrase"})
_WORD = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z0-9]+")


def is_secret_name(name: str) -> bool:
    """Whether a field called ``name`` holds a secret (``api_key``, ``X-Api-Key``,
    ``accessToken``, ``Authorization``, ``client_secret``, ``password``...)."""
    return any(w.lower() in SECRET_WORDS for w in _WORD.findall(name))


def masked(value: Any) -> Any:
    """``value`` (plain JSON-like data: a model config's dump) with every secret replaced by
    ``"***"``, at any depth: the values of fields whose name says secret (:func:`is_secret_name`,
    a non-empty one only, so a missing key still reads as missing), the password in a URL
    (``http://user:pw@host`` -> ``http://user:***@host``), secret query parameters of a URL
    (``?api_key=...``) and ``Bearer ...``/``Basic ...`` strings. What the studio, ``busagent
    models`` and ``busagent models --json`` show."""
    if isinstance(value, dict):
        return {k: (MASK if isinstance(k, str) and is_secret_name(k) and value_set(v)
                    else masked(v)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [masked(v) for v in value]
    if isinstance(value, str):
        return _masked_text(value)
    return value


def value_set(v: Any) -> bool:
    return v is not None and v != "" and v != {} and v != []


def _masked_text(text: str) -> str:
    low = text.lower()
    if low.startswith(("bearer ", "basic ", "token ")):
        return text.split(" ", 1)[0] + " " + MASK
    if "://" not in text:
        return text
    try:
        u = urlsplit(text)
        netloc, query = u.netloc, u.query
        if u.password is not None:
            netloc = f"{u.username or ''}:{MASK}@{netloc.rpartition('@')[2]}"
        elif "@" in netloc:  # a token as the user part: https://TOKEN@host
            netloc = f"{MASK}@{netloc.rpartition('@')[2]}"
        if query:
            pairs = parse_qsl(query, keep_blank_values=True)
            if any(is_secret_name(k) for k, _ in pairs):
                query = urlencode([(k, MASK if is_secret_name(k) else v) for k, v in pairs],
                                  safe="*")
    except ValueError:  # not a URL after all (a bad port, brackets): hide it rather than leak
        return MASK
    return urlunsplit((u.scheme, netloc, u.path, query, u.fragment))

def remove_model_configs(names: Iterable[str], server: str | None = None) -> None:
    """Remove the configs ``names`` (global, or ``server``'s overrides); absent names are
    ignored. Raises RedisUnavailable or BusError if Redis fails."""
    names = list(names)
    b = _bus.current()
    if names:
        with b.errors():
            b.redis.hdel(b.keys.models(server), *names)


def list_model_configs(server: str | None = None) -> dict[str, ModelConfig]:
    """The global configs by name, with ``server``'s overrides in their place if given."""
    b = _bus.current()
    with b.errors():
        raw = dict(b.redis.hgetall(b.keys.models(None)))
        if server:
            raw.update(b.redis.hgetall(b.keys.models(server)))
    return {(k.decode() if isinstance(k, bytes) else k): ModelConfig.model_validate_json(v)
            for k, v in raw.items()}


def get(config_name: str) -> Model:
    """The model of a config name: this server's override (on a worker: ``Bus.server_name``),
    else the global config. Re-read from Redis at most every ``MODEL_CONFIG_REFRESH`` seconds.
    Raises ConfigError if no config has this name, RedisUnavailable or BusError if Redis
    fails."""
    now = time.monotonic()
    hit = _cache.get(config_name)
    if hit is not None and now - hit[2] < MODEL_CONFIG_REFRESH:
        return hit[1]
    b = _bus.current()
    with b.errors():
        pipe = b.redis.pipeline(transaction=False)
        if b.server_name:
            pipe.hget(b.keys.models(b.server_name), config_name)
        pipe.hget(b.keys.models(None), config_name)
        found = [v for v in pipe.execute() if v]
    if not found:
        raise ConfigError(f"no model config named {config_name!r}: load it with "
                          "busagent.load_model_configs(...) or `busagent models --load FILE`")
    raw = found[0].decode() if isinstance(found[0], bytes) else str(found[0])
    with _cache_lock:
        hit = _cache.get(config_name)
        if hit is not None and hit[0] == raw:  # unchanged: keep the pool and the cap
            _cache[config_name] = (raw, hit[1], now)
            return hit[1]
        cfg = ModelConfig.model_validate_json(raw)
        model = MODEL_TYPES[cfg.model_type](cfg)
        _cache[config_name] = (raw, model, now)
        return model
