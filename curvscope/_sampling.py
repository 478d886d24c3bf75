"""The one routine that picks a seeded random subset of samples (data files and problems)."""

from __future__ import annotations

import torch

from ._errors import OptionError, arg

__all__ = ["as_generator", "subset_indices"]


def as_generator(seed: int | torch.Generator | None) -> torch.Generator:
    """A CPU generator from a seed (``None``: seed 0) or the generator itself.

    Raises:
        OptionError: for anything but an int, a generator or ``None``.
    """
    if isinstance(seed, torch.Generator):
        return seed
    if seed is None:
        return torch.Generator().manual_seed(0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise OptionError(
            f"{arg('seed')} must be an int or a torch.Generator, not {type(seed).__name__}.",
            option="seed",
        )
    return torch.Generator().manual_seed(seed)


def subset_indices(
    total: int, n: int, seed: int | torch.Generator | None, *, what: str = "the data"
) -> torch.Tensor:
    """``n`` distinct indices of ``range(total)`` drawn with ``seed``, in ascending order.

    Kept in the original order so a subset's batches follow the data's order.

    Raises:
        OptionError: when ``n`` is not between 1 and ``total``.
    """
    if not 1 <= int(n) <= int(total):
        raise OptionError(
            f"{arg('samples')} {n} must be between 1 and the {total} samples of {what}.",
            option="samples",
        )
    gen = as_generator(seed)
    return torch.randperm(int(total), generator=gen)[: int(n)].sort().values
