"""Property-based tests of the io loaders (issue 14 items 1 and 2).

Every data file kind (.npz, .pt, .csv, IDX with and without .gz, an IDX folder) and every
checkpoint kind (curvscope .pt, .safetensors, state dict + builder, TorchScript, pickled
module) is generated with defects: empty, one sample, strings, objects, complex, bool, NaN,
Inf, mismatched lengths, huge or negative dimensions, wrong magic numbers, and the bytes
truncated or bit-flipped at random offsets. Loading, then checking the data against a tiny
model, must succeed or raise one :class:`CurvscopeError` sentence naming the file; anything
else (a traceback) fails the test. Which of the two, and the exact values loaded or the
words of the sentence, is decided by an oracle from the generated input alone
(``array_outcome``, ``csv_outcome``, ``idx_outcome``, ``token_outcome``,
``source_outcome``): a file that loads wrong values fails.

Seeded (``derandomize=True``) and bounded: the whole file runs in well under 60 s with one
thread.
"""

import csv
import gzip
import io
import math
import shutil
import struct
import tempfile
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from curvscope import CurvscopeError
from curvscope.io import (
    Dataset,
    build_arch,
    check_fits,
    load_checkpoint,
    load_dataset,
    save_checkpoint,
    save_safetensors,
)

ARCH = {"type": "mlp", "sizes": [4, 5, 3], "activation": "tanh", "bias": True}
FUZZ = settings(
    derandomize=True,  # the same examples on every run: a failure reproduces
    database=None,  # nothing written into the repository
    deadline=None,  # one TorchScript load can take tens of ms on a loaded machine
    report_multiple_bugs=False,  # shrink one failure, not every distinct one (minutes)
    max_examples=300,  # about 1.5 s per test with one thread
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def tiny_model():
    torch.manual_seed(0)
    return build_arch(ARCH)


def assert_one_sentence(exc, names):
    """A CurvscopeError message: one line, one sentence, naming one of ``names``."""
    message = str(exc)
    event(type(exc).__name__)  # --hypothesis-show-statistics tells how often each was hit
    assert "\n" not in message, message
    assert message.rstrip().endswith("."), message
    assert len(message) < 1000, message
    assert any(name in message for name in names), (names, message)


@pytest.fixture(autouse=True)
def _quiet():
    # torch warns about pickle protocols and bit-flipped archives; the results are checked.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# ------------------------------------------------------------------ damage
@st.composite
def damages(draw):
    """Whole-file damage; half the examples keep the file intact, so defects inside it count."""
    kind = draw(st.sampled_from(["none", "none", "none", "empty", "truncate", "flip", "prefix"]))
    if kind == "truncate":
        return kind, draw(st.floats(0, 1, exclude_max=True))
    if kind == "flip":
        where = st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 7))
        return kind, draw(st.lists(where, min_size=1, max_size=4))
    if kind == "prefix":
        return kind, draw(st.binary(min_size=1, max_size=8))
    return (kind,)


damage = damages()


def apply_damage(path: Path, how) -> None:
    data = bytearray(path.read_bytes())
    kind = how[0]
    if kind == "empty":
        data = bytearray()
    elif kind == "truncate":
        data = data[: int(how[1] * len(data))]
    elif kind == "flip" and data:
        for where, bit in how[1]:
            data[int(where * len(data))] ^= 1 << bit
    elif kind == "prefix":
        data = bytearray(how[1]) + data
    path.write_bytes(bytes(data))


# ------------------------------------------------------------------ arrays with defects
X_DTYPES = ["float32", "float64", "float16", "int64", "uint8", "bool", "complex64", "str"]
Y_KINDS = ["classes", "out_of_range", "negative", "float", "nan", "inf", "bool", "str", "2d"]


