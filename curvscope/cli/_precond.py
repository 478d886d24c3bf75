"""``--preconditioner`` and ``--optimizer-key`` of ``spectrum`` and ``track``.

One spelling (docs/DESIGN.md "Preconditioned sharpness"): ``--preconditioner checkpoint``
reads the optimiser state saved in the model checkpoint itself (under ``optimizer``,
``optim``, ``opt``, ``optimizer_state_dict`` or ``--optimizer-key``); ``--preconditioner
FILE.pt`` reads another file: a checkpoint or a bare ``opt.state_dict()``, or a dict parameter
name -> tensor of the diagonal of P.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from .._errors import OptionError

__all__ = [
    "OptimizerKeyOption",
    "PreconditionerOption",
    "check_preconditioner_flag",
    "describe_preconditioner",
    "read_cli_preconditioner",
]

PreconditionerOption = Annotated[
    str | None,
    typer.Option(
        "--preconditioner",
        help="Analyse P^-1/2 A P^-1/2 (the eigenvalues of P^-1 A), P the diagonal an adaptive "
        "optimiser divides by (Adam/AdamW: sqrt(v_hat)+eps; RMSprop, Adagrad): 'checkpoint' "
        "reads the optimiser state saved in the checkpoint, FILE.pt another file (a checkpoint, "
        "an opt.state_dict(), or a dict name -> diagonal of P).",
        show_default=False,
    ),
]
OptimizerKeyOption = Annotated[
    str | None,
    typer.Option(
        "--optimizer-key",
        help="Key of the optimiser state in the checkpoint (default: the first of optimizer, "
        "optim, opt, optimizer_state_dict).",
        show_default=False,
    ),
]


def check_preconditioner_flag(spec: str | None, optimizer_key: str | None) -> None:
    """Refuse a missing ``--preconditioner`` file, or ``--optimizer-key`` alone, before loading."""
    if spec is None:
        if optimizer_key is not None:
            raise OptionError("--optimizer-key needs --preconditioner (checkpoint or FILE.pt).")
        return
    if spec != "checkpoint" and not Path(spec).is_file():
        raise OptionError(
            f"--preconditioner {spec!r} is neither 'checkpoint' nor an existing file.",
            option="preconditioner",
            path=spec,
        )


def read_cli_preconditioner(
    spec: str, model_path: Path, model: Any, names: list[str], optimizer_key: str | None
):
    """The :class:`curvscope.io.Preconditioner` ``--preconditioner`` names, for ``model``."""
    from ..io import read_preconditioner

    named = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    own = spec == "checkpoint"
    return read_preconditioner(
        Path(model_path) if own else Path(spec),
        named,
        optimizer_key=optimizer_key,
        needed=names,
        source="checkpoint" if own else "file",
        diagonals=not own,
    )


def describe_preconditioner(record: dict[str, Any]) -> str:
    """One line: the optimiser, its step, hyper-parameters and threshold(s)."""
    if record.get("optimizer") is None:
        return f"Preconditioner: diagonals from {record.get('path')} (no optimiser, no threshold)."
    where = f"{record['source']} {record.get('path') or ''}".strip()
    if record.get("key"):
        where += f" (key {record['key']!r})"
    lrs = record.get("lrs") or []
    parts = [f"{record['optimizer']} state at step {record.get('step')} from {where}"]
    parts.append("lr " + ", ".join(f"{v:g}" for v in lrs))
    if record.get("betas") is not None:
        parts.append(f"betas {record['betas']}")
    if record.get("eps") is not None:
        parts.append(f"eps {record['eps']}")
    th = [t for t in record.get("thresholds") or [] if t is not None]
    formula = (record.get("groups") or [{}])[0].get("formula", "")
    if th:
        shown = ", ".join(f"{t:.5g}" for t in dict.fromkeys(th))
        parts.append(f"threshold {shown} ({formula})")
    return "Preconditioner: " + "; ".join(parts) + "."
