"""Naming classes by ``module:qualname`` and finding them again, the one way both ends use.

A class travels by name, never by code: the receiving process looks the name up among modules
it already has (a worker: the modules it was told to load; a decoder: ``sys.modules``) and never
imports on a sender's word.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

from .errors import ConfigError


def class_path(cls: type) -> tuple[str, str]:
    """``(module:qualname, what a worker loads to get it)``. Classes in the user's script
    (``__main__``) are named after the script's file, which the worker loads by path.

    Raises ConfigError for classes a worker cannot load (defined in a function or a REPL)."""
    module = cls.__module__
    if "<locals>" in cls.__qualname__:
        raise ConfigError(
            f"{cls.__qualname__} is defined inside a function; a worker can only load classes "
            "defined at a module's top level"
        )
    if module == "__main__":
        main = sys.modules["__main__"]
        file = getattr(main, "__file__", None)
        if not file:
            raise ConfigError(
                f"{cls.__name__} is defined in an interactive session; put it in a module or a "
                "script file so that a worker can load it"
            )
        path = Path(file).resolve()
        return f"{path.stem}:{cls.__qualname__}", str(path)
    return f"{module}:{cls.__qualname__}", module


def lookup(path: str, modules: Mapping[str, ModuleType]) -> tuple[bool, Any]:
    """Find ``module:qualname`` among ``modules``: ``(module found, object or None)``. The
    caller says what was missing in its own words."""
    module, _, qual = path.partition(":")
    mod = modules.get(module)
    if mod is None:
        return False, None
    obj: Any = mod
    for part in qual.split("."):
        obj = getattr(obj, part, None)
    return True, obj


def find(path: str) -> tuple[bool, Any]:
    """:func:`lookup` among the modules this process has imported, where the user's script
    (``__main__``) also answers to its file's name: a class path the sender built with
    :func:`class_path` (``script:Point``) is found in the script that runs as ``__main__``
    here, and one a worker built from the script it loaded as ``script`` too."""
    found, obj = lookup(path, sys.modules)
    if obj is None:
        module, _, qual = path.partition(":")
        main = getattr(sys.modules.get("__main__"), "__file__", None)
        if main and Path(main).stem == module:
            found, obj = lookup(f"__main__:{qual}", sys.modules)
    return found, obj