@st.composite
def arrays(draw):
    if draw(st.booleans()):  # well-formed arrays that fit the tiny model
        n = draw(st.sampled_from([1, 2, 5]))
        shape = (4,)
        x_dtype = draw(st.sampled_from(["float32", "float64", "float16", "int64", "uint8", "bool"]))
        y_kind = draw(st.sampled_from(["classes", "float", "bool"]))
        n_y, special = n, None
    else:
        n = draw(st.sampled_from([0, 1, 2, 5]))
        shape = draw(st.sampled_from([(4,), (2, 2), (3,), (0,), ()]))
        x_dtype = draw(st.sampled_from(X_DTYPES))
        y_kind = draw(st.sampled_from(Y_KINDS))
        n_y = n + draw(st.sampled_from([0, 0, 0, 1, -1]))
        special = draw(st.sampled_from([None, np.nan, np.inf, -np.inf, 1e30]))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    x = rng.normal(size=(n, *shape)) if shape != () else rng.normal(size=(n,))
    if special is not None and x.size:
        x.flat[0] = special
    if x_dtype == "str":
        x = x.astype(str)
    elif x_dtype == "bool":
        x = x > 0
    elif x_dtype in ("int64", "uint8"):
        x = np.nan_to_num(x, posinf=0, neginf=0).clip(0, 200).astype(x_dtype)
    else:
        with np.errstate(over="ignore"):
            x = x.astype(x_dtype)
    n_y = max(n_y, 0)
    y = {
        "classes": lambda: rng.integers(0, 3, n_y),
        "out_of_range": lambda: rng.integers(3, 1000, n_y),
        "negative": lambda: -rng.integers(1, 5, n_y),
        "float": lambda: rng.normal(size=n_y),
        "nan": lambda: np.full(n_y, np.nan),
        "inf": lambda: np.full(n_y, np.inf),
        "bool": lambda: rng.integers(0, 2, n_y).astype(bool),
        "str": lambda: rng.integers(0, 3, n_y).astype(str),
        "2d": lambda: rng.integers(0, 3, (n_y, 1)),
    }[y_kind]()
    return x, y


def check_data(path: Path, names, loss: str, expect=None, **options):
    """Load, check against the tiny model, and accept success or one sentence.

    ``expect``, decided from the generated input alone (:func:`array_outcome`): ``("loads",
    x, y)`` where the file must load with exactly these values, ``("refuses", words)`` where
    it must be refused with a sentence holding ``words`` (``None``: any sentence), or ``None``
    where either may happen.
    """
    try:
        dataset = load_dataset(path, **options)
        check_fits(tiny_model(), dataset, loss)
    except CurvscopeError as exc:
        assert_one_sentence(exc, names)
        assert expect is None or expect[0] == "refuses", (expect, str(exc))
        if expect is not None and expect[1] is not None:
            assert expect[1] in str(exc), (expect[1], str(exc))
        return None
    assert len(dataset) >= 1 and dataset.files, dataset.source
    assert expect is None or expect[0] == "loads", (expect, dataset.source)
    if expect is not None:
        assert torch.equal(dataset.x, expect[1]), (dataset.x, expect[1])
        assert dataset.y.dtype == expect[2].dtype and torch.equal(dataset.y, expect[2])
    event("loaded")
    return dataset


def array_outcome(x: np.ndarray, y: np.ndarray, loss: str):
    """What loading ``(x, y)`` (intact, under recognised keys) against the tiny model (4
    inputs, 3 outputs) must give, from the arrays themselves: ``("loads", x, y)`` with the
    exact tensors, or ``("refuses", words of the sentence)``."""
    if x.dtype.kind == "U":
        return "refuses", "the inputs of"
    if x.dtype.kind == "c":
        return "refuses", "complex numbers"
    if y.dtype.kind == "U":
        return "refuses", "the labels of"
    if x.shape[0] == 0:
        return "refuses", "holds no samples"
    if x.shape[0] != y.shape[0]:
        return "refuses", f"{x.shape[0]} inputs but {y.shape[0]} labels"
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    integral = y.dtype.kind in "biu" or (
        y.ndim == 1 and np.isfinite(y).all() and (y == np.round(y)).all()
    )
    yt = torch.from_numpy(y.astype(np.int64) if integral else y.astype(np.float32))
    if not torch.isfinite(xt).all():
        return "refuses", "hold NaN or Inf"
    if not integral and not np.isfinite(y).all():
        return "refuses", "hold NaN or Inf"
    if x.shape[1:] != (4,):
        return "refuses", "do not fit the model's input"
    if loss == "mse":  # one target per sample, three outputs
        return "refuses", "value(s) per sample but the model has 3 output(s)"
    if not integral:
        return "refuses", "needs integer class labels"
    if y.ndim != 1:
        return "refuses", "one class index per sample"
    if yt.min() < 0 or yt.max() > 2:
        return "refuses", "labels must lie in 0..2"
    return "loads", xt, yt


def damaged_outcome(expect, how):
    """An intact file's outcome after damage: an empty file is refused; other damage is
    refused or (where the archive's checksums miss it) leaves the values intact."""
    if how[0] == "none":
        return expect
    if how[0] == "empty":
        return "refuses", None
    return None if expect[0] == "loads" else ("refuses", None)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


