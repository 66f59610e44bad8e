"""The ``busagent`` command (``python -m busagent.cli`` runs it too)."""

from __future__ import annotations

import json
import logging
import sys
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from busagent import admin, embedded
from busagent import bus as _bus
from busagent.config import Settings
from busagent.errors import BusagentError, ConfigError

app = typer.Typer(
    help="busagent: agents hosted by long-running workers on a Redis Streams bus.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
)
out = Console()
err = Console(stderr=True)

RedisOpt = Annotated[
    str | None,
    typer.Option("--redis", envvar="BUSAGENT_REDIS_URL",
                 help="Redis URL (redis://, rediss://, unix://); default: the shared embedded one"),
]
PrefixOpt = Annotated[str | None, typer.Option("--prefix", envvar="BUSAGENT_PREFIX",
                                               help="key prefix (default busagent)")]
JsonOpt = Annotated[bool, typer.Option("--json", help="machine-readable output")]


def _connect(url: str | None, prefix: str | None, start: bool = False) -> _bus.Bus:
    if url is None:
        url = embedded.start_shared() if start else embedded.shared_url()
        if url is None:
            raise ConfigError(
                "no Redis to talk to: pass --redis URL, set BUSAGENT_REDIS_URL, or start the "
                "embedded one with `busagent redis`"
            )
    return _bus.init(url, prefix=prefix)


def _print_json(obj: Any) -> None:
    out.print_json(json.dumps(obj, default=str))


def _table(rows: list[dict[str, Any]], cols: list[str]) -> None:
    t = Table(*cols)
    for r in rows:
        t.add_row(*[str(r.get(c, "")) for c in cols])
    out.print(t)


@app.command()
def worker(
    agents: Annotated[list[str], typer.Option("--agents", "-a",
                                              help="module or .py file to load agents from")],
    name: Annotated[str | None, typer.Option(help="server name (default host-pid)")] = None,
    url: RedisOpt = None,
    prefix: PrefixOpt = None,
    capacity: Annotated[int | None, typer.Option(
        help="most agents this server hosts (BUSAGENT_CAPACITY, default 1000000)")] = None,
    threads: Annotated[int | None, typer.Option(
        help="threads for sync replies (BUSAGENT_THREADS, default 32)")] = None,
    grace: Annotated[float | None, typer.Option(
        help="seconds in-flight calls get on stop (BUSAGENT_GRACE, default 30)")] = None,
    parent_pid: Annotated[int | None, typer.Option(hidden=True)] = None,
    log_level: Annotated[str, typer.Option(help="DEBUG, INFO, WARNING")] = "INFO",
) -> None:
    """Run a worker that hosts agents of the given modules until SIGTERM or `busagent stop`."""
    from busagent.worker import run

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(name)s %(message)s")
    # Settings first: bad input must not start a shared Redis as a side effect.
    settings = Settings.load(redis_url=url, prefix=prefix, capacity=capacity, threads=threads,
                             grace=grace)
    if settings.redis_url is None:
        settings = settings.model_copy(update={"redis_url": embedded.start_shared()})
    run(name, agents, settings, parent_pid=parent_pid)


@app.command()
def servers(url: RedisOpt = None, prefix: PrefixOpt = None, as_json: JsonOpt = False) -> None:
    """List servers: state (up, late, stopping, dead), cpu, memory, agents."""
    _connect(url, prefix)
    rows = admin.servers()
    if as_json:
        _print_json(rows)
        return
    for r in rows:
        # A late or dead server's silence is the first thing an operator wants to know.
        r["state"] = r["state"] if r["state"] in ("up", "stopping") else (
            f"{r['state']} ({r['age']}s)")
        r["modules"] = ",".join(r["modules"])
    _table(rows, ["name", "state", "host", "pid", "cpu", "mem", "agents", "inflight",
                  "capacity", "modules"])


