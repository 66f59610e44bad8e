"""busagent studio: the web page, its JSON API, live views, ``/metrics``.

``busagent studio`` runs :func:`serve`; :func:`busagent.studio.app.create_app` is the ASGI app
for embedding it elsewhere, :mod:`.data` what it reads (shared with ``busagent status``, ``top``
and ``logs``), :mod:`.metrics` the Prometheus collector.
"""

from __future__ import annotations

import ipaddress
import secrets
import socket

from busagent.errors import ConfigError


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or ``localhost``) is reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name: it may resolve to anything


def check_bind(host: str, token: str | None) -> str:
    """The token to use: ``token``, or a new one on a loopback address. Raises ConfigError for
    a non-loopback address without a token (anyone reaching it could stop servers)."""
    if token is not None and not token.strip():
        raise ConfigError("--token must not be empty")
    if token is None:
        if not is_loopback(host):
            raise ConfigError(f"refusing to listen on {host} without a token: pass --token T "
                              "(every request that changes something must carry it), or "
                              "bind to 127.0.0.1")
        token = secrets.token_urlsafe(24)
    return token


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on ``host``:``port`` (0: any free port), made before anything is
    printed so that a bad port or one in use is one line, not uvicorn's traceback or its
    ERROR line and exit code 3; the studio then serves on this very socket (no window in which
    another process takes the port). Raises ConfigError."""
    if not 0 <= port <= 65535:
        raise ConfigError(f"--port must be 0 to 65535 (got {port})")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as e:
        raise ConfigError(f"cannot listen on {host!r}: {e}") from None
    family, kind, proto, _, addr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        # As uvicorn does: a studio restarted at once is not refused its port for TIME_WAIT.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        why = "already in use" if e.errno in (98, 48, 10048) else (e.strerror or str(e))
        raise ConfigError(f"cannot listen on {host}:{port}: {why}") from None
    sock.set_inheritable(True)
    return sock


def serve(sock: socket.socket, token: str, interval: float = 1.0) -> None:
    """Serve the studio on the process-wide bus, on ``sock`` (:func:`listen`), until
    interrupted (blocking)."""
    import uvicorn

    from .app import create_app

    config = uvicorn.Config(create_app(token, interval), log_level="warning",
                            timeout_graceful_shutdown=1, lifespan="on")
    uvicorn.Server(config).run(sockets=[sock])


__all__ = ["check_bind", "is_loopback", "listen", "serve"]