class Scratch:
    """A fresh folder per example (hypothesis runs many examples in one test call)."""

    def __init__(self, root: Path):
        self.root = root

    def __enter__(self) -> Path:
        self.path = Path(tempfile.mkdtemp(dir=self.root))
        return self.path

    def __exit__(self, *exc):
        shutil.rmtree(self.path, ignore_errors=True)


LOSSES = st.sampled_from(["cross_entropy", "mse"])


# ------------------------------------------------------------------ .npz, .pt, .csv
@FUZZ
@given(
    data=arrays(),
    keys=st.sampled_from([("x", "y"), ("X", "labels"), ("a", "b")]),
    how=damage,
    loss=LOSSES,
)
def test_npz_loads_or_says_why(workdir, data, keys, how, loss):
    x, y = data
    with Scratch(workdir) as d:
        path = d / "data.npz"
        if keys == ("a", "b") and x.dtype.kind != "U":
            x = x.astype(object)  # an object array: np.load refuses it without pickle
        np.savez(path, **{keys[0]: x, keys[1]: y})
        apply_damage(path, how)
        if keys == ("a", "b"):  # no recognised names
            expect = "refuses", "name the inputs and labels"
        else:
            expect = array_outcome(x, y, loss)
        check_data(path, [path.name], loss, damaged_outcome(expect, how))


@FUZZ
@given(
    data=arrays(),
    layout=st.sampled_from(["tuple", "dict", "list", "tensor", "triple"]),
    how=damage,
    loss=LOSSES,
)
def test_pt_loads_or_says_why(workdir, data, layout, how, loss):
    x, y = data

    def tensor(a):  # strings have no tensor: they travel as (weights_only-safe) lists
        return a.tolist() if a.dtype.kind == "U" else torch.from_numpy(np.ascontiguousarray(a))

    tx, ty = tensor(x), tensor(y)
    obj = {
        "tuple": (tx, ty),
        "dict": {"x": tx, "y": ty, "epoch": 3},
        "list": [tx, ty],
        "tensor": tx,
        "triple": (tx, ty, ty),
    }[layout]
    if layout == "tensor":  # one tensor (or, for strings, a list: a pair when it has two)
        expect = None if x.dtype.kind == "U" and len(x) == 2 else ("refuses", "holds a")
    elif layout == "triple":
        expect = "refuses", "holds a tuple"
    else:  # strings arrive as lists: an empty one is an empty float array
        arrived = [np.asarray(a.tolist()) if a.dtype.kind == "U" else a for a in (x, y)]
        expect = array_outcome(*arrived, loss)
    with Scratch(workdir) as d:
        path = d / "data.pt"
        torch.save(obj, path)
        apply_damage(path, how)
        check_data(path, [path.name], loss, damaged_outcome(expect, how) if expect else None)


@st.composite
def csv_texts(draw):
    x, y = draw(arrays())
    header = draw(st.booleans())
    defects = [None, None, None, "header_only", "ragged", "word", "blank", "one_col"]
    defect = draw(st.sampled_from(defects))
    if x.ndim != 2:
        x = x.reshape(len(x), -1) if len(x) else np.zeros((0, 4))
    ncol = x.shape[1] + 1
    lines = [",".join([f"f{i}" for i in range(ncol - 1)] + ["label"])] if header else []
    labels = y[:, 0].tolist() if y.ndim > 1 else y.tolist()
    for row, lab in zip(x.tolist(), labels, strict=False):
        lines.append(",".join(str(v) for v in row) + f",{lab}")
    if defect == "header_only":
        lines = lines[:1]
    elif defect == "ragged" and len(lines) > 1:
        lines[-1] += ",7"
    elif defect == "word" and len(lines) > 1:
        lines[-1] = "seven," + lines[-1]
    elif defect == "blank":
        lines.insert(len(lines) // 2, "")
    elif defect == "one_col":
        lines = [line.split(",")[0] for line in lines]
    label = draw(st.sampled_from([None, None, "label", "-1", "0", "99", "nope"]))
    return "\n".join(lines) + "\n", label


def fit_outcome(x: torch.Tensor, y: torch.Tensor, loss: str):
    """What :func:`check_fits` must say of float32 inputs ``x`` and labels ``y`` against the
    tiny model (a Linear of 4 inputs first, 3 outputs): ``("loads", x, y)`` or ``("refuses",
    words)``."""
    if not torch.isfinite(x).all():
        return "refuses", "inputs of"
    if y.is_floating_point() and not torch.isfinite(y).all():
        return "refuses", "targets of"
    if x.dim() < 2 or x.shape[-1] != 4:  # the first Linear takes the last dimension
        return "refuses", "do not fit the model's input"
    if loss == "mse":  # the labels give one value per sample, the model three
        per_y = y[0].numel() if y.dim() > 1 else 1
        per_out = 3 * math.prod(x.shape[1:-1])
        if per_y != per_out:
            return "refuses", "value(s) per sample but the model has"
        return "loads", x, y
    if y.is_floating_point():
        return "refuses", "needs integer class labels"
    if y.dim() != 1 and x.dim() == 2:
        return "refuses", "one class index per sample"
    if int(y.min()) < 0 or int(y.max()) > 2:
        return "refuses", "labels must lie in 0..2"
    return "loads", x, y


def label_tensor(y: np.ndarray) -> torch.Tensor:
    """Labels as curvscope keeps them: float labels that are all whole (1-D, finite, exact
    in float64) are class indices, other floats stay real-valued targets, integers int64."""
    if y.dtype.kind == "f":
        y = y.astype(np.float64)
        whole = (y.size and y.ndim == 1 and np.isfinite(y).all()
                 and (np.abs(y) < 2.0**53).all() and (y == np.round(y)).all())
        return torch.from_numpy(y.astype(np.int64) if whole else y.astype(np.float32))
    return torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64))


