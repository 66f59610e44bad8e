"""Redis failures reach users as busagent errors (RedisUnavailable, BusError), never redis-py's:
hubs, the admin functions and model configs go through ``Bus.errors()``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import redis

import busagent
from busagent import BusError, Hub, Msg, RedisUnavailable, admin, embedded, models


def _raises(cls: type[busagent.BusagentError], fn: Callable[[], Any]) -> None:
    with pytest.raises(cls) as got:
        fn()
    assert not isinstance(got.value, redis.exceptions.RedisError), type(got.value).__mro__


def test_a_refused_command_is_a_bus_error(bus: busagent.bus.Bus, raw: redis.Redis,
                                          prefix: str) -> None:
    # Keys of the wrong type: Redis answers WRONGTYPE to each command on them.
    raw.set(f"{prefix}:hub:broken:members", "not a hash")
    raw.set(f"{prefix}:hub:broken", "not a stream")
    raw.set(f"{prefix}:deadletter", "not a stream")
    raw.set(f"{prefix}:agents", "not a hash")
    hub = Hub("broken")
    _raises(BusError, hub.members)
    _raises(BusError, hub.last_seq)
    _raises(BusError, lambda: hub.publish(Msg("user", "hi")))
    _raises(BusError, admin.deadletters)
    _raises(BusError, admin.agents)
    _raises(BusError, lambda: admin.agent_info("a"))


def test_a_lost_redis_is_redis_unavailable() -> None:
    server = embedded.start()
    try:
        busagent.init(server.url, prefix="lost")
        hub = Hub("room")
        assert hub.members() == []  # reachable: the calls below fail because it went away
        server.stop()
        _raises(RedisUnavailable, hub.members)
        _raises(RedisUnavailable, lambda: hub.publish(Msg("user", "hi")))
        _raises(RedisUnavailable, lambda: list(hub.watch(start="0", timeout=0)))
        _raises(RedisUnavailable, busagent.servers)
        _raises(RedisUnavailable, admin.deadletters)
        _raises(RedisUnavailable, lambda: admin.agent_memory("a"))
        _raises(RedisUnavailable, lambda: busagent.ServerClient("w1").is_alive())
        _raises(RedisUnavailable, models.list_model_configs)
    finally:
        busagent.shutdown()
        server.stop()


def test_a_failed_init_never_falls_back_to_another_redis() -> None:
    """init(url) that cannot connect leaves the process on that URL: later calls fail the same
    way instead of quietly using the shared or a private embedded Redis."""
    import socket

    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    busagent.shutdown()
    try:
        _raises(RedisUnavailable, lambda: busagent.init(f"redis://127.0.0.1:{port}/0"))
        _raises(RedisUnavailable, busagent.agents)
        _raises(RedisUnavailable, busagent.bus.current)
        _raises(busagent.ConfigError, lambda: busagent.init("not-a-url"))
    finally:
        busagent.shutdown()


def test_the_boundary_translates_redis_errors_and_keeps_ours(bus: busagent.bus.Bus) -> None:
    # CallTimeout and RedisUnavailable are OSErrors too: they must pass through as they are.
    for ours in (busagent.CallTimeout("deadline"), RedisUnavailable("gone")):
        with pytest.raises(type(ours)) as got, bus.errors():
            raise ours
        assert got.value is ours
    _raises(BusError, lambda: _in(bus, redis.exceptions.ResponseError("WRONGTYPE")))
    _raises(RedisUnavailable, lambda: _in(bus, redis.exceptions.ConnectionError("reset")))
    _raises(RedisUnavailable, lambda: _in(bus, redis.exceptions.NoPermissionError("NOPERM")))


def _in(bus: busagent.bus.Bus, err: BaseException) -> None:
    with bus.errors():
        raise err
