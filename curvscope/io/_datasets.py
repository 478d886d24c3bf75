"""Data sets in: built-in offline sets and files (docs/DESIGN.md "Inputs"). Nothing downloads.

Built-ins: ``digits`` (the UCI 8x8 handwritten digits, 1797 images, shipped as package data,
CC BY 4.0), ``sinus`` (a seeded 1-D sine regression for the Suk-style MLP) and ``blobs2d``
(two seeded Gaussian blobs for logistic regression, 800 points as in Veitch Sec. 3). Files:
``.npz`` (``x``/``X`` and ``y`` or ``x_key``/``y_key``), ``.pt`` (a tensor pair, a tuple
or a dict, loaded with ``weights_only=True``), ``.csv`` (``label_column``) and IDX files as
MNIST and Fashion-MNIST ship them (``.gz`` or not, or a folder plus ``split``). Whatever a
file holds, it loads or raises one sentence naming it (issue 14).
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import math
import zlib
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .._errors import DataError, NonFiniteError, arg
from .._losses import is_classification
from ._results import file_sha256

__all__ = ["BUILTIN_DATASETS", "Dataset", "check_fits", "load_dataset"]

BUILTIN_DATASETS = {
    "digits": "UCI 8x8 handwritten digits (1797 images, 10 classes, inputs scaled to [0, 1])",
    "sinus": "y = sin(x) + 0.05 noise on 512 points x in [-pi, pi] (regression, seeded)",
    "blobs2d": "two Gaussian blobs in the plane, 800 points, labels 0/1 (logistic regression)",
}
_DOWNLOAD_NAMES = {"mnist", "fashion-mnist", "fashion_mnist", "cifar10", "cifar-10", "imagenet"}


@dataclass(frozen=True)
class Dataset:
    """A fixed, ordered sample set.

    Attributes:
        x: inputs ``[N, ...]`` (float32).
        y: targets: int64 class labels or float regression targets.
        source: what was loaded (a built-in name or a path), with preprocessing.
        sha256: hash of the file's bytes (or of the generated arrays for built-ins).
        subset_seed: seed of the random subset, when ``subset`` chose one.
        files: every file read, path -> SHA-256 of its bytes (both files of an IDX pair;
            empty for built-ins).
    """

    x: torch.Tensor
    y: torch.Tensor
    source: str
    sha256: str
    subset_seed: int | None = None
    files: dict[str, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def num_classes(self) -> int | None:
        """Number of classes for integer labels, else ``None``."""
        if self.y.is_floating_point():
            return None
        return int(self.y.max()) + 1 if self.y.numel() else 0

    def batches(self, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The samples in order, in batches of ``batch_size`` (the last may be smaller)."""
        n = len(self)
        return [
            (self.x[i : i + batch_size], self.y[i : i + batch_size])
            for i in range(0, n, batch_size)
        ]

    def subset(self, n: int, seed: int) -> Dataset:
        """A seeded random subset of ``n`` samples (kept in their original order).

        Raises:
            DataError: when ``n`` is not between 1 and the number of samples.
        """
        if not 1 <= n <= len(self):
            raise DataError(
                f"{arg('samples')} {n} must be between 1 and the {len(self)} samples of "
                f"{self.source}."
            )
        g = torch.Generator().manual_seed(seed)
        idx = torch.randperm(len(self), generator=g)[:n].sort().values
        return replace(
            self,
            x=self.x[idx],
            y=self.y[idx],
            subset_seed=seed,
            source=f"{self.source} (random subset of {n}, seed {seed})",
        )


def _array_hash(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def _brief(exc: BaseException, limit: int = 160) -> str:
    """The first line of an exception's message, shortened, to quote inside one sentence."""
    text = str(exc).strip()
    text = text.splitlines()[0].strip().rstrip(".") if text else ""
    text = text or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3].rstrip() + "..."