def is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


def csv_outcome(raw: bytes, label: str | None, loss: str):
    """What loading the CSV bytes ``raw`` with ``label_column=label`` must give.

    The rules of the CSV reader: a file that is not UTF-8 text or not CSV is refused; blank
    lines are skipped; the first row is a header when one of its cells is no number; every
    row has the first row's number of cells, at least two; the label column is the last, a
    header name or an index (negative from the end); every cell is a number. Then the
    inputs (float32) and labels must fit the model (:func:`fit_outcome`).
    """
    try:
        rows = [r for r in csv.reader(io.StringIO(raw.decode("utf-8"), newline="")) if r]
    except (UnicodeDecodeError, csv.Error):
        return "refuses", "cannot be read as CSV"
    if not rows:
        return "refuses", "is empty"
    header = None
    if not all(is_number(v) for v in rows[0]):
        header, rows = rows[0], rows[1:]
    if not rows:
        return "refuses", "has a header but no rows of data"
    ncol = len(rows[0])
    if any(len(r) != ncol for r in rows):
        return "refuses", f"but the first row has {ncol}"
    if ncol < 2:
        return "refuses", "it needs input columns and a label column"
    if label is None:
        col = ncol - 1
    elif header is not None and label in header:
        col = header.index(label)
        if col >= ncol:  # a header longer than the rows: the named column holds no values
            return "refuses", None
    else:
        try:
            col = int(label)
        except ValueError:
            return "refuses", "is not a column of"
        if not -ncol <= col < ncol:
            return "refuses", f"is out of range for {ncol} columns"
        col %= ncol
    if not all(is_number(v) for r in rows for v in r):
        return "refuses", "holds a non-numeric value"
    values = np.array([[float(v) for v in r] for r in rows], dtype=np.float64)
    with np.errstate(over="ignore"):
        x = torch.from_numpy(np.delete(values, col, axis=1).astype(np.float32))
    return fit_outcome(x, label_tensor(values[:, col]), loss)


@FUZZ
@given(text=csv_texts(), how=damage, loss=LOSSES)
def test_csv_loads_or_says_why(workdir, text, how, loss):
    body, label = text
    with Scratch(workdir) as d:
        path = d / "data.csv"
        path.write_text(body)
        apply_damage(path, how)
        # decided from the file's bytes: text has no checksum, so damage changes values
        expect = csv_outcome(path.read_bytes(), label, loss)
        check_data(path, [path.name], loss, expect, label_column=label)


# ------------------------------------------------------------------ IDX
IDX_CODES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def idx_bytes(array: np.ndarray, code: int, dims=None, magic=None) -> bytes:
    dims = list(array.shape) if dims is None else dims
    head = magic if magic is not None else struct.pack(">BBBB", 0, 0, code, len(dims))
    head += b"".join(struct.pack(">I", d % 2**32) for d in dims)
    return head + np.ascontiguousarray(array).astype(IDX_CODES[code]).tobytes()


