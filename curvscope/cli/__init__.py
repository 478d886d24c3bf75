"""The ``curvscope`` command line: a thin typer app over the library.

Each command lives in its own module ``curvscope.cli.<command>`` with a ``register(app)``
function; this package assembles them.
"""

from __future__ import annotations

import importlib
from typing import Annotated

import torch
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
    # Trained networks with saturated tanh/sigmoid units produce float32 subnormals in their
    # derivatives; on x86 CPUs arithmetic on them is microcoded. On the digits-mlp example a
    # gradient took 700 ms instead of 28 ms. Flushing them to zero changes results below
    # 1.2e-38 only, so the command line (which owns its process) turns it on.
    torch.set_flush_denormal(True)


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