def _numeric(value: object, what: str, where: str) -> np.ndarray:
    """``value`` (array, tensor or nested list) as a native-byte-order numeric array.

    Raises:
        DataError: for strings, objects, complex numbers, ragged lists and tensors numpy
            cannot hold; ``what`` (inputs, labels) and ``where`` (the file) name them.
    """
    try:
        if isinstance(value, torch.Tensor):
            t = value.detach()
            if t.is_complex():
                raise DataError(
                    f"the {what} of {where} are complex numbers; curvscope needs real ones.",
                    path=where,
                )
            if t.layout != torch.strided:
                t = t.to_dense()
            if t.dtype not in (
                torch.bool,
                torch.uint8,
                torch.int8,
                torch.int16,
                torch.int32,
                torch.int64,
                torch.float16,
                torch.float32,
                torch.float64,
            ):
                t = t.double() if t.is_floating_point() else t.long()
            arr = t.cpu().numpy()
        else:
            arr = np.asarray(value)
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - ragged lists, meta or quantized tensors, ...
        raise DataError(
            f"the {what} of {where} are not a numeric array ({_brief(exc)}).", path=where
        ) from None
    kind = arr.dtype.kind
    if kind == "c":
        raise DataError(
            f"the {what} of {where} are complex numbers; curvscope needs real ones.", path=where
        )
    if kind not in "biuf":
        raise DataError(
            f"the {what} of {where} have dtype {arr.dtype} (strings or objects), not numbers.",
            path=where,
        )
    if arr.dtype.byteorder not in ("=", "|"):  # IDX files are big-endian; torch wants native
        arr = arr.astype(arr.dtype.newbyteorder("="))
    return arr


# Integer-valued float labels become class indices only where float64 holds them exactly.
_EXACT_INT = 2.0**53


def _labels(y: np.ndarray) -> torch.Tensor:
    if y.dtype.kind == "f":
        t = torch.from_numpy(np.ascontiguousarray(y, dtype=np.float64))
        whole = bool(torch.isfinite(t).all()) and bool((t.abs() < _EXACT_INT).all())
        if t.numel() and t.dim() == 1 and whole and torch.all(t == t.round()):
            return t.long()
        return t.float()
    if y.dtype.kind == "u" and y.dtype.itemsize == 8:
        # uint64 beyond int64 would wrap to negative labels; clamp so the range check names it.
        y = np.minimum(y, np.iinfo(np.int64).max)
    return torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64))


# ------------------------------------------------------------------ built-ins
def _digits() -> tuple[np.ndarray, np.ndarray]:
    ref = resources.files("curvscope.io").joinpath("data/digits.npz")
    with resources.as_file(ref) as path:
        if not Path(path).exists():
            raise DataError("the packaged digits data are missing; reinstall curvscope.")
        with np.load(path) as f:
            return f["x"].astype(np.float32) / 16.0, f["y"].astype(np.int64)


def _sinus(n: int = 512, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(n, 1, generator=g, dtype=torch.float64) * 2 - 1) * math.pi
    y = torch.sin(x) + 0.05 * torch.randn(n, 1, generator=g, dtype=torch.float64)
    return x.float().numpy(), y.float().numpy()


def _blobs2d(n: int = 800, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    centres = torch.tensor([[-1.0, -0.5], [1.0, 0.5]])
    x = centres[y] + 0.8 * torch.randn(n, 2, generator=g)
    return x.numpy(), y.numpy()


_BUILTINS = {"digits": _digits, "sinus": _sinus, "blobs2d": _blobs2d}


# ------------------------------------------------------------------ files
def _from_npz(path: Path, x_key: str | None, y_key: str | None):
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise DataError(
                f"{path} holds one .npy array, not an .npz archive of inputs and labels; save "
                "both with np.savez(path, x=..., y=...).",
                path=str(path),
            )
        with loaded as f:
            keys = list(f.keys())
            xk = x_key or next((k for k in ("x", "X", "inputs", "data") if k in keys), None)
            yk = y_key or next((k for k in ("y", "Y", "labels", "targets") if k in keys), None)
            if xk not in keys or yk not in keys:
                raise DataError(
                    f"{path} has arrays {keys}; name the inputs and labels with {arg('x_key')} "
                    f"and {arg('y_key')}.",
                    path=str(path),
                )
            return f[xk], f[yk]
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - zipfile, zlib and numpy raise many kinds
        # An object array (allow_pickle=False), a cut archive (BadZipFile, EOFError), a
        # bad CRC, a .npy or pickle renamed .npz (np.load then returns no NpzFile), a
        # declared shape too large to allocate (MemoryError).
        raise DataError(
            f"{path} is not a readable .npz file ({_brief(exc)}).", path=str(path)
        ) from None


def _from_pt(path: Path, x_key: str | None, y_key: str | None):
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - truncated archives, refused pickles, ...
        raise DataError(
            f"{path} is not a readable tensor file ({_brief(exc)}).", path=str(path)
        ) from None
    if isinstance(obj, dict):
        xk = x_key or next((k for k in ("x", "X", "inputs") if k in obj), None)
        yk = y_key or next((k for k in ("y", "Y", "labels", "targets") if k in obj), None)
        if xk not in obj or yk not in obj:
            keys = ", ".join(map(repr, list(obj)[:10])) or "none"
            raise DataError(
                f"{path} holds keys {keys}; name the inputs and labels with {arg('x_key')} and "
                f"{arg('y_key')}.",
                path=str(path),
            )
        return obj[xk], obj[yk]
    if isinstance(obj, (tuple, list)) and len(obj) == 2:
        return obj[0], obj[1]
    raise DataError(
        f"{path} holds a {type(obj).__name__}, not an (x, y) pair or a dict with x and y tensors.",
        path=str(path),
    )


def _from_csv(path: Path, label_column: str | None):
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            rows = [r for r in csv.reader(fh) if r]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path} cannot be read as CSV ({_brief(exc)}).", path=str(path)) from None
    if not rows:
        raise DataError(f"{path} is empty.", path=str(path))
    header = None
    try:
        [float(v) for v in rows[0]]
    except ValueError:
        header, rows = rows[0], rows[1:]
    if not rows:
        raise DataError(f"{path} has a header but no rows of data.", path=str(path))
    ncol = len(rows[0])
    for i, r in enumerate(rows):
        if len(r) != ncol:
            line = i + 1 + (header is not None)
            raise DataError(
                f"row {line} of {path} has {len(r)} values but the first row has {ncol}.",
                path=str(path),
            )
    if ncol < 2:
        raise DataError(
            f"{path} has {ncol} column; it needs input columns and a label column.",
            path=str(path),
        )
    if label_column is None:
        col = ncol - 1
    elif header is not None and label_column in header:
        col = header.index(label_column)
    else:
        try:
            col = int(label_column)
        except ValueError:
            names = f"; columns are {', '.join(header)}" if header else ""
            raise DataError(
                f"{arg('label_column')} {label_column!r} is not a column of {path}{names}.",
                path=str(path),
            ) from None
        if not -ncol <= col < ncol:
            raise DataError(
                f"{arg('label_column')} {col} is out of range for {ncol} columns in {path}.",
                path=str(path),
            )
        col %= ncol
    try:
        arr = np.array([[float(v) for v in r] for r in rows], dtype=np.float64)
    except ValueError as exc:
        raise DataError(
            f"{path} holds a non-numeric value ({_brief(exc)}).", path=str(path)
        ) from None
    return np.delete(arr, col, axis=1).astype(np.float32), arr[:, col]