@st.composite
def idx_sets(draw):
    n = draw(st.sampled_from([0, 1, 3, 3]))
    shape = draw(st.sampled_from([(2, 2), (4,), (1, 2, 2), (3,)]))
    code = draw(st.sampled_from(sorted(IDX_CODES)))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    images = rng.integers(0, 100, (n, *shape))
    high = draw(st.sampled_from([3, 3, 300]))
    labels = rng.integers(0, high, n + draw(st.sampled_from([0, 0, 1])))
    dims = list(images.shape)
    defects = [None, None, None, "magic", "dims+1", "huge", "negative", "ndim0"]
    header_defect = draw(st.sampled_from(defects))
    magic = None
    if header_defect == "magic":
        magic = draw(st.binary(min_size=4, max_size=4))
    elif header_defect == "dims+1":
        dims[0] += 1
    elif header_defect == "huge":
        dims = [2**32 - 1] * len(dims)
    elif header_defect == "negative":
        dims[-1] = -dims[-1] - 1  # written as a 32-bit two's complement: about 4e9
    elif header_defect == "ndim0":
        magic, dims = struct.pack(">BBBB", 0, 0, code, 0), []
    return {
        "images": idx_bytes(images, code, dims, magic),
        "labels": idx_bytes(labels, 0x08),
        "gz": draw(st.booleans()),
        "folder": draw(st.booleans()),
        "damaged": draw(st.sampled_from(["images", "labels"])),
        "missing_labels": draw(st.sampled_from([False] * 7 + [True])),
        "input_shape": draw(st.sampled_from([None, "4", "4", "4", "2,2", "5", "0,4", "nan"])),
    }


def idx_decode(path: Path):
    """The array an IDX file (gzip-compressed when named .gz) holds, by the format: two zero
    bytes, a type code, the number of dimensions, big-endian 32-bit dimensions, the values;
    or ``("refuses", words)``."""
    try:
        data = gzip.open(path, "rb").read() if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error):
        return "refuses", f"{path.name} cannot be read"
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] not in IDX_CODES:
        return "refuses", f"{path.name} is not an IDX file"
    ndim = data[3]
    if ndim == 0:
        return "refuses", f"{path.name} is an IDX file of zero dimensions"
    if len(data) < 4 + 4 * ndim:
        return "refuses", f"{path.name} is truncated inside its IDX header"
    dims = list(struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim]))
    dtype = np.dtype(IDX_CODES[data[2]])
    if math.prod(dims) * dtype.itemsize != len(data) - 4 - 4 * ndim:
        return "refuses", f"{path.name} is truncated or damaged"
    values = np.frombuffer(data, dtype, offset=4 + 4 * ndim).reshape(dims)
    return values.astype(dtype.newbyteorder("="))


def shape_outcome(option: str | None, per_sample: int):
    """``--input-shape``: comma-separated positive whole numbers whose product is a sample's
    size; the shape, ``None`` (not given) or ``("refuses", words)``."""
    if option is None:
        return None
    try:
        numbers = [float(v) for v in option.split(",") if v.strip()]
    except ValueError:
        return "refuses", "must be comma-separated numbers"
    if not all(math.isfinite(v) for v in numbers):
        return "refuses", "must hold finite numbers"
    if not numbers or not all(v == int(v) and 1 <= v <= 2**31 for v in numbers):
        return "refuses", "must be positive whole numbers"
    shape = [int(v) for v in numbers]
    if math.prod(shape) != per_sample:
        return "refuses", f"has {math.prod(shape)} values but each sample"
    return shape


def idx_outcome(images: Path, labels: Path, folder: bool, input_shape: str | None):
    """What loading the IDX pair (the folder, or the images file) must give, from the files
    as they are on disk."""
    if not labels.exists():
        return "refuses", "has no train-labels" if folder else "cannot find the matching labels"
    x = idx_decode(images)
    if isinstance(x, tuple):
        return x
    y = idx_decode(labels)
    if isinstance(y, tuple):
        return y
    if x.shape[0] == 0:
        return "refuses", "holds no samples"
    if x.shape[0] != y.shape[0]:
        return "refuses", f"{x.shape[0]} inputs but {y.shape[0]} labels"
    with np.errstate(over="ignore"):
        xt = torch.from_numpy(x.astype(np.float32))
    yt = label_tensor(y)
    shape = shape_outcome(input_shape, xt[0].numel())
    if isinstance(shape, tuple):
        return shape
    if shape is not None:
        xt = xt.reshape(len(xt), *shape)
    return fit_outcome(xt, yt, "cross_entropy")


@FUZZ
@given(spec=idx_sets(), how=damage)
def test_idx_loads_or_says_why(workdir, spec, how):
    with Scratch(workdir) as d:
        suffix = ".gz" if spec["gz"] else ""
        files = {
            "images": d / f"train-images-idx3-ubyte{suffix}",
            "labels": d / f"train-labels-idx1-ubyte{suffix}",
        }
        for key, path in files.items():
            data = spec[key]
            path.write_bytes(gzip.compress(data, mtime=0) if spec["gz"] else data)
        apply_damage(files[spec["damaged"]], how)
        if spec["missing_labels"]:
            files["labels"].unlink()
        target = d if spec["folder"] else files["images"]
        names = [d.name] + [p.name for p in files.values()]
        expect = idx_outcome(files["images"], files["labels"], spec["folder"],
                             spec["input_shape"])
        dataset = check_data(target, names, "cross_entropy", expect,
                             input_shape=spec["input_shape"])
        if dataset is not None:
            assert set(dataset.files) == {str(p) for p in files.values()}


