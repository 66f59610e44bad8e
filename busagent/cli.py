"""The ``busagent`` command (``python -m busagent.cli`` runs it too)."""

from __future__ import annotations

import datetime
import json
import logging
import re
import sys
from typing import Annotated, Any

import typer

# Usage errors are caught in main() to print them as one line: click's exceptions, which newer
# typer releases vendor (typer._click) and older ones import from click.
try:
    from typer._click import exceptions as _click
except ImportError:  # pragma: no cover - typer before it vendored click
    import click.exceptions as _click  # type: ignore[import-not-found,no-redef,unused-ignore]

from busagent import __version__, admin, embedded
from busagent import bus as _bus
from busagent.config import Settings
from busagent.errors import BusagentError, ConfigError

app = typer.Typer(
    help="busagent: agents hosted by long-running workers on a Redis Streams bus.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
)

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


def _console() -> Any:
    """A rich console for ``status``, ``top`` and ``logs``: text from Redis is data, never
    markup, and a pipe gets whole lines (no 80-column cut)."""
    from rich.console import Console

    return Console(markup=False, highlight=False,
                   width=None if sys.stdout.isatty() else 250)


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, default=str, ensure_ascii=False, indent=2))


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _cell(v: Any) -> str:
    """A value as table text: data, never markup; control characters escaped so one row stays
    one line; containers as JSON."""
    if v is None:
        return ""
    if isinstance(v, dict | list | tuple):
        v = json.dumps(v, default=str, ensure_ascii=False)
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1], str(v))


def _table(rows: list[dict[str, Any]], cols: list[str]) -> None:
    """Plain aligned columns, as ``docker ps`` prints them: nothing is interpreted as markup
    and nothing is cut, whatever the terminal's width or a pipe (an id must stay usable)."""
    cells = [[_cell(r.get(c)) for c in cols] for r in rows]
    widths = [max([len(c), *(len(row[i]) for row in cells)]) for i, c in enumerate(cols)]
    for row in [cols, *cells]:
        print("  ".join(x.ljust(w) for x, w in zip(row, widths, strict=True)).rstrip())


def _when(ts: float) -> str:
    """Epoch seconds as local ISO time with its offset."""
    return datetime.datetime.fromtimestamp(ts).astimezone().isoformat(timespec="seconds")


def _ago(seconds: float) -> str:
    return f"{seconds:.1f} s ago"


def _version(value: bool) -> None:
    if value:
        print(f"busagent {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", is_eager=True, callback=_version,
                                          help="print the version and exit")] = False,
) -> None:
    """busagent: agents hosted by long-running workers on a Redis Streams bus."""


