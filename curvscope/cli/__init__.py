"""The ``curvscope`` command line: a thin typer app over the library.

Each command lives in its own module ``curvscope.cli.<command>`` with a ``register(app)``
function; this package assembles them. The command modules import torch, numpy and the
numerics inside their functions only, so ``--version`` and ``--help`` start in a fraction of
a second (``benchmarks/startup.py``).
"""

from __future__ import annotations

import importlib
from typing import Annotated

import typer

from .. import __version__

__all__ = ["app", "main"]

COMMANDS = [
    "example",
    "spectrum",
    "density",
    "check",
    "compare",
    "surface",
    "solve",
    "report",
    "track",
    "diff",
    "classes",
]

app = typer.Typer(
    name="curvscope",
    help="A curvature microscope for trained PyTorch models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"curvscope {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    """Eigenvalues, densities, checks, surfaces and solver runs for trained models."""
    # Nothing here imports torch: --version and every --help answer without it (issue 14).
    # Torch's process settings are made by _common.prepare_torch on the command path.


for _name in COMMANDS:
    try:
        _module = importlib.import_module(f"{__name__}.{_name}")
    except ModuleNotFoundError as _exc:  # a command still being written is simply absent
        if _exc.name != f"{__name__}.{_name}":
            raise
        continue
    _module.register(app)


def main() -> None:
    """Console-script entry point."""
    app()
