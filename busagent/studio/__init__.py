"""busagent studio: the web page, its JSON API, live views, ``/metrics``.

``busagent studio`` runs :func:`serve`; :func:`busagent.studio.app.create_app` is the ASGI app
for embedding it elsewhere, :mod:`.data` what it reads (shared with ``busagent status``, ``top``
and ``logs``), :mod:`.metrics` the Prometheus collector.
"""

from __future__ import annotations

import ipaddress
import secrets

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


def serve(host: str, port: int, token: str, interval: float = 1.0) -> None:
    """Serve the studio on the process-wide bus until interrupted (blocking)."""
    import uvicorn

    from .app import create_app

    config = uvicorn.Config(create_app(token, interval), host=host, port=port,
                            log_level="warning", timeout_graceful_shutdown=1, lifespan="on")
    uvicorn.Server(config).run()


__all__ = ["check_bind", "is_loopback", "serve"]