@app.command()
def worker(
    agents: Annotated[list[str], typer.Option("--agents", "-a",
                                              help="module or .py file to load agents from")],
    name: Annotated[str | None, typer.Option(help="server name (default host-pid)")] = None,
    url: RedisOpt = None,
    prefix: PrefixOpt = None,
    capacity: Annotated[int | None, typer.Option(
        min=1, help="most agents this server hosts (BUSAGENT_CAPACITY, default 1000000)")] = None,
    threads: Annotated[int | None, typer.Option(
        min=1, help="threads for sync replies (BUSAGENT_THREADS, default 32)")] = None,
    grace: Annotated[float | None, typer.Option(
        min=0, help="seconds in-flight calls get on stop (BUSAGENT_GRACE, default 30)")] = None,
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
    """List servers: state (up, late, stopping, dead), last heartbeat, cpu, memory, agents.
    --json gives times as epoch seconds and ``age`` in seconds."""
    _connect(url, prefix)
    rows = admin.servers()
    if as_json:
        _print_json(rows)
        return
    for r in rows:
        r["heartbeat"] = _ago(r["age"])
        r["cpu"] = f"{r['cpu']:.1f} %"
        r["mem"] = f"{r['mem']:.1f} MiB"
        r["modules"] = ",".join(r["modules"])
    _table(rows, ["name", "state", "heartbeat", "host", "pid", "cpu", "mem", "agents",
                  "inflight", "capacity", "modules"])


@app.command()
def agents(
    server: Annotated[str | None, typer.Option(help="only this server's agents")] = None,
    namespace: Annotated[str | None, typer.Option(help="only this namespace's agents")] = None,
    url: RedisOpt = None, prefix: PrefixOpt = None, as_json: JsonOpt = False,
    limit: Annotated[int | None, typer.Option(
        min=1, help="one page of about this many registry records (then see --cursor)")] = None,
    cursor: Annotated[int, typer.Option(
        min=0, help="where the page starts: 0, or the cursor the last page printed")] = 0,
) -> None:
    """List registered agents (with their namespace, registered name and lifetime), streamed
    page by page (in Redis's scan order). With --limit, one page from --cursor; the next cursor
    goes to stderr (0: the end)."""
    _connect(url, prefix)
    if limit is None:
        rows = admin.iter_agents(server, namespace=namespace)
        nxt = None
    else:
        nxt, page = admin.agent_page(cursor, limit, server, namespace)
        rows = iter(page)
    cols = ["id", "name", "cls", "server", "namespace", "registered", "lifetime"]

    def shown(r: dict[str, Any]) -> dict[str, Any]:
        return {**r, "registered": r.get("registered") or "",
                "lifetime": "owned" if r.get("owner") else "detached"}

    # Printed as read, never collected first: a million rows start at once and cost no memory.
    if as_json:
        sys.stdout.write("[")
        for i, r in enumerate(rows):
            sys.stdout.write(("," if i else "") + "\n" + json.dumps(r))
        sys.stdout.write("\n]\n")
    else:
        sys.stdout.write("\t".join(cols) + "\n")
        for r in rows:
            s = shown(r)
            sys.stdout.write("\t".join(_cell(s.get(c)) for c in cols) + "\n")
    if nxt is not None:
        print(f"next cursor: {nxt}", file=sys.stderr)


@app.command()
def memory(agent: str, url: RedisOpt = None, prefix: PrefixOpt = None,
           as_json: JsonOpt = False) -> None:
    """Show an agent's memory as of its last completed call, exactly as stored (--json: each
    item's JSON, a Msg as its fields, other values in memory's tagged encoding; the table
    shows them as Python-like text). Needs none of the agent's classes."""
    from busagent.memory import is_msg, render

    _connect(url, prefix)
    admin.agent_info(agent)
    # As stored, never decoded into objects: this process may lack the user's classes (a
    # pydantic model from their script), and JSON text would change a dict's int keys and
    # tuples; memory's own encoding is exact, so it is what is shown.
    items = admin.stored_memory(agent)
    if as_json:
        _print_json(items)
        return
    rows = []
    for m in items:
        if is_msg(m):
            c = m.get("content")
            rows.append({**m, "content": c if isinstance(c, str) else render(c)})
        else:  # not a Msg: the whole item is the content
            rows.append({"content": m if isinstance(m, str) else render(m)})
    _table(rows, ["timestamp", "name", "role", "content"])


@app.command()
def info(server: str, url: RedisOpt = None, prefix: PrefixOpt = None,
         as_json: JsonOpt = False) -> None:
    """Show one server's registry record (times as local ISO time and age; --json: epoch
    seconds)."""
    _connect(url, prefix)
    data = admin.ServerClient(server).get_server_info()
    if as_json:
        _print_json(data)
        return
    # By the Redis clock (the record's started, heartbeat and age all are): this host's clock
    # may disagree with the worker's by minutes.
    up = max(data["age"] + data["heartbeat"] - data["started"], 0.0)
    shown = {**data, "started": f"{_when(data['started'])} ({_ago(up)})",
             "heartbeat": f"{_when(data['heartbeat'])} ({_ago(data['age'])})",
             "cpu": f"{data['cpu']:.1f} %", "mem": f"{data['mem']:.1f} MiB"}
    _table([{"field": k, "value": v} for k, v in shown.items()], ["field", "value"])


@app.command()
def stop(
    server: str,
    drain: Annotated[bool, typer.Option(help="move its agents to other servers first")] = False,
    url: RedisOpt = None, prefix: PrefixOpt = None,
) -> None:
    """Stop a server gracefully: in-flight calls finish; --drain moves its agents elsewhere.
    A dead server's record is removed instead, with its agents and waiting calls."""
    _connect(url, prefix)
    client = admin.ServerClient(server)
    info_ = client.get_server_info()
    if info_["state"] == "dead" and not drain:
        gone = client.forget()
        print(f"{server} was dead (last heartbeat {_when(info_['heartbeat'])}, "
              f"{_ago(info_['age'])}): removed its record, "
              f"{gone['agents']} agent(s) and {gone['calls']} waiting call(s)")
        return
    client.stop(drain=drain)
    print(f"{'draining' if drain else 'stopping'} {server}")


@app.command()
def deadletter(
    replay: Annotated[str | None, typer.Option(help="send this entry's call again")] = None,
    count: Annotated[int, typer.Option(min=1, help="newest entries to show")] = 100,
    url: RedisOpt = None, prefix: PrefixOpt = None, as_json: JsonOpt = False,
) -> None:
    """List calls given up on (their workers kept dying, or they were malformed), or replay one."""
    _connect(url, prefix)
    if replay:
        print(f"replayed call {admin.replay(replay)}")
        return
    rows = admin.deadletters(count)
    if as_json:
        _print_json(rows)
    else:
        _table(rows, ["id", "call", "agent", "kind", "tries", "server", "reason"])


@app.command()
def delete(
    agent: Annotated[str | None, typer.Argument(help="agent id")] = None,
    all_: Annotated[bool, typer.Option(
        "--all", help="every agent of --server or of --namespace")] = False,
    server: Annotated[str | None, typer.Option(help="with --all: the server")] = None,
    namespace: Annotated[str | None, typer.Option(help="with --all: the namespace")] = None,
    url: RedisOpt = None, prefix: PrefixOpt = None,
) -> None:
    """Delete one agent, every agent of a server with --all --server S, or every agent of a
    namespace with --all --namespace N."""
    _connect(url, prefix)
    if all_ and namespace:
        if server:
            raise ConfigError("--all takes --server or --namespace, not both")
        got = admin.delete_namespace(namespace)
        tail = (f"; {got['left']} on dead servers left (`busagent stop SERVER` removes them)"
                if got["left"] else "")
        print(f"deleted {got['deleted']} agent(s) of namespace {namespace}{tail}")
        return
    if all_:
        if not server:
            raise ConfigError("--all needs --server NAME or --namespace NAME")
        n = admin.ServerClient(server).delete_all_agent()
        print(f"deleted {n} agent(s) on {server}")
        return
    if not agent:
        raise ConfigError("name an agent id, or use --all --server NAME")
    info_ = admin.agent_info(agent)
    admin.ServerClient(info_.server).delete_agent(agent)
    print(f"deleted {agent}")


@app.command(name="redis")
def redis_cmd(
    stop_: Annotated[bool, typer.Option("--stop", help="stop the shared embedded Redis")] = False,
    port: Annotated[int | None, typer.Option(min=1, max=65535,
                                             help="TCP port (default 6390)")] = None,
    bind: Annotated[str | None, typer.Option(
        help="address to listen on (default 127.0.0.1; 0.0.0.0: every interface)")] = None,
    password: Annotated[str | None, typer.Option(help="require this password")] = None,
) -> None:
    """Start (or show) the shared embedded Redis and print its URL. If it already runs with
    other options than those given, says so and exits 1 (stop it first with --stop)."""
    if stop_:
        print("stopped" if embedded.stop_shared() else "not running")
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
        print(f"stored {len(names)} model config(s): {', '.join(names)}")
        return
    # Secrets masked at any depth (api keys, tokens, headers, passwords in URLs), as the studio.
    rows = [_models.masked(c.model_dump(mode="json"))
            for c in _models.list_model_configs(server).values()]
    if as_json:
        _print_json(rows)
    else:
        _table(rows, ["config_name", "model_type", "model_name", "base_url", "concurrency"])


@app.command(name="fake-llm")
def fake_llm(
    port: Annotated[int, typer.Option(min=0, max=65535, help="TCP port (0: any free one)")
                    ] = 8000,
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    latency: Annotated[float, typer.Option(min=0, help="seconds each answer takes")] = 0.0,
    fail_every: Annotated[int, typer.Option(
        min=0, help="answer every Nth request with 503 (0: never)")] = 0,
) -> None:
    """Serve a fake OpenAI-compatible chat endpoint (for trying LLM agents without a model)."""
    from busagent.fakellm import FakeLLM

    try:
        fake = FakeLLM(host, port, latency=latency, fail_every=fail_every)
    except OSError as e:  # port in use, address not of this host, name not found
        raise ConfigError(f"fake-llm cannot listen on {host}:{port}: {e.strerror or e}") from None
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
    count: Annotated[int | None, typer.Option(
        min=1, help="people to build (default: the config's)")] = None,
    seed: Annotated[int | None, typer.Option(help="sampling seed (default: the config's)")
                    ] = None,
    writers: Annotated[int, typer.Option(
        min=1, help="writer agents on workers (model builds)")] = 4,
    batch: Annotated[int, typer.Option(min=1, help="rows per message to a writer")] = 32,
    url: RedisOpt = None, prefix: PrefixOpt = None,
) -> None:
    """Sample a population's attributes and write each person's background (by an LLM on the
    workers with --config-name, else from the template); prints a one-line summary."""
    from busagent import population

    cfg = population.load_config(config, count=count, seed=seed)
    if model_config and not config_name:
        raise ConfigError("--model-config needs --config-name: the name of the config in "
                          "it that writes the backgrounds")
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
def status(url: RedisOpt = None, prefix: PrefixOpt = None, as_json: JsonOpt = False) -> None:
    """One-screen summary: servers up/late/dead, agents, calls in flight and per second,
    Redis memory and version, dead letters."""
    from busagent.studio import data as studio_data
    from busagent.studio.terminal import status_text

    _connect(url, prefix)
    summ = studio_data.summary()
    if as_json:
        _print_json(summ)
    else:
        _console().print(status_text(summ))