_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            data = fh.read()
    except (OSError, EOFError, zlib.error) as exc:
        # gzip raises BadGzipFile (an OSError) for a wrong magic number, EOFError for a cut
        # stream and zlib.error for damaged blocks.
        raise DataError(f"{path} cannot be read ({_brief(exc)}).", path=str(path)) from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise DataError(f"{path} is not an IDX file (bad magic number).", path=str(path))
    ndim = data[3]
    if ndim == 0:
        raise DataError(
            f"{path} is an IDX file of zero dimensions, so it holds no samples.", path=str(path)
        )
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path} is truncated inside its IDX header.", path=str(path))
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    # Python integers: the product of four 32-bit dimensions overflows int64 silently, and
    # comparing sizes before np.frombuffer never allocates what a damaged header claims.
    count = math.prod(dims)
    if count * dtype.itemsize != len(data) - header:
        raise DataError(
            f"{path} is truncated or damaged: its header gives shape {tuple(dims)} "
            f"({count} values) but it holds {len(data) - header} bytes of {dtype.itemsize}.",
            path=str(path),
        )
    return np.frombuffer(data, dtype=dtype, count=count, offset=header).reshape(dims)


def _idx_pair(path: Path, split: str) -> tuple[np.ndarray, np.ndarray, Path, list[Path]]:
    if path.is_dir():
        prefix = {"train": "train", "test": "t10k"}.get(split)
        if prefix is None:
            raise DataError(
                f"{arg('split')} {split!r} is not known for {path}; choose train or test.",
                path=str(path),
            )

        def find(kind: str) -> Path:
            for suffix in ("", ".gz"):
                for sep in ("-", "."):
                    p = (
                        path
                        / f"{prefix}-{kind}{sep}idx{3 if kind == 'images' else 1}-ubyte{suffix}"
                    )
                    if p.is_file():
                        return p
            raise DataError(
                f"{path} has no {prefix}-{kind}-idx*-ubyte[.gz] file for {arg('split')} {split}.",
                path=str(path),
            )

        images, labels = find("images"), find("labels")
        return _read_idx(images), _read_idx(labels), path, [images, labels]
    name = path.name
    label_name = name.replace("images-idx3", "labels-idx1").replace("images.idx3", "labels.idx1")
    label_path = path.with_name(label_name)
    if label_name == name:
        raise DataError(
            f"{path} is not an IDX images file (named like train-images-idx3-ubyte); pass the "
            "images file or the folder holding both.",
            path=str(path),
        )
    if not label_path.is_file():
        raise DataError(
            f"{path}: cannot find the matching labels file {label_name}.", path=str(path)
        )
    return _read_idx(path), _read_idx(label_path), path, [path, label_path]