# ------------------------------------------------------------------ checkpoints
CKPT_KINDS = ["curvscope", "safetensors", "state_dict", "torchscript", "pickle", "pickle_untrusted"]


def write_checkpoint(d: Path, kind: str, poison) -> tuple[Path, dict]:
    model = tiny_model()
    if poison is not None:
        with torch.no_grad():
            model[0].weight[0, 0] = float(poison)
    meta = {"data": "data.npz", "loss": "cross_entropy"}
    if kind == "curvscope":
        return save_checkpoint(d / "model.pt", model, ARCH, meta), {}
    if kind == "safetensors":
        return save_safetensors(d / "model.safetensors", model, ARCH, meta), {}
    if kind == "state_dict":
        torch.save({"model_state": model.state_dict(), "epoch": 3}, d / "sd.pt")
        return d / "sd.pt", {"model": "tests.test_io:builder"}
    if kind == "torchscript":
        torch.jit.save(torch.jit.script(model), d / "ts.pt")
        return d / "ts.pt", {}
    torch.save(model, d / "whole.pt")
    return d / "whole.pt", {"trust_checkpoint": kind == "pickle"}


@pytest.fixture(scope="module")
def checkpoints(workdir):
    """Each kind written once (TorchScript scripting is slow); examples damage copies."""
    base = workdir / "checkpoints"
    base.mkdir()
    made = {}
    for kind in CKPT_KINDS:
        for poison in (None, "nan", "inf"):
            sub = base / f"{kind}-{poison}"
            sub.mkdir()
            made[kind, poison] = write_checkpoint(sub, kind, poison)
    return made


@FUZZ
@given(
    kind=st.sampled_from(CKPT_KINDS),
    poison=st.sampled_from([None, None, None, "nan", "inf"]),
    how=damage,
    strict=st.booleans(),
)
def test_checkpoint_loads_or_says_why(workdir, checkpoints, kind, poison, how, strict):
    source, options = checkpoints[kind, poison]
    with Scratch(workdir) as d:
        path = d / source.name
        path.write_bytes(source.read_bytes())
        apply_damage(path, how)
        # intact: a pickle not trusted is refused as such, a poisoned checkpoint for its
        # non-finite weights, a clean one loads with exactly its weights; damaged: refused,
        # or loaded (the poisoned ones never as they are)
        untrusted = kind == "pickle_untrusted"
        try:
            loaded = load_checkpoint(path, load_strict=strict, **options)
        except CurvscopeError as exc:
            assert_one_sentence(exc, [path.name])
            if how[0] == "none":
                assert untrusted or poison is not None, str(exc)
                words = "trust_checkpoint" if untrusted else "NaN or Inf"
                assert words in str(exc), str(exc)
            return
        assert not untrusted
        assert loaded.files[str(path)] == loaded.sha256
        event("loaded")
        assert how[0] != "empty"
        assert poison is None or how[0] != "none"  # non-finite weights never load as they are
        if how[0] == "none":
            want = tiny_model().state_dict()
            got = loaded.model.state_dict()
            assert set(got) == set(want)
            assert all(torch.equal(got[k].float(), want[k].float()) for k in want)
        x = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
        dataset = Dataset(x, torch.tensor([0, 1, 2]), "probe.npz", "")
        try:
            check_fits(loaded.model, dataset, "cross_entropy")
        except CurvscopeError as exc:  # a damaged TorchScript body can load and then fail
            assert_one_sentence(exc, ["probe.npz"])


# ------------------------------------------------------------------ token files, Python sources
def tiny_lm():
    from curvscope.models import TinyGPT

    torch.manual_seed(0)
    return TinyGPT(12, 16, 1, 2, 8)