@app.command()
def top(
    interval: Annotated[float, typer.Option(help="seconds between frames")] = 1.0,
    url: RedisOpt = None, prefix: PrefixOpt = None,
) -> None:
    """Live view of the servers, busiest first, with totals; q or Ctrl-C quits."""
    from busagent.studio.terminal import top as run_top

    if interval <= 0:
        raise ConfigError(f"--interval must be positive (got {interval})")
    _connect(url, prefix)
    run_top(_console(), interval)


@app.command()
def logs(
    server: str,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="keep printing new lines")] = False,
    lines: Annotated[int, typer.Option("--lines", "-n", help="how many recent lines")] = 100,
    url: RedisOpt = None, prefix: PrefixOpt = None,
) -> None:
    """Print a worker's recent log lines (kept in Redis, capped); --follow for new ones."""
    from busagent.studio.terminal import print_logs

    if lines <= 0:
        raise ConfigError(f"--lines must be positive (got {lines})")
    _connect(url, prefix)
    if server not in {s["name"] for s in admin.servers()} and not _has_logs(server):
        raise ConfigError(f"no server named {server!r} and no log lines for it; see "
                          "`busagent servers`")
    try:
        print_logs(_console(), server, lines, follow)
    except KeyboardInterrupt:
        return


def _has_logs(server: str) -> bool:
    b = _bus.current()
    with b.errors():
        return bool(b.redis.exists(b.keys.logs(server)))