# ------------------------------------------------------------------ entry point
def _parse_numbers(value: object, name: str, where: str) -> list[float] | None:
    if value is None:
        return None
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    try:
        numbers = [float(v) for v in items if not isinstance(v, str) or v.strip()]
    except (TypeError, ValueError):
        raise DataError(
            f"{arg(name)} {value!r} for {where} must be comma-separated numbers."
        ) from None
    if not all(math.isfinite(v) for v in numbers):
        raise DataError(f"{arg(name)} {value!r} for {where} must hold finite numbers.")
    return numbers


def _parse_shape(value: object, where: str) -> list[int]:
    numbers = _parse_numbers(value, "input_shape", where) or []
    if not numbers or not all(v == int(v) and 1 <= v <= 2**31 for v in numbers):
        raise DataError(
            f"{arg('input_shape')} {value!r} for {where} must be positive whole numbers such as "
            "1,28,28."
        )
    return [int(v) for v in numbers]


def load_dataset(
    spec: str | Path,
    *,
    base_dir: str | Path | None = None,
    x_key: str | None = None,
    y_key: str | None = None,
    label_column: str | None = None,
    split: str = "train",
    input_shape: str | list[int] | None = None,
    scale: float | None = None,
    normalize: str | list[float] | None = None,
) -> Dataset:
    """Load a built-in set or a file, then reshape, scale and normalise the inputs.

    Args:
        spec: a built-in name (``digits``, ``sinus``, ``blobs2d``) or a path.
        base_dir: folder relative paths are resolved against (a checkpoint's folder).
        x_key: input array name in ``.npz``/``.pt`` dicts.
        y_key: label array name.
        label_column: label column of a ``.csv`` (name or index; default the last).
        split: ``train`` or ``test`` for an IDX folder.
        input_shape: per-sample shape, e.g. ``"1,28,28"``.
        scale: divide inputs by this (e.g. 255).
        normalize: ``"MEAN,STD"`` or per channel ``"M1,M2,M3,S1,S2,S3"``.

    Raises:
        DataError: for missing files, unknown names, unreadable or malformed data; every
            message is one sentence naming the file.
    """
    spec_str = str(spec)
    files: dict[str, str] = {}
    if spec_str in _BUILTINS:
        x, y = _BUILTINS[spec_str]()
        source, sha = spec_str, _array_hash(x, y)
    else:
        path = Path(spec_str)
        if base_dir is not None and not path.is_absolute():
            path = Path(base_dir) / path
        if not path.exists():
            if spec_str.lower() in _DOWNLOAD_NAMES:
                raise DataError(
                    f"{arg('data')} {spec_str} would need a download, and curvscope never "
                    "downloads; pass the IDX files or a folder holding them."
                )
            raise DataError(
                f"data {path} does not exist (built-in sets: {', '.join(BUILTIN_DATASETS)}).",
                path=str(path),
            )
        name = path.name.lower()
        read = [path]
        # The suffix decides before the name: "idx" in "mnist_idx.npz" is no IDX file.
        if path.is_dir():
            x, y, path, read = _idx_pair(path, split)
        elif name.endswith(".npz"):
            x, y = _from_npz(path, x_key, y_key)
        elif name.endswith((".pt", ".pth")):
            x, y = _from_pt(path, x_key, y_key)
        elif name.endswith(".csv"):
            x, y = _from_csv(path, label_column)
        elif "idx" in name:
            x, y, path, read = _idx_pair(path, split)
        else:
            raise DataError(
                f"{path}: unknown data format (use .npz, .pt, .csv or IDX files).", path=str(path)
            )
        try:
            source, sha = str(path), file_sha256(path)
            files = {str(p): file_sha256(p) for p in read}
        except OSError as exc:
            raise DataError(f"{path} cannot be read ({_brief(exc)}).", path=str(path)) from None
    xa, ya = _numeric(x, "inputs", source), _numeric(y, "labels", source)
    if xa.ndim == 0 or xa.shape[0] == 0:
        raise DataError(f"{source} holds no samples.", path=source)
    if ya.ndim == 0:
        raise DataError(f"the labels of {source} are one number, not one per sample.", path=source)
    if xa.shape[0] != ya.shape[0]:
        raise DataError(f"{source}: {xa.shape[0]} inputs but {ya.shape[0]} labels.", path=source)
    try:
        x = torch.from_numpy(np.ascontiguousarray(xa, dtype=np.float32))
    except (MemoryError, ValueError) as exc:
        raise DataError(
            f"the inputs of {source} cannot be made float32 ({_brief(exc)}).", path=source
        ) from None
    y = _labels(ya)
    notes = []
    if input_shape is not None:
        shape = _parse_shape(input_shape, source)
        per = math.prod(shape)
        if x[0].numel() != per:
            raise DataError(
                f"{arg('input_shape')} {','.join(map(str, shape))} has {per} values but each "
                f"sample of {source} has {x[0].numel()}.",
                path=source,
            )
        x = x.reshape(x.shape[0], *shape)
        notes.append(f"shape {shape}")
    if scale is not None:
        try:
            factor = float(scale)
        except (TypeError, ValueError):
            raise DataError(f"{arg('scale')} {scale!r} for {source} must be a number.") from None
        if factor == 0 or not math.isfinite(factor):
            raise DataError(
                f"{arg('scale')} {scale!r} for {source} must be a finite number other than 0."
            )
        x = x / factor
        notes.append(f"/{factor:g}")
    norm = _parse_numbers(normalize, "normalize", source)
    if norm:
        if len(norm) % 2:
            raise DataError(
                f"{arg('normalize')} for {source} needs MEAN,STD pairs (one mean and one std per "
                "channel)."
            )
        c = len(norm) // 2
        mean, std = torch.tensor(norm[:c]), torch.tensor(norm[c:])
        if (std <= 0).any():
            raise DataError(
                f"{arg('normalize')} standard deviations for {source} must be positive."
            )
        if c > 1:
            if x.dim() < 2 or x.shape[1] != c:
                raise DataError(
                    f"{arg('normalize')} gives {c} channels but the inputs of {source} have shape "
                    f"{tuple(x.shape[1:])}."
                )
            view = [1, c] + [1] * (x.dim() - 2)
            x = (x - mean.view(view)) / std.view(view)
        else:
            x = (x - mean) / std
        notes.append(f"normalised {norm}")
    if notes:
        source = f"{source} ({', '.join(notes)})"
    return Dataset(x, y, source, sha, files=files)


