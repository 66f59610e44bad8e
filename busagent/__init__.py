"""busagent: multi-agent applications across processes and machines on a Redis Streams bus.

    import busagent
    from busagent import Agent, Msg

    busagent.init()                        # BUSAGENT_REDIS_URL, else an embedded Redis
    a = MyAgent("a", to_dist=True)         # built on a worker
    p = a(Msg("user", 1))                  # a Placeholder, at once
    print(p.content)                       # blocks until the reply is there
"""

from . import models
from .admin import ServerClient, agents, servers
from .agent import Agent, DistConf, remote
from .bus import init, shutdown
from .cancel import cancel, cancelled
from .center import StepEvent, TaskCenter
from .config import Settings
from .errors import (
    AgentError,
    BusagentError,
    BusError,
    CallTimeout,
    Cancelled,
    ConfigError,
    ConstructorError,
    DeadLettered,
    MessageTooLarge,
    ModelError,
    NameTaken,
    NotSerializable,
    PlacementError,
    ProtocolError,
    RedisUnavailable,
    RemoteError,
    UnknownAgent,
    UnknownClass,
    UsageError,
)
from .hub import Broadcast, Direct, Function, Hub, HubMessage, Member, Random, RoundRobin
from .human import Human
from .memory import Memory
from .message import Msg
from .models import ModelConfig, load_model_configs
from .placeholder import Placeholder, agather, gather, release
from .programs import get_agent
from .proxy import RemoteAgent, create_many, fanout
from .stream import Event

__version__ = "0.1.0"

__all__ = [
    "Agent",
    "AgentError",
    "Broadcast",
    "BusError",
    "BusagentError",
    "CallTimeout",
    "Cancelled",
    "ConfigError",
    "ConstructorError",
    "DeadLettered",
    "Direct",
    "DistConf",
    "Event",
    "Function",
    "Hub",
    "HubMessage",
    "Human",
    "Member",
    "Memory",
    "MessageTooLarge",
    "ModelConfig",
    "ModelError",
    "Msg",
    "NameTaken",
    "NotSerializable",
    "Placeholder",
    "PlacementError",
    "ProtocolError",
    "Random",
    "RedisUnavailable",
    "RemoteAgent",
    "RemoteError",
    "RoundRobin",
    "ServerClient",
    "Settings",
    "StepEvent",
    "TaskCenter",
    "UnknownAgent",
    "UnknownClass",
    "UsageError",
    "agather",
    "agents",
    "cancel",
    "cancelled",
    "create_many",
    "fanout",
    "gather",
    "get_agent",
    "init",
    "load_model_configs",
    "models",
    "release",
    "remote",
    "servers",
    "shutdown",
]
