"""``curvscope example``: train a small model deterministically and write it with its data."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .._errors import OptionError
from ._common import console, guarded
from ._names import EXAMPLE_NAMES

__all__ = ["example_cli", "register"]


def example_cli(
    name: Annotated[
        str,
        typer.Argument(
            help=", ".join(EXAMPLE_NAMES[:-1]) + " or " + EXAMPLE_NAMES[-1] + ".",
            show_default=False,
        ),
    ],
    out: Annotated[
        Path,
        typer.Option("--out", help="Folder for model.pt and its data (data.npz, or tokens.bin)."),
    ] = Path("curvscope-example"),
    seed: Annotated[int, typer.Option("--seed", help="Training seed.")] = 0,
) -> None:
    """Train an example model (seconds; tiny-gpt and lstm about two minutes) into OUT."""
    with guarded():
        from .._examples import EXAMPLES, make_example
        from ._common import check_out_dir, prepare_torch

        if name not in EXAMPLES:
            raise OptionError(
                f"example {name!r} is not known; choose one of {', '.join(EXAMPLES)}."
            )
        check_out_dir(out)
        prepare_torch()
        with console.status(f"training {name}..."):
            info = make_example(name, out, seed=seed)
    console.print(f"[bold]{name}[/]: {EXAMPLES[name]}")
    for key, value in info.items():
        console.print(f"  {key}: {value}")
    console.print(f"Next: curvscope spectrum {Path(out) / 'model.pt'}")


def register(app: typer.Typer) -> None:
    """Add ``example`` to the app."""
    app.command("example", no_args_is_help=True)(example_cli)