def load_or_says_why(model, data, names, expect, **options):
    """``curvscope.load`` (loading, the determinism check and the checks against the model):
    a problem, or one sentence.

    ``expect``, decided from the generated input: ``("loads", pairs)`` where one pass over
    the problem's batches must give exactly ``pairs`` (inputs, targets) in order, ``("loads
    in any order", pairs)`` where they may come in another order, or ``("refuses", words)``
    where the sentence must hold ``words`` (``None``: any sentence).
    """
    import curvscope as cs

    try:
        problem = cs.load(model, data, **options)
    except CurvscopeError as exc:
        assert_one_sentence(exc, names)
        assert expect[0] == "refuses", (expect[0], str(exc))
        assert expect[1] is None or expect[1] in str(exc), (expect[1], str(exc))
        return None
    assert expect[0] != "refuses", (expect, problem.data_source.source)
    got = [(b.inputs.args[0].cpu(), b.target.cpu()) for b in problem.batches()]
    assert problem.num_samples == sum(len(x) for x, _ in expect[1]) >= 1
    x, y = (torch.cat(t) for t in zip(*got, strict=True))
    want_x, want_y = (torch.cat(t) for t in zip(*expect[1], strict=True))
    if expect[0] == "loads in any order":  # a shuffling loader: the same samples
        def samples(xs, ys):
            return sorted(zip(map(tuple, xs.tolist()), ys.tolist(), strict=True))

        assert x.dtype == want_x.dtype and y.dtype == want_y.dtype
        assert samples(x, y) == samples(want_x, want_y)
    else:
        assert x.dtype == want_x.dtype and torch.equal(x, want_x), (x, want_x)
        assert y.dtype == want_y.dtype and torch.equal(y, want_y), (y, want_y)
    event("loaded")
    return problem


TOKEN_DTYPES = ["uint16", "int32", "int64", "uint8", "float32"]


VOCAB, CONTEXT = 12, 16  # tiny_lm(): 12 token ids, positions for 16 tokens


def token_values(path: Path, declared: str | None):
    """The ids a token file holds, from its bytes (a .bin by the declared dtype, uint16 by
    default; a .npy by numpy's format), or ``("refuses", words)``."""
    if path.suffix == ".bin":
        want = np.dtype(declared or "uint16")
        raw = path.read_bytes()
        if not raw:
            return "refuses", "is empty"
        if len(raw) % want.itemsize:
            return "refuses", f"not a whole number of {want.name} values"
        return np.frombuffer(raw, want)
    try:
        arr = np.load(path, allow_pickle=False)
    except Exception:  # noqa: BLE001 - numpy refuses a damaged header in many ways
        return "refuses", "is not a readable .npy array"
    if not np.issubdtype(arr.dtype, np.integer):
        return "refuses", "not integer token ids"
    if arr.ndim != 1:
        return "refuses", "a token file is one flat sequence"
    if arr.size == 0:
        return "refuses", "is empty"
    return arr


def token_outcome(path: Path, declared: str | None, block: int):
    """What ``curvscope.load`` of the tiny LM on this token file with ``block_size=block``
    and the cross-entropy loss must give: the windows ``t[i:i+T]`` and next tokens
    ``t[i+1:i+T+1]`` at ``i = 0, T, 2T...``, or the refusal."""
    if block == 0:  # no block size: a .bin is still a token file, a .npy no data file
        return "refuses", ("token data need" if path.suffix == ".bin"
                           else "unknown data format")
    if block < 0:
        return "refuses", "must be a positive integer"
    t = token_values(path, declared)
    if isinstance(t, tuple):
        return t
    if len(t) < block + 1:
        return "refuses", f"holds {len(t)} tokens, fewer than the {block + 1}"
    head = t[: 1 << 20]
    if (path.suffix == ".bin" and declared is None and len(head) >= 8 and len(head) % 2 == 0
            and not head[1::2].any() and head[0::2].any()):
        return "refuses", "at every odd position: it looks written as"
    t = t.astype(np.int64)
    if t.min() < 0:
        return "refuses", f"holds negative ids (smallest {t.min()})"
    if t.max() >= VOCAB:
        return "refuses", f"token id {t.max()} in"
    if block > CONTEXT:
        return "refuses", f"the sequences hold {block} tokens"
    starts = range(0, len(t) - block, block)
    w = torch.from_numpy(np.stack([t[s : s + block + 1] for s in starts]))
    return "loads", [(w[:, :-1], w[:, 1:])]