@app.command()
def agents(
    server: Annotated[str | None, typer.Option(help="only this server's agents")] = None,
    url: RedisOpt = None, prefix: PrefixOpt = None, as_json: JsonOpt = False,
) -> None:
    """List registered agents."""
    _connect(url, prefix)
    rows = admin.agents(server)
    if as_json:
        _print_json(rows)
    else:
        _table(rows, ["id", "name", "cls", "server"])


@app.command()
def memory(agent: str, url: RedisOpt = None, prefix: PrefixOpt = None,
           as_json: JsonOpt = False) -> None:
    """Show an agent's memory as of its last completed call."""
    _connect(url, prefix)
    admin.agent_info(agent)
    items = [m.model_dump() if hasattr(m, "model_dump") else m
             for m in admin.agent_memory(agent)]
    if as_json:
        _print_json(items)
    else:
        _table([m if isinstance(m, dict) else {"content": m} for m in items],
               ["timestamp", "name", "role", "content"])


@app.command()
def info(server: str, url: RedisOpt = None, prefix: PrefixOpt = None,
         as_json: JsonOpt = False) -> None:
    """Show one server's registry record."""
    _connect(url, prefix)
    data = admin.ServerClient(server).get_server_info()
    if as_json:
        _print_json(data)
    else:
        _table([{"field": k, "value": v} for k, v in data.items()], ["field", "value"])


@app.command()
def stop(
    server: str,
    drain: Annotated[bool, typer.Option(help="move its agents to other servers first")] = False,
    url: RedisOpt = None, prefix: PrefixOpt = None,
) -> None:
    """Stop a server gracefully: in-flight calls finish; --drain moves its agents elsewhere."""
    _connect(url, prefix)
    admin.ServerClient(server).stop(drain=drain)
    out.print(f"{'draining' if drain else 'stopping'} {server}")


@app.command()
def deadletter(
    replay: Annotated[str | None, typer.Option(help="send this entry's call again")] = None,
    count: Annotated[int, typer.Option(help="newest entries to show")] = 100,
    url: RedisOpt = None, prefix: PrefixOpt = None, as_json: JsonOpt = False,
) -> None:
    """List calls given up on (their workers kept dying, or they were malformed), or replay one."""
    _connect(url, prefix)
    if replay:
        out.print(f"replayed call {admin.replay(replay)}")
        return
    rows = admin.deadletters(count)
    if as_json:
        _print_json(rows)
    else:
        _table(rows, ["id", "call", "agent", "kind", "tries", "server", "reason"])


@app.command()
def delete(
    agent: Annotated[str | None, typer.Argument(help="agent id")] = None,
    all_: Annotated[bool, typer.Option("--all", help="every agent of --server")] = False,
    server: Annotated[str | None, typer.Option(help="with --all: the server")] = None,
    url: RedisOpt = None, prefix: PrefixOpt = None,
) -> None:
    """Delete one agent, or every agent of a server with --all --server S."""
    _connect(url, prefix)
    if all_:
        if not server:
            raise ConfigError("--all needs --server NAME")
        n = admin.ServerClient(server).delete_all_agent()
        out.print(f"deleted {n} agent(s) on {server}")
        return
    if not agent:
        raise ConfigError("name an agent id, or use --all --server NAME")
    info_ = admin.agent_info(agent)
    admin.ServerClient(info_.server).delete_agent(agent)
    out.print(f"deleted {agent}")


@app.command(name="redis")
def redis_cmd(
    stop_: Annotated[bool, typer.Option("--stop", help="stop the shared embedded Redis")] = False,
    port: Annotated[int | None, typer.Option(help="TCP port (default 6390)")] = None,
    bind: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    password: Annotated[str | None, typer.Option(help="require this password")] = None,
) -> None:
    """Start (or show) the shared embedded Redis and print its URL."""
    if stop_:
        out.print("stopped" if embedded.stop_shared() else "not running")
        return
    print(embedded.start_shared(port=port, bind=bind, password=password))


