"""The worker runtime (``busagent worker`` runs it)."""

from .host import Worker, run

__all__ = ["Worker", "run"]