def check_fits(model: nn.Module, dataset: Dataset, loss: str) -> None:
    """Check that the data fit the model and the loss before any analysis.

    Raises:
        NonFiniteError: when inputs or targets hold NaN or Inf.
        DataError: when one sample does not go through the model (shape), or labels fall
            outside the model's output range.
    """
    if len(dataset) == 0:
        # Checked first: the label-range check below reduces over the labels (min() of an
        # empty tensor is an error, not a finding).
        raise DataError(f"{dataset.source} holds no samples.")
    if not torch.isfinite(dataset.x).all():
        raise NonFiniteError(f"the inputs of {dataset.source} hold NaN or Inf values.")
    if dataset.y.is_floating_point() and not torch.isfinite(dataset.y).all():
        raise NonFiniteError(f"the targets of {dataset.source} hold NaN or Inf values.")
    param = next(iter(model.parameters()), None)
    dtype = param.dtype if param is not None else torch.float32
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(dataset.x[:2].to(dtype))
    except Exception as exc:  # noqa: BLE001 - any failure here is a shape mismatch
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(
            f"the data of {dataset.source} (samples of shape {tuple(dataset.x.shape[1:])}) do "
            f"not fit the model's input ({first}); reshape them with {arg('input_shape')}."
        ) from None
    finally:
        model.train(was)
    if is_classification(loss):
        if dataset.y.is_floating_point():
            raise DataError(
                f"{arg('loss')} {loss} needs integer class labels, but {dataset.source} "
                "has real-valued targets."
            )
        if dataset.y.dim() != 1 and out.dim() == 2:
            raise DataError(
                f"{arg('loss')} {loss} needs one class index per sample, but the labels of "
                f"{dataset.source} have shape {tuple(dataset.y.shape)}."
            )
        classes = out.shape[-1]
        lo, hi = int(dataset.y.min()), int(dataset.y.max())
        if lo < 0 or hi >= classes:
            raise DataError(
                f"labels of {dataset.source} range over {lo}..{hi} but the model has {classes} "
                "outputs (labels must lie in 0.."
                f"{classes - 1})."
            )
    elif loss in ("mse", "bce_with_logits"):
        per_out = out[0].numel()
        per_y = dataset.y[0].numel() if dataset.y.dim() > 1 else 1
        if per_out != per_y:
            raise DataError(
                f"targets of {dataset.source} have {per_y} value(s) per sample but the model "
                f"has {per_out} output(s)."
            )
