"""The worker runtime, installed as ``busagent.workers`` (``busagent worker`` runs it)."""

from .host import Worker, run

__all__ = ["Worker", "run"]
