"""``MODULE:CALLABLE`` and ``path/file.py:CALLABLE``: code the user named, imported on request.

A Python file runs only because the user named it (a model builder, a data source, a loss);
its hash goes into the result document like every other file read.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .._errors import CurvscopeError, OptionError, arg

__all__ = ["import_callable"]


def import_callable(
    spec: str, *, what: str, base_dir: str | Path | None = None
) -> tuple[Callable[..., Any], Path | None]:
    """Resolve ``MODULE:CALLABLE`` or ``path/to/file.py:CALLABLE``.

    Args:
        spec: the specification.
        what: the argument it came from (``builder``, ``data``, ``loss``), for messages.
        base_dir: folder a relative file path is tried in when it is not found as given.

    Returns:
        ``(callable, file)`` with ``file`` the Python file (``None`` for a module name).

    Raises:
        OptionError: for a malformed specification, a missing file or attribute, an import
            that fails, or an attribute that is not callable.
    """
    if ":" not in spec:
        raise OptionError(
            f"{arg(what)} {spec!r} must be MODULE:CALLABLE or path/file.py:CALLABLE.", option=what
        )
    target, _, attr = spec.rpartition(":")
    file: Path | None = None
    try:
        if target.endswith(".py") or Path(target).exists():
            file = Path(target)
            if not file.exists() and base_dir is not None and not file.is_absolute():
                file = Path(base_dir) / file
            if not file.is_file():
                raise OptionError(f"{arg(what)} file {target} does not exist.", option=what)
            name = f"_curvscope_user_{what}_{abs(hash(str(file.resolve())))}"
            mod_spec = importlib.util.spec_from_file_location(name, file)
            module = importlib.util.module_from_spec(mod_spec)
            sys.modules[name] = module
            folder = str(file.resolve().parent)
            added = folder not in sys.path
            if added:  # the file's own imports of its neighbours
                sys.path.insert(0, folder)
            try:
                mod_spec.loader.exec_module(module)
            finally:
                if added and folder in sys.path:
                    sys.path.remove(folder)
        else:
            module = importlib.import_module(target)
    except CurvscopeError:
        raise
    except Exception as exc:  # noqa: BLE001 - any import failure is the user's module
        first = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise OptionError(
            f"{arg(what)} {spec}: importing {target} failed ({type(exc).__name__}: {first}).",
            option=what,
        ) from None
    if not hasattr(module, attr):
        raise OptionError(f"{arg(what)} {spec}: {target} has no attribute {attr!r}.", option=what)
    fn = getattr(module, attr)
    if not callable(fn):
        raise OptionError(f"{arg(what)} {spec}: {attr} is not callable.", option=what)
    return fn, file
