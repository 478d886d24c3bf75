"""What every diagnostic of operators shares: naming the operators and choosing blocks."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from .._errors import Interrupted, OptionError, UnsupportedModelError, arg
from ..linalg import LinearOperator, as_operator

__all__ = [
    "BLOCK_MODES",
    "MatrixSkips",
    "add_notes",
    "Progress",
    "keep_finished",
    "labelled",
    "named_operators",
    "resolve_blocks",
]

Progress = Callable[[int, int, str], None]

BLOCK_MODES = ("all", "per-layer", "per-param", "per-group")
"""Blocking modes every diagnostic accepts besides explicit block names."""


def named_operators(ops: Any) -> dict[str, LinearOperator]:
    """``{name: operator}`` from a mapping, a sequence or a single operator-like object.

    Every value goes through :func:`curvscope.linalg.as_operator`, so a matrix, a scipy
    operator or another library's operator is accepted; a single operator is named by its
    ``name``.

    Raises:
        OptionError: when no operator is given.
    """
    if isinstance(ops, Mapping):
        out = {str(k): as_operator(v, name=str(k)) for k, v in ops.items()}
    elif isinstance(ops, (list, tuple)):
        out = {}
        for v in ops:
            op = as_operator(v)
            out[op.name] = op
    else:
        op = as_operator(ops)
        out = {op.name: op}
    if not out:
        raise OptionError(f"{arg('ops')} holds no operator; pass at least one.", option="ops")
    return out


def resolve_blocks(op: LinearOperator, blocks: str | Sequence[str]) -> list[str]:
    """Block names of ``op`` for a blocking mode or an explicit list (checked against ``op``).

    Raises:
        OptionError: for a block that does not exist (listing the valid ones).
    """
    if isinstance(blocks, str) and blocks in BLOCK_MODES:
        return op.named_blocks(blocks)
    names = [blocks] if isinstance(blocks, str) else list(blocks)
    for name in names:
        op.block(name)  # raises with the valid names
    return names


def add_notes(notes: list[str], *ops: Any) -> None:
    """Append the operators' notes not yet in ``notes``.

    Call it after an operator's products too: some notes come with them (a Hessian whose
    products fell back to finite differences, a matrix taking J v by two reverse passes).
    """
    for op in ops:
        for note in getattr(op, "notes", []):
            if note not in notes:
                notes.append(note)


def labelled(progress: Progress | None, label: str) -> Progress | None:
    """A progress callback whose descriptions carry ``label``."""
    if progress is None:
        return None
    return lambda done, total, what: progress(done, total, f"{what} {label}".strip())


@contextlib.contextmanager
def keep_finished(notes: list[str], what: str, partial: Callable[[], Any]) -> Iterator[None]:
    """Turn Ctrl-C inside the block into :class:`Interrupted` carrying ``partial()``.

    ``what`` names the finished parts for the note ("the densities and traces listed").
    An :class:`Interrupted` from a nested diagnostic passes through unchanged.
    """
    try:
        yield
    except Interrupted:
        raise
    except KeyboardInterrupt:
        notes.append(f"interrupted (Ctrl-C): {what} finished; the others were not computed.")
        raise Interrupted(partial()) from None


class MatrixSkips:
    """Matrices that turn out unsupported only at their products, skipped while others remain.

    Some refusals come with the first product, not when the operator is built (a GGN whose
    ``J v`` meets a function differentiable only once). With several matrices asked for, such
    a matrix is skipped with a note naming why and the others are computed; when every one
    fails, or only one was asked for, the refusal stands.

    Args:
        names: the matrices of the run.
        notes: the result's notes, where each skip is recorded.
    """

    def __init__(self, names: Sequence[str], notes: list[str]) -> None:
        self.total = len(names)
        self.notes = notes
        self.errors: list[UnsupportedModelError] = []

    @contextlib.contextmanager
    def guard(self, name: str) -> Iterator[None]:
        """Run ``name``'s part; an :class:`UnsupportedModelError` skips it (see the class)."""
        try:
            yield
        except UnsupportedModelError as exc:
            if self.total == 1:
                raise
            self.errors.append(exc)
            self.notes.append(f"skipped {name}: {exc}")

    def check(self) -> None:
        """Raise the first refusal when every matrix was skipped."""
        if self.errors and len(self.errors) == self.total:
            raise self.errors[0]