@FUZZ
@given(
    ids=st.one_of(  # ids the tiny LM takes (0..11), or any, negative and past it too
        st.lists(st.integers(0, 11), min_size=0, max_size=80),
        st.lists(st.integers(-3, 20), min_size=0, max_size=80),
    ),
    dtype=st.sampled_from(TOKEN_DTYPES),
    suffix=st.sampled_from([".bin", ".npy"]),
    declared=st.sampled_from([None, "uint16", "int32"]),
    block=st.integers(-1, 40),
    how=damage,
)
def test_token_file_loads_or_says_why(workdir, ids, dtype, suffix, declared, block, how):
    with Scratch(workdir) as d:
        path = d / f"tokens{suffix}"
        arr = np.asarray(ids).astype(dtype)
        if suffix == ".npy":
            np.save(path, arr)
        else:
            path.write_bytes(arr.tobytes())
        apply_damage(path, how)
        options = {"block_size": block, "loss": "cross_entropy"}
        if declared is not None and suffix == ".bin":
            options["token_dtype"] = declared
        expect = token_outcome(path, options.get("token_dtype"), block)
        load_or_says_why(tiny_lm(), str(path), [path.name, "block_size", "token_dtype",
                                                "vocabulary"], expect, **options)


SOURCES = {
    "none": "return None",
    "number": "return 5",
    "text": "return 'batches'",
    "empty": "return []",
    "single": "return [(x,)]",
    "pairs": "return [(x[:n], y[:n]), (x[n:], y[n:])]",
    "mismatched": "return [(x, y[:1])]",
    "dict": "return [{'x': x, 'labels': y}]",
    "generator": "return ((x[i:i + 2], y[i:i + 2]) for i in range(0, len(x), 2))",
    "raises": "raise ValueError('no data today')",
    "nan": "return [(x * float('nan'), y)]",
    "strings": "return [('a', 'b')]",
    "dataset": "return torch.utils.data.TensorDataset(x, y)",
    "loader": "return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), "
    "batch_size=3, shuffle=True)",
    "wrong_width": "return [(x[:, :2], y)]",
    "float_targets": "return [(x, y.float())]",
}


def source_outcome(kind: str, rows: int, cut: int, loss: str):
    """What ``curvscope.load`` of the tiny model on ``SOURCES[kind]`` (``rows`` samples,
    ``n = cut``) with ``loss`` must give, from the source's own rules: what ``make()``
    returns must be a re-iterable of ``(inputs, targets)`` batches (or a torch data set)
    holding samples, whose inputs go through the model (4 features, finite) and whose
    targets fit its 3 outputs under the loss (class indices for cross-entropy; MSE needs 3
    values a sample, which one label per sample never gives)."""
    fixed = {
        "none": "are neither a file, a data set nor an iterable of batches",
        "number": "are neither a file, a data set nor an iterable of batches",
        "text": "are neither a file, a data set nor an iterable of batches",
        "raises": "calling it raised ValueError: no data today",
        "generator": "one-shot iterator",
        "single": "the data gave a tuple of 1 items",
        "strings": "a batch's inputs hold no tensor",
        "empty": "the data set is empty",
    }
    if kind in fixed:
        return "refuses", fixed[kind]
    if rows == 0:  # torch's shuffling sampler refuses an empty data set itself
        return "refuses", ("calling it raised ValueError" if kind == "loader"
                           else "the data set is empty")
    if kind in ("dict", "wrong_width"):  # no argument named x; 2 features for 4
        return "refuses", "do not fit the model's forward"
    if kind == "nan":
        return "refuses", "the inputs of"
    if kind == "mismatched" and rows > 1:
        return "refuses", ("targets of shape (1,) do not fit outputs" if loss == "cross_entropy"
                           else "do not fit the model's output")
    if loss == "mse":
        return "refuses", "do not fit the model's output"
    if kind == "float_targets":
        return "refuses", "needs integer class targets"
    g = torch.Generator().manual_seed(0)  # the source's own draws
    x = torch.randn(rows, 4, generator=g)
    y = torch.randint(0, 3, (rows,), generator=g)
    if kind == "pairs":
        return "loads", [(x[:cut], y[:cut]), (x[cut:], y[cut:])]
    return ("loads in any order" if kind == "loader" else "loads"), [(x, y)]


@FUZZ
@given(
    kind=st.sampled_from(sorted(SOURCES)),
    rows=st.integers(0, 9),
    cut=st.integers(0, 9),
    loss=LOSSES,
)
def test_python_data_source_loads_or_says_why(workdir, kind, rows, cut, loss):
    with Scratch(workdir) as d:
        path = d / "source.py"
        path.write_text(
            "import torch\n"
            "def make():\n"
            "    g = torch.Generator().manual_seed(0)\n"
            f"    x = torch.randn({rows}, 4, generator=g)\n"
            f"    y = torch.randint(0, 3, ({rows},), generator=g)\n"
            f"    n = {cut}\n"
            f"    {SOURCES[kind]}\n"
        )
        load_or_says_why(tiny_model(), f"{path}:make", [path.name, "make", "data"],
                         source_outcome(kind, rows, cut, loss), loss=loss)
