"""Loading the modules a worker may instantiate agents from."""

from __future__ import annotations

import ast
import importlib
import logging
import os
import sys
import types
from pathlib import Path

from busagent import bus as _bus
from busagent.errors import ConfigError, SkipStatement

log = logging.getLogger("busagent.worker")

# Top-level statements of a script that are about running it, not defining things.
_SKIP = (ast.Expr, ast.For, ast.AsyncFor, ast.While, ast.With, ast.AsyncWith)


def load(spec: str) -> tuple[str, types.ModuleType]:
    """``(module name, module)`` for a dotted module name or a ``.py`` path."""
    if spec.endswith(".py") or os.sep in spec:
        return load_script(Path(spec))
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        return spec, importlib.import_module(spec)
    except ImportError as e:
        raise ConfigError(f"cannot import agent module {spec!r}: {e}; check --agents and "
                          "PYTHONPATH") from None
    except SyntaxError as e:
        raise ConfigError(f"agent module {spec!r} does not compile: {e}") from None


def load_script(path: Path) -> tuple[str, types.ModuleType]:
    """Load a user's script for its definitions only.

    A script that creates distributed agents is usually the very program that started this worker,
    so running it whole would recurse. Its top-level imports, functions, classes and assignments
    run; bare calls, loops and ``with`` blocks do not; an assignment that creates a distributed
    agent or calls ``busagent.init()`` (or fails because it uses something skipped) is skipped.
    The module is named after the file (``quickstart.py`` -> ``quickstart``), as the caller names
    its classes.
    """
    path = path.resolve()
    if not path.exists():
        raise ConfigError(f"agent script {str(path)!r} does not exist")
    name = path.stem
    mod = types.ModuleType(name)
    mod.__file__ = str(path)
    sys.modules[name] = mod
    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))
    try:
        tree = ast.parse(path.read_text(), str(path))
    except SyntaxError as e:
        raise ConfigError(f"agent script {str(path)!r} does not compile: {e}") from None
    loading = _bus.loading_script.set(True)
    try:
        for stmt in tree.body:
            if isinstance(stmt, _SKIP) or _is_main_guard(stmt):
                continue
            code = compile(ast.Module(body=[stmt], type_ignores=[]), str(path), "exec")
            try:
                exec(code, mod.__dict__)  # the operator named this file
            except SkipStatement:
                continue
            except Exception as e:  # noqa: BLE001 - reported as one line, below
                if isinstance(stmt, ast.Assign | ast.AnnAssign | ast.AugAssign):
                    log.debug("skipped line %d of %s: %s", stmt.lineno, path, e)
                    continue
                raise ConfigError(f"agent script {str(path)!r} failed at line {stmt.lineno}: "
                                  f"{type(e).__name__}: {e}") from None
    finally:
        _bus.loading_script.reset(loading)
    return name, mod


def _is_main_guard(stmt: ast.stmt) -> bool:
    return (
        isinstance(stmt, ast.If)
        and isinstance(stmt.test, ast.Compare)
        and isinstance(stmt.test.left, ast.Name)
        and stmt.test.left.id == "__name__"
    )
