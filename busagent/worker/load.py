"""Loading the modules a worker may instantiate agents from."""

from __future__ import annotations

import ast
import importlib
import logging
import os
import sys
import sysconfig
import traceback
import types
from pathlib import Path

from busagent import bus as _bus
from busagent.errors import ConfigError, SkipStatement

log = logging.getLogger("busagent.worker")

#: the statements that define things; a script's other top-level statements run it.
_DEFINING = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef,
             ast.Assign, ast.AnnAssign, ast.AugAssign, ast.Pass)
#: nodes that do something when evaluated: a value built from none of them is a literal.
_ACTING = (ast.Call, ast.Await, ast.Yield, ast.YieldFrom)


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
    except (Exception, SystemExit) as e:  # noqa: BLE001 - any failure at import: one line
        # Whatever the module's top level raises (RuntimeError, json.loads on a bad file, a
        # sys.exit): one line naming the module, where it failed and the error, never a
        # traceback through importlib.
        raise ConfigError(f"agent module {spec!r} failed to load at {_where(e)}: "
                          f"{type(e).__name__}: {e}") from None


def _where(e: BaseException) -> str:
    """``file:line`` of the deepest traceback frame in the user's code (not in importlib, the
    standard library or installed packages), else the deepest frame."""
    frames = traceback.extract_tb(e.__traceback__)
    lib = {sysconfig.get_path(k) for k in ("stdlib", "platstdlib", "purelib", "platlib")}
    own = [f for f in frames if not f.filename.startswith("<")
           and not any(f.filename.startswith(d + os.sep) for d in lib if d)]
    where = own or frames
    return f"{where[-1].filename}:{where[-1].lineno}" if where else "?"


def load_script(path: Path) -> tuple[str, types.ModuleType]:
    """Load a user's script for its definitions only, never for what running it does.

    A script that creates distributed agents is usually the very program that started this
    worker, and it may parse its command line, write files or call models at top level. The
    rule, applied to each top-level statement (the README states it too):

    * run: ``import`` and ``from ... import``; ``def``, ``async def`` and ``class`` (with their
      decorators, bases and defaults, as Python evaluates them); assignments (``=``, annotated,
      augmented) whose value calls nothing (literals, names, attributes, operators, subscripts,
      containers, lambdas); ``pass``; and ``try`` or ``if`` blocks made only of such statements
      whose conditions and exception types call nothing (``try: import x`` / ``except
      ImportError: x = None``);
    * skip: everything else: bare expressions and calls, assignments from a call
      (``args = parser.parse_args()``, ``llm = make_model()``), ``for``, ``while``, ``with``,
      ``if __name__ == "__main__":``, and ``try``/``if`` blocks holding any of these.

    An assignment that fails (it uses a name that was skipped) is skipped too; an import, a
    ``def`` or a ``class`` that fails raises ConfigError with the line. The module is named after
    the file (``quickstart.py`` -> ``quickstart``), as the caller names its classes.
    """
    path = path.resolve()
    if path.is_dir():
        raise ConfigError(f"--agents {str(path)!r} is a folder; name a module (pkg.agents) or "
                          "a .py file")
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
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read agent script {str(path)!r}: {e}") from None
    loading = _bus.loading_script.set(True)
    try:
        for stmt in tree.body:
            if not _defines(stmt):
                continue
            code = compile(ast.Module(body=[stmt], type_ignores=[]), str(path), "exec")
            try:
                exec(code, mod.__dict__)  # the operator named this file
            except SkipStatement:
                continue
            except (Exception, SystemExit) as e:  # noqa: BLE001 - reported as one line, below
                if isinstance(stmt, ast.Assign | ast.AnnAssign | ast.AugAssign | ast.If | ast.Try):
                    log.debug("skipped line %d of %s: %s", stmt.lineno, path, e)
                    continue
                raise ConfigError(f"agent script {str(path)!r} failed at line {stmt.lineno}: "
                                  f"{type(e).__name__}: {e}") from None
    finally:
        _bus.loading_script.reset(loading)
    return name, mod


def _calls_nothing(node: ast.AST | None) -> bool:
    """Whether evaluating ``node`` calls nothing (a lambda's body is not evaluated)."""
    if node is None:
        return True
    if isinstance(node, ast.Lambda):
        return all(_calls_nothing(d) for d in (*node.args.defaults, *node.args.kw_defaults))
    if isinstance(node, _ACTING):
        return False
    return all(_calls_nothing(child) for child in ast.iter_child_nodes(node))


def _defines(stmt: ast.stmt) -> bool:
    """Whether ``stmt`` only defines things (the rule in :func:`load_script`)."""
    if isinstance(stmt, ast.Assign):
        return all(map(_calls_nothing, [stmt.value, *stmt.targets]))
    if isinstance(stmt, ast.AugAssign | ast.AnnAssign):
        return _calls_nothing(stmt.value) and _calls_nothing(stmt.target)
    if isinstance(stmt, _DEFINING):
        return True
    if isinstance(stmt, ast.If):
        return (not _is_main_guard(stmt) and _calls_nothing(stmt.test)
                and all(map(_defines, stmt.body + stmt.orelse)))
    if isinstance(stmt, ast.Try):
        return (all(map(_defines, stmt.body + stmt.orelse + stmt.finalbody))
                and all(_calls_nothing(h.type) and all(map(_defines, h.body))
                        for h in stmt.handlers))
    return False


def _is_main_guard(stmt: ast.stmt) -> bool:
    return (
        isinstance(stmt, ast.If)
        and isinstance(stmt.test, ast.Compare)
        and isinstance(stmt.test.left, ast.Name)
        and stmt.test.left.id == "__name__"
    )