@app.command()
def models(
    load: Annotated[str | None, typer.Option(help="store the configs of this JSON file")] = None,
    server: Annotated[str | None, typer.Option(help="only for this server")] = None,
    url: RedisOpt = None, prefix: PrefixOpt = None, as_json: JsonOpt = False,
) -> None:
    """List model configs, or store a JSON file of them (--load) for every worker."""
    from busagent import models as _models

    _connect(url, prefix)
    if load:
        names = _models.load_model_configs(load, server=server)
        out.print(f"stored {len(names)} model config(s): {', '.join(names)}")
        return
    rows = [{**c.model_dump(), "api_key": "***" if c.api_key else None}
            for c in _models.list_model_configs(server).values()]
    if as_json:
        _print_json(rows)
    else:
        _table(rows, ["config_name", "model_type", "model_name", "base_url", "concurrency"])


@app.command(name="fake-llm")
def fake_llm(
    port: Annotated[int, typer.Option(help="TCP port")] = 8000,
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    latency: Annotated[float, typer.Option(help="seconds each answer takes")] = 0.0,
    fail_every: Annotated[int, typer.Option(help="answer every Nth request with 503")] = 0,
) -> None:
    """Serve a fake OpenAI-compatible chat endpoint (for trying LLM agents without a model)."""
    from busagent.fakellm import FakeLLM

    fake = FakeLLM(host, port, latency=latency, fail_every=fail_every)
    print(f"fake OpenAI-compatible endpoint on {fake.url} (Ctrl-C stops it)", flush=True)
    try:
        fake.server.serve_forever()
    finally:
        fake.server.server_close()


population_app = typer.Typer(help="Populations of agents with backgrounds.",
                              no_args_is_help=True)
app.add_typer(population_app, name="population")


@population_app.command("build")
def population_build(
    config: Annotated[str, typer.Argument(help="population config, JSON or YAML")],
    out: Annotated[str, typer.Option(help="JSON-lines file to write (a re-run resumes it)")] = (
        "people.jsonl"),
    model_config: Annotated[str | None, typer.Option(
        help="JSON file of model configs to store in Redis for the workers")] = None,
    config_name: Annotated[str | None, typer.Option(
        help="model config that writes the backgrounds; without it, the config's template")
    ] = None,
    count: Annotated[int | None, typer.Option(help="people to build (default: the config's)")
                     ] = None,
    seed: Annotated[int | None, typer.Option(help="sampling seed (default: the config's)")
                    ] = None,
    writers: Annotated[int, typer.Option(help="writer agents on workers (model builds)")] = 4,
    batch: Annotated[int, typer.Option(help="rows per message to a writer")] = 32,
    url: RedisOpt = None, prefix: PrefixOpt = None,
) -> None:
    """Sample a population's attributes and write each person's background (by an LLM on the
    workers with --config-name, else from the template); prints a one-line summary."""
    from busagent import population

    cfg = population.load_config(config, count=count, seed=seed)
    if model_config and not config_name:
        raise ConfigError("--model-config needs --config-name: the config that writes")
    if config_name:
        # A model build runs on the bus: the given Redis, else busagent.init()'s default (the
        # shared embedded one if running, else a private one with child workers).
        _bus.init(url, **({"prefix": prefix} if prefix else {}))
        if model_config:
            from busagent import models as _models

            _models.load_model_configs(model_config)
    report = population.build(cfg, out, model_config_name=config_name, writers=writers,
                              batch=batch, progress=sys.stderr.isatty())
    rate = report.written / report.seconds if report.seconds else 0.0
    tokens = (f", tokens {report.prompt_tokens} prompt + {report.completion_tokens} completion"
              if config_name else "")
    print(f"{out}: {report.written} rows written, {report.kept} kept from before, "
          f"{report.seconds:.1f} s ({rate:,.0f} rows/s){tokens}")


@app.command()
def demo(url: RedisOpt = None) -> None:
    """Run the quickstart: a DAG of agents that each sleep 1 s, run in parallel."""
    from busagent.demo import main as demo_main

    demo_main(url)


def main() -> None:
    try:
        app()
    except BusagentError as e:
        err.print(f"error: {e}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