@app.command()
def studio(
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port")] = 8300,
    token: Annotated[str | None, typer.Option(
        envvar="BUSAGENT_STUDIO_TOKEN",
        help="token that changing requests must carry (default: a new one, printed)")] = None,
    interval: Annotated[float, typer.Option(help="seconds between live samples")] = 1.0,
    url: RedisOpt = None, prefix: PrefixOpt = None,
) -> None:
    """Serve the web page: servers, agents, calls, dead letters, hubs, charts, logs, models."""
    from busagent.studio import check_bind, listen, serve

    tok = check_bind(host, token)
    if interval <= 0:
        raise ConfigError(f"--interval must be positive (got {interval})")
    _connect(url, prefix)
    sock = listen(host, port)  # a bad or busy port: one line, before the URL is printed
    port = sock.getsockname()[1]  # --port 0: the one the system chose
    shown = f"[{host}]" if ":" in host else host
    print(f"busagent studio on http://{shown}:{port}/?token={tok}", flush=True)
    print(f"token for changing requests: {tok}", flush=True)
    serve(sock, tok, interval)


@app.command()
def demo(url: RedisOpt = None) -> None:
    """Run the quickstart: a DAG of agents that each sleep 1 s, run in parallel."""
    from busagent.demo import main as demo_main

    demo_main(url)


def _error(message: str, code: int) -> None:
    # One line whatever the message holds: a Redis or pydantic message may span lines.
    print("error: " + " ".join(message.split()), file=sys.stderr)
    sys.exit(code)


def main() -> None:
    """Run the command: usage errors (exit 2) and busagent's errors (exit 1) print one line
    ``error: ...`` on stderr, never a traceback or a boxed usage text."""
    try:
        # Not standalone: click would print usage errors itself, over several lines. It then
        # returns an Exit's code instead of exiting.
        code = app(standalone_mode=False)
        if isinstance(code, int) and code:
            sys.exit(code)
    except _click.ClickException as e:
        if type(e).__name__ == "NoArgsIsHelpError":  # `busagent` alone: the help, as before
            e.show()
            sys.exit(e.exit_code)
        ctx = getattr(e, "ctx", None)  # usage errors know their command
        hint = f"; see `{ctx.command_path} --help`" if ctx is not None else ""
        _error(e.format_message() + hint, e.exit_code)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except BusagentError as e:
        _error(str(e), 1)
    except (KeyboardInterrupt, typer.Abort):
        sys.exit(130)


if __name__ == "__main__":
    main()
