"""Flat token files as small language-model training writes them, read lazily.

A token file is one long sequence of integer ids: ``.bin`` (raw values, uint16 unless the
caller names another dtype with ``--token-dtype``; a file whose every odd uint16 is 0, as
small int32 ids read, is refused naming the wider dtype) or ``.npy`` (any integer dtype, 1-D). It is
memory-mapped, never read whole: a window ``i`` is the inputs ``x = t[i : i + T]`` and the
next-token targets ``y = t[i + 1 : i + T + 1]``, read from the map when a batch is formed.
"""

from __future__ import annotations

import gzip
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from functools import cached_property
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from .._errors import DataError, OptionError, arg
from ._results import file_sha256

__all__ = ["BIN_DTYPES", "TokenBatches", "TokenWindows", "load_tokens", "shipped_text"]

# dtypes a raw .bin may be read as: what nanoGPT-style scripts write (uint16 for vocabularies
# up to 65536) and the usual wider ones. The caller names it; the file cannot say.
BIN_DTYPES = ("uint16", "int32", "uint32", "int64")
_CHUNK = 1 << 20  # values scanned at a time for the min/max pass


@dataclass(frozen=True, eq=False)
class TokenWindows:
    """Fixed, ordered windows of a memory-mapped token file (the :class:`Dataset` interface).

    Attributes:
        path: the token file.
        dtype: how its values are stored (``uint16``...).
        block_size: window length ``T``.
        starts: window start offsets, ascending (int64).
        source: what was loaded, for result documents.
        sha256: hash of the file's bytes.
        vocab_size: largest id in the whole file plus one (a lower bound on the vocabulary).
        num_tokens: tokens in the file.
        subset_seed: seed of the random choice of windows, when there was one.
    """

    path: Path
    dtype: str
    block_size: int
    starts: np.ndarray
    source: str
    sha256: str
    vocab_size: int
    num_tokens: int
    subset_seed: int | None = None
    _offset: int = field(default=0, repr=False)

    def __len__(self) -> int:
        return int(self.starts.shape[0])

    @property
    def num_classes(self) -> int:
        """Number of classes of the next-token targets: :attr:`vocab_size`."""
        return self.vocab_size

    @cached_property
    def tokens(self) -> np.memmap:
        """The whole file as a read-only memory map (nothing is read until sliced)."""
        return np.memmap(
            self.path, dtype=self.dtype, mode="r", offset=self._offset, shape=(self.num_tokens,)
        )

    def window(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Window ``i``: inputs ``[T]`` and next-token targets ``[T]`` (int64)."""
        x, y = self._read(self.starts[i : i + 1])
        return x[0], y[0]

    def _read(self, starts: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        t = self.block_size
        mm = self.tokens
        w = np.stack([np.asarray(mm[s : s + t + 1], dtype=np.int64) for s in starts])
        w = torch.from_numpy(w)
        return w[:, :-1].contiguous(), w[:, 1:].contiguous()

    def batches(self, batch_size: int) -> TokenBatches:
        """The windows in order, in batches of ``batch_size`` (the last may be smaller).

        Raises:
            OptionError: when ``batch_size`` is below 1.
        """
        if batch_size < 1:
            raise OptionError(f"{arg('batch_size')} {batch_size} must be at least 1.")
        return TokenBatches(self, batch_size)

    def subset(self, n: int, seed: int) -> TokenWindows:
        """A seeded random choice of ``n`` of these windows, kept in their order.

        Raises:
            DataError: when ``n`` is not between 1 and the number of windows.
        """
        if not 1 <= n <= len(self):
            raise DataError(
                f"{arg('samples')} {n} must be between 1 and the {len(self)} windows of "
                f"{self.source}."
            )
        g = torch.Generator().manual_seed(seed)
        idx = torch.randperm(len(self), generator=g)[:n].sort().values.numpy()
        return replace(
            self,
            starts=self.starts[idx],
            subset_seed=seed,
            source=f"{self.source} (random subset of {n}, seed {seed})",
        )


class TokenBatches:
    """Re-iterable batches of token windows, read from the memory map on every pass.

    Args:
        windows: the windows to batch.
        batch_size: windows per batch (the last batch may be smaller).
    """

    def __init__(self, windows: TokenWindows, batch_size: int) -> None:
        self.windows = windows
        self.batch_size = batch_size

    def __len__(self) -> int:
        return -(-len(self.windows) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        starts, b = self.windows.starts, self.batch_size
        for i in range(0, len(starts), b):
            yield self.windows._read(starts[i : i + b])


def _open(path: Path, dtype: str | np.dtype | None) -> tuple[str, int, int]:
    """(dtype, byte offset of the first token, number of tokens) of a token file."""
    name = path.name.lower()
    if name.endswith(".bin"):
        want = np.dtype(dtype if dtype is not None else "uint16").name
        if want not in BIN_DTYPES:
            raise OptionError(
                f"{arg('token_dtype')} {want!r} cannot be read from {path}; a .bin token file "
                f"holds one of {', '.join(BIN_DTYPES)}."
            )
        size = path.stat().st_size
        if size == 0:
            raise DataError(f"token file {path} is empty; write the tokens to it first.")
        itemsize = np.dtype(want).itemsize
        if size % itemsize:
            raise DataError(
                f"token file {path} has {size} bytes, not a whole number of {want} values; "
                f"name the dtype it was written with ({arg('token_dtype')}) or check it is a "
                "token file."
            )
        return want, 0, size // itemsize
    if name.endswith(".npy"):
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        # a damaged header raises what numpy's parser raises: OSError, ValueError, EOFError
        # (empty), SyntaxError or tokenize's TokenError (its header is a Python literal)
        except Exception as exc:  # noqa: BLE001
            raise DataError(f"token file {path} is not a readable .npy array ({exc}).") from None
        if not isinstance(arr, np.memmap) or not np.issubdtype(arr.dtype, np.integer):
            raise DataError(
                f"{path} holds {arr.dtype} values, not integer token ids; save the ids as an "
                "integer array."
            )
        if arr.ndim != 1:
            raise DataError(
                f"{path} holds an array of shape {arr.shape}; a token file is one flat "
                "sequence of ids (save it with .ravel())."
            )
        if dtype is not None and np.dtype(dtype) != arr.dtype:
            raise DataError(
                f"{path} holds {arr.dtype} values but {arg('token_dtype')} {np.dtype(dtype).name} "
                "was asked for; leave it out for .npy files."
            )
        if arr.size == 0:
            raise DataError(f"token file {path} is empty; write the tokens to it first.")
        return arr.dtype.str if arr.dtype.byteorder == ">" else arr.dtype.name, arr.offset, arr.size
    raise DataError(f"{path} is not a token file; use a .bin (raw ids) or .npy (integer array).")


def _id_range(mm: np.ndarray) -> tuple[int, int]:
    lo, hi = None, None
    for i in range(0, mm.shape[0], _CHUNK):
        chunk = mm[i : i + _CHUNK]
        a, b = int(chunk.min()), int(chunk.max())
        lo = a if lo is None else min(lo, a)
        hi = b if hi is None else max(hi, b)
    return lo, hi


def _check_not_wider(mm: np.ndarray, path: Path) -> None:
    """A ``.bin`` read as the default uint16 whose every odd value is 0 holds wider ids.

    Small ids written as little-endian int32 (or int64) read as uint16 pairs ``(id, 0)``:
    a valid-looking sequence of half zeros that no tokenizer writes.

    Raises:
        DataError: naming the ``--token-dtype`` the file was probably written with.
    """
    head = np.asarray(mm[: min(mm.shape[0], _CHUNK)])
    if head.shape[0] < 8 or head.shape[0] % 2:
        return
    if head[1::2].any() or not head[0::2].any():
        return
    wide = "int64" if head.shape[0] % 4 == 0 and not head[2::4].any() else "int32"
    raise DataError(
        f"token file {path} read as uint16 has 0 at every odd position: it looks written as "
        f"{wide}; pass {arg('token_dtype')} {wide} (or the dtype it was written with)."
    )


def _random_starts(m: int, n: int, seed: int) -> np.ndarray:
    """``n`` distinct offsets in ``[0, m)``, sorted, from a generator seeded with ``seed``."""
    g = torch.Generator().manual_seed(seed)
    if 4 * n >= m:
        return torch.randperm(m, generator=g)[:n].sort().values.numpy()
    # A permutation of every offset of a large file would take 8 bytes per token: draw with
    # replacement and top up until n distinct offsets are found (same draws for same seed).
    chosen = torch.empty(0, dtype=torch.long)
    while chosen.numel() < n:
        draw = torch.randint(m, (n - chosen.numel(),), generator=g)
        chosen = torch.unique(torch.cat([chosen, draw]))
    return chosen.numpy()


def load_tokens(
    path: str | Path,
    *,
    block_size: int,
    samples: int | None = None,
    seed: int = 0,
    dtype: str | np.dtype | None = None,
    base_dir: str | Path | None = None,
) -> TokenWindows:
    """Windows of ``block_size`` tokens (and their next-token targets) of a token file.

    Args:
        path: a ``.bin`` (raw ids) or ``.npy`` (1-D integer array) file.
        block_size: window length ``T``; the file needs at least ``T + 1`` tokens.
        samples: ``None`` for every non-overlapping window (starts ``0, T, 2T, ...``), or
            the number of window starts chosen at random (any offset, distinct, sorted).
        seed: seed of that random choice (``torch.Generator().manual_seed(seed)``).
        dtype: how a ``.bin`` stores its ids (default ``uint16``); for ``.npy`` the file
            says, and a different value here is an error.
        base_dir: folder a relative ``path`` is resolved against (a checkpoint's folder).

    Raises:
        DataError: for a missing, empty, too short or malformed file, or negative ids.
        OptionError: for a ``block_size`` below 1 or a ``.bin`` dtype that is not supported.
    """
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise OptionError(f"{arg('block_size')} {block_size!r} must be a positive integer.")
    path = Path(path)
    if base_dir is not None and not path.is_absolute():
        path = Path(base_dir) / path
    if not path.exists():
        raise DataError(f"token file {path} does not exist.")
    if path.is_dir():
        raise DataError(f"token file {path} is a folder; pass the .bin or .npy file in it.")
    dt, offset, n_tokens = _open(path, dtype)
    t = block_size
    if n_tokens < t + 1:
        raise DataError(
            f"token file {path} holds {n_tokens} tokens, fewer than the {t + 1} one window of "
            f"{arg('block_size')} {t} needs; use a smaller {arg('block_size')} or more text."
        )
    mm = np.memmap(path, dtype=dt, mode="r", offset=offset, shape=(n_tokens,))
    if dtype is None and path.name.lower().endswith(".bin"):
        _check_not_wider(mm, path)
    lo, hi = _id_range(mm)
    if lo < 0:
        raise DataError(
            f"token file {path} holds negative ids (smallest {lo}); token ids start at 0 "
            f"(was it written with another {arg('token_dtype')}?)."
        )
    m = n_tokens - t  # window starts 0 .. n_tokens - t - 1
    if samples is None:
        starts = np.arange(0, m, t, dtype=np.int64)
        how = f"{len(starts)} non-overlapping windows of {t}"
    else:
        if isinstance(samples, bool) or not isinstance(samples, int) or not 1 <= samples <= m:
            raise DataError(
                f"{arg('samples')} {samples!r} must be between 1 and the {m} window starts of "
                f"token file {path} at {arg('block_size')} {t}."
            )
        starts = _random_starts(m, samples, seed).astype(np.int64)
        how = f"{samples} random windows of {t}, seed {seed}"
    return TokenWindows(
        path=path,
        dtype=dt,
        block_size=t,
        starts=starts,
        source=f"{path} ({np.dtype(dt).name} tokens, {how})",
        sha256=file_sha256(path),
        vocab_size=hi + 1,
        num_tokens=n_tokens,
        subset_seed=None if samples is None else seed,
        _offset=offset,
    )


def shipped_text(name: str = "kjv") -> str:
    """A public-domain text shipped with curvscope (``kjv``: see ``data/TEXT-SOURCE.txt``).

    Raises:
        DataError: when the packaged file is missing.
    """
    ref = resources.files("curvscope.io").joinpath(f"data/{name}.txt.gz")
    with resources.as_file(ref) as p:
        if not Path(p).exists():
            raise DataError(f"the packaged text {name}.txt.gz is missing; reinstall curvscope.")
        with gzip.open(p, "rt", encoding="utf-8") as fh:
            return fh.read()
