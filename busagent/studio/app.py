"""The studio's web application: a Starlette app (served by uvicorn) over the same Redis as
everyone else, so it runs on any machine that reaches Redis.

``/`` is the page (static files shipped in the package, no build step); ``/api/...`` the JSON API
the page itself uses (the README lists it); ``/api/events`` a server-sent event stream with a
sample of every server each ``interval`` seconds; ``/metrics`` Prometheus' text.

Safety: every request that changes something (any method but GET and HEAD) needs the token, as
``Authorization: Bearer T`` or ``X-Busagent-Token: T``; without it the answer is 401 with a
one-line reason. Reads need no token (like Ray's dashboard and Flower by default): bind to a
loopback address, as ``busagent studio`` does unless told otherwise, to keep them private.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hmac
import json
import time
from collections.abc import AsyncIterator
from importlib import resources
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send

from busagent import admin
from busagent.errors import (
    AgentError,
    BusagentError,
    BusError,
    CallTimeout,
    PlacementError,
    UnknownAgent,
    UnknownName,
    UsageError,
)

from . import data, metrics

#: samples kept for the charts (count): ten minutes at the default interval of 1 s.
HISTORY = 600
#: the window of the charts' p50/p99 (seconds).
WINDOW = 60.0

STATIC = resources.files("busagent.studio") / "static"


class Sampler:
    """Reads every server each ``interval`` seconds and keeps the last ``HISTORY`` samples:
    ``{t, rate (calls/s), err (errors/s), p50, p99, servers: {name: {rate, err, p50, p99, cpu,
    mem, state}}}`` (p50/p99 in seconds, of the calls answered in the last ``WINDOW`` seconds,
    from the workers' histograms).

    Rates come from heartbeat to heartbeat: the counters of a server's newest heartbeat minus
    those of the one before, over the time between the two (their own Redis-clock stamps). The
    studio samples more often than workers beat, so a diff between two samples would be the
    whole heartbeat's count over one sample's time, then 0, alternating. Between heartbeats a
    server keeps its last rate; a dead server's is 0."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.samples: collections.deque[dict[str, Any]] = collections.deque(maxlen=HISTORY)
        self.summary: dict[str, Any] | None = None
        self.error: str | None = None
        self._raw: collections.deque[tuple[float, dict[str, dict[str, Any]]]] = (
            collections.deque(maxlen=HISTORY))
        #: per server: (heartbeat, calls, errors) of its newest heartbeat seen, and the
        #: (calls/s, errors/s) between it and the one before.
        self._beats: dict[str, tuple[float, int, int]] = {}
        self._rates: dict[str, tuple[float, float]] = {}
        self.tick = 0

    def _rate(self, s: dict[str, Any]) -> tuple[float, float]:
        name, beat = s["name"], float(s["heartbeat"])
        prev = self._beats.get(name)
        if prev is None or beat < prev[0]:
            # First sight (or a record rewritten by a new worker under the name): nothing to
            # diff with yet; the worker's own calls/s over its last interval is the best guess.
            self._rates[name] = (float(s["rate"]), 0.0)
        elif beat > prev[0]:
            dt = beat - prev[0]
            # A worker restarted under the name starts its counters at 0 again: no negative rate.
            self._rates[name] = (max(0, s["calls"] - prev[1]) / dt,
                                 max(0, s["errors"] - prev[2]) / dt)
        self._beats[name] = (beat, s["calls"], s["errors"])
        if s["state"] == "dead":
            return 0.0, 0.0
        return self._rates[name]

    def sample(self) -> None:
        """One sample (blocking: run it on a thread)."""
        try:
            summ = data.summary()
        except BusagentError as e:
            self.error = str(e)
            return
        self.error = None
        now = time.time()
        cur = {s["name"]: s for s in summ["rows"]}
        old = next((r for r in self._raw if now - r[0] <= WINDOW), None)
        per: dict[str, Any] = {}
        tot_rate, tot_err, tot_buckets = 0.0, 0.0, list[int]()
        for name, s in cur.items():
            rate, err = self._rate(s)
            base = old[1].get(name) if old else None
            window = _diff(s["latency"], base["latency"] if base else [])
            tot_buckets = _add(tot_buckets, window)
            tot_rate += rate
            tot_err += err
            per[name] = {"rate": round(rate, 2), "err": round(err, 2), "cpu": s["cpu"],
                         "mem": s["mem"], "p50": data.quantile(window, 0.5),
                         "p99": data.quantile(window, 0.99), "state": s["state"]}
        for gone in set(self._beats) - set(cur):  # forgotten records
            self._beats.pop(gone)
            self._rates.pop(gone, None)
        self._raw.append((now, {k: {"latency": v["latency"]} for k, v in cur.items()}))
        self.samples.append({"t": round(now, 3), "rate": round(tot_rate, 2),
                             "err": round(tot_err, 2), "p50": data.quantile(tot_buckets, 0.5),
                             "p99": data.quantile(tot_buckets, 0.99), "servers": per})
        self.summary = summ
        self.tick += 1

    async def run(self) -> None:
        while True:
            await anyio.to_thread.run_sync(self.sample)
            await asyncio.sleep(self.interval)


def _diff(a: list[int], b: list[int]) -> list[int]:
    return [x - (b[i] if i < len(b) else 0) for i, x in enumerate(a)]


def _add(a: list[int], b: list[int]) -> list[int]:
    n = max(len(a), len(b))
    return [(a[i] if i < len(a) else 0) + (b[i] if i < len(b) else 0) for i in range(n)]


def _status(err: BusagentError) -> int:
    if isinstance(err, UnknownAgent | PlacementError | UnknownName):
        return 404
    if isinstance(err, UsageError | AgentError):
        return 400
    if isinstance(err, CallTimeout):
        return 504
    if isinstance(err, BusError):
        return 503
    return 500


async def _busagent_error(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, BusagentError)
    return JSONResponse({"error": str(exc), "type": type(exc).__name__}, _status(exc))


class TokenGate:
    """ASGI middleware: 401 for a request that changes something without the token (a plain
    ASGI layer, so the event streams pass through it unbuffered)."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self.token = token.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] not in ("GET", "HEAD"):
            h = Headers(scope=scope)
            given = h.get("x-busagent-token", "")
            auth = h.get("authorization", "")
            if auth.lower().startswith("bearer "):
                given = auth[7:].strip()
            if not hmac.compare_digest(given.encode(), self.token):
                await JSONResponse(
                    {"error": "this request changes something and needs the studio's token "
                              "(Authorization: Bearer TOKEN, printed when the studio started)",
                     "type": "Unauthorized"}, 401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _int(request: Request, name: str, default: int) -> int:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise UsageError(f"query parameter {name} must be an integer (got {raw!r})") from None


def create_app(token: str, interval: float = 1.0) -> Starlette:
    """The studio on the process-wide bus (``busagent.init()`` first). ``token``: what a
    changing request must carry; ``interval``: seconds between samples (live views, charts)."""
    sampler = Sampler(interval)

    # --- reads (plain functions: Starlette runs them on its thread pool, off the loop) ----

    def index(_: Request) -> Response:
        return FileResponse(str(STATIC / "index.html"))

    def api_summary(_: Request) -> Response:
        return JSONResponse(data.summary())

    def api_servers(_: Request) -> Response:
        return JSONResponse(data.servers())

    def api_history(_: Request) -> Response:
        return JSONResponse(list(sampler.samples))

    def api_agents(r: Request) -> Response:
        q = r.query_params
        return JSONResponse(data.agents_page(q.get("cursor", "0"), _int(r, "count", 50),
                                             q.get("q", ""), q.get("server", ""),
                                             q.get("cls", ""), q.get("namespace", "")))

    def api_agent(r: Request) -> Response:
        return JSONResponse(data.agent(r.path_params["id"], _int(r, "mem_start", 0),
                                       _int(r, "mem_count", 50)))

    def api_calls(_: Request) -> Response:
        return JSONResponse(data.calls_now())

    def api_deadletters(r: Request) -> Response:
        return JSONResponse(admin.deadletters(data.page_size(_int(r, "count", 100))))

    def api_hubs(_: Request) -> Response:
        return JSONResponse(data.hubs())

    def api_hub(r: Request) -> Response:
        return JSONResponse({"name": r.path_params["name"],
                             "members": data.hub_members(r.path_params["name"])})

    def api_hub_messages(r: Request) -> Response:
        return JSONResponse(data.hub_messages(r.path_params["name"],
                                              r.query_params.get("after", ""),
                                              _int(r, "count", 100)))

    def api_logs(r: Request) -> Response:
        return JSONResponse(data.logs(r.path_params["server"], r.query_params.get("after", ""),
                                      _int(r, "count", 200)))

    def api_models(_: Request) -> Response:
        return JSONResponse(data.models())

    def api_metrics(_: Request) -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    # --- changes (need the token: TokenGate) ----------------------------------------------

    def api_delete_agent(r: Request) -> Response:
        data.delete_agent(r.path_params["id"])
        return JSONResponse({"deleted": r.path_params["id"]})

    def api_stop(r: Request) -> Response:
        name, how = r.path_params["name"], r.path_params["how"]
        if how not in ("stop", "drain"):
            raise UsageError(f"POST /api/servers/NAME/stop or .../drain, not {how!r}")
        ok = admin.ServerClient(name).stop(drain=how == "drain")
        return JSONResponse({"server": name, "acknowledged": ok})

    def api_forget(r: Request) -> Response:
        data.forget_server(r.path_params["name"])
        return JSONResponse({"forgotten": r.path_params["name"]})

    def api_replay(r: Request) -> Response:
        return JSONResponse({"call": admin.replay(r.path_params["id"])})

    # --- live ------------------------------------------------------------------------------

    async def api_events(r: Request) -> Response:
        async def gen() -> AsyncIterator[str]:
            seen = -1
            while not await r.is_disconnected():
                if sampler.tick != seen and sampler.summary is not None:
                    seen = sampler.tick
                    payload = {"summary": sampler.summary, "sample": sampler.samples[-1],
                               "error": sampler.error}
                    yield f"data: {json.dumps(payload, default=str)}\n\n"
                elif sampler.error:
                    yield f"data: {json.dumps({'error': sampler.error})}\n\n"
                await asyncio.sleep(min(interval, 0.5))
        return StreamingResponse(gen(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    async def api_hub_events(r: Request) -> Response:
        name = r.path_params["name"]
        after = r.query_params.get("after", "")
        # Bad input is answered once, before the stream starts (400/404), not retried forever.
        if after:
            data.stream_id(after)
        await anyio.to_thread.run_sync(data.hub_exists, name)

        async def gen() -> AsyncIterator[str]:
            last, failing = after, ""
            while not await r.is_disconnected():
                try:
                    got = await anyio.to_thread.run_sync(data.hub_messages, name, last, 100)
                    failing = ""
                except UsageError as e:  # the hub was removed meanwhile: say so once, end
                    yield f"event: failure\ndata: {json.dumps({'error': str(e)})}\n\n"
                    return
                except BusagentError as e:
                    # Redis failing: keep trying (it may come back), but say it once per
                    # outage, not once per poll.
                    if str(e) != failing:
                        failing = str(e)
                        yield f"event: failure\ndata: {json.dumps({'error': failing})}\n\n"
                    got = []
                for m in got:
                    last = m["seq"]
                    yield f"data: {json.dumps(m)}\n\n"
                if not got:
                    await asyncio.sleep(0.3)
        return StreamingResponse(gen(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        task = asyncio.create_task(sampler.run())
        try:
            yield
        finally:
            task.cancel()

    routes = [
        Route("/", index),
        Route("/metrics", api_metrics),
        Route("/api/summary", api_summary),
        Route("/api/servers", api_servers),
        Route("/api/history", api_history),
        Route("/api/events", api_events),
        Route("/api/servers/{name}/{how:str}", api_stop, methods=["POST"]),
        Route("/api/servers/{name}", api_forget, methods=["DELETE"]),
        Route("/api/agents", api_agents),
        Route("/api/agents/{id}", api_agent),
        Route("/api/agents/{id}", api_delete_agent, methods=["DELETE"]),
        Route("/api/calls", api_calls),
        Route("/api/deadletters", api_deadletters),
        Route("/api/deadletters/{id}/replay", api_replay, methods=["POST"]),
        Route("/api/hubs", api_hubs),
        Route("/api/hubs/{name}", api_hub),
        Route("/api/hubs/{name}/messages", api_hub_messages),
        Route("/api/hubs/{name}/events", api_hub_events),
        Route("/api/logs/{server}", api_logs),
        Route("/api/models", api_models),
        # follow_symlink: a strict editable install (the README's) ships the files as symlinks
        # into the checkout, which StaticFiles refuses by default (every asset a 404).
        Mount("/static", StaticFiles(directory=str(STATIC), follow_symlink=True),
              name="static"),
    ]
    app = Starlette(routes=routes, lifespan=lifespan,
                    middleware=[Middleware(TokenGate, token=token)],
                    exception_handlers={BusagentError: _busagent_error})
    app.state.sampler = sampler
    return app
