"""The shared options of every analysis command, declared once.

One table of names, flags, types, defaults and help. From it the command line builds its typer
options (:mod:`curvscope.cli`), :func:`curvscope.load` takes the options marked ``load`` as
keyword arguments of the same names (``model=`` is the builder of a state dict, as
``--model`` is), and a result document's ``settings`` records every one of them. A flag
cannot be accepted by one command and ignored by another, nor spelled differently in Python.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ._errors import OptionError, arg

__all__ = [
    "LOAD_OPTIONS",
    "OPTIONS",
    "Option",
    "flag_of",
    "parse_basis_device",
    "parse_groups",
    "parse_hvp_cache",
    "parse_kwargs",
    "parse_memory",
]


@dataclass(frozen=True)
class Option:
    """One shared option.

    Attributes:
        name: the Python name: the keyword of :func:`curvscope.load` (when ``load``) and
            the key in a document's ``settings``.
        flag: the command-line flag (``--x/--no-x`` for booleans that default to true).
        type: ``"str"``, ``"int"``, ``"float"``, ``"bool"`` or ``"Path"``.
        default: the default value.
        help: the ``--help`` text.
        panel: the ``--help`` panel it is listed in.
        optional: ``None`` is a value (the default means "not given").
        load: :func:`curvscope.load` takes it.
    """

    name: str
    flag: str
    type: str
    default: Any
    help: str
    panel: str
    optional: bool = False
    load: bool = False


OPTIONS: tuple[Option, ...] = (
    Option(
        "data",
        "--data",
        "str",
        None,
        (
            "Data: digits, sinus, blobs2d, a .npz/.pt/.csv file, an IDX file or folder, a "
            "token file (.bin/.npy with --block-size), or FILE.py:FN returning a Dataset, "
            "DataLoader or batches (default: the data the checkpoint records)."
        ),
        "Input",
        optional=True,
        load=True,
    ),
    Option(
        "model",
        "--model",
        "str",
        None,
        "MODULE:CALLABLE or path/file.py:CALLABLE building the module for a plain state dict.",
        "Input",
        optional=True,
        load=True,
    ),
    Option(
        "loss",
        "--loss",
        "str",
        None,
        (
            "cross_entropy (also over [B,T,V] logits), causal_lm, mse, bce_with_logits, "
            "nll, chen_nonconvex, FILE.py:FN (your function of (output, target)) or model "
            "(the model's own loss) (default: the checkpoint's)."
        ),
        "Input",
        optional=True,
        load=True,
    ),
    Option(
        "reduction",
        "--reduction",
        "str",
        None,
        "mean or sum, as the model was trained (default: the checkpoint's, else mean).",
        "Input",
        optional=True,
        load=True,
    ),
    Option(
        "weight_decay",
        "--weight-decay",
        "float",
        0.0,
        "Adds WD/2 ||w||^2 to the loss.",
        "Input",
        optional=False,
        load=True,
    ),
    Option(
        "params",
        "--params",
        "str",
        None,
        "Glob(s) of parameter names to analyse, e.g. 'fc1.*' (default: all).",
        "Input",
        optional=True,
        load=True,
    ),
    Option(
        "batch_size",
        "--batch-size",
        "int",
        512,
        "Samples per batch.",
        "Input",
        optional=False,
        load=True,
    ),
    Option(
        "samples",
        "--samples",
        "int",
        None,
        "Use a seeded random subset of N samples.",
        "Input",
        optional=True,
        load=True,
    ),
    Option(
        "device",
        "--device",
        "str",
        "cpu",
        "cpu, cuda or cuda:N.",
        "Numerics",
        optional=False,
        load=True,
    ),
    Option(
        "dtype",
        "--dtype",
        "str",
        "float32",
        "float32, float64 or bfloat16 (the model in bfloat16, vectors and the final check "
        "in float32).",
        "Numerics",
        optional=False,
        load=True,
    ),
    Option(
        "seed",
        "--seed",
        "int",
        0,
        "Seed for probes, start vectors, subsets.",
        "Numerics",
        optional=False,
        load=True,
    ),
    Option(
        "out",
        "--out",
        "Path",
        "curvscope-out",
        "Folder for the result document.",
        "Output",
        optional=False,
        load=False,
    ),
    Option(
        "overwrite",
        "--overwrite",
        "bool",
        False,
        (
            "Write into an --out folder that another run left interrupted (another command or "
            "model): its documents are removed first, and track starts afresh instead of "
            "resuming."
        ),
        "Output",
    ),
    Option(
        "max_iter",
        "--max-iter",
        "int",
        None,
        "Iteration limit of the method.",
        "Numerics",
        optional=True,
        load=False,
    ),
    Option(
        "tol",
        "--tol",
        "float",
        0.0001,
        "Relative residual tolerance.",
        "Numerics",
        optional=False,
        load=False,
    ),
    Option(
        "train_mode",
        "--train-mode",
        "bool",
        False,
        "BatchNorm with batch statistics (running statistics untouched); default eval mode.",
        "Input",
        optional=False,
        load=True,
    ),
    Option(
        "shard",
        "--shard",
        "bool",
        False,
        (
            "Sharded mode (under torchrun, or one process): parameters, gradients and every "
            "Lanczos vector as FSDP2 shards, about 1/N of the memory per process; Hessian "
            "only, products by finite differences of sharded gradients (spectrum only)."
        ),
        "Input",
        optional=False,
        load=True,
    ),
    Option(
        "trust_checkpoint",
        "--trust-checkpoint",
        "bool",
        False,
        "Allow loading a pickled nn.Module (runs code from the file).",
        "Input",
        optional=False,
        load=True,
    ),
    Option(
        "state_key",
        "--state-key",
        "str",
        None,
        "Key of the state dict inside a wrapped checkpoint, e.g. model_state_dict.",
        "Input",
        optional=True,
        load=True,
    ),
    Option(
        "strip_prefix",
        "--strip-prefix",
        "str",
        None,
        "Prefix to remove from state-dict keys, e.g. 'model.'.",
        "Input",
        optional=True,
        load=True,
    ),
    Option(
        "x_key",
        "--x-key",
        "str",
        None,
        "Input array name in a .npz file.",
        "Data",
        optional=True,
        load=True,
    ),
    Option(
        "y_key",
        "--y-key",
        "str",
        None,
        "Label array name in a .npz file.",
        "Data",
        optional=True,
        load=True,
    ),
    Option(
        "label_column",
        "--label-column",
        "str",
        None,
        "Label column of a .csv file (name or index).",
        "Data",
        optional=True,
        load=True,
    ),
    Option(
        "split",
        "--split",
        "str",
        "train",
        "train or test, for an IDX folder.",
        "Data",
        optional=False,
        load=True,
    ),
    Option(
        "input_shape",
        "--input-shape",
        "str",
        None,
        "Reshape each input, e.g. 1,28,28.",
        "Data",
        optional=True,
        load=True,
    ),
    Option(
        "scale",
        "--scale",
        "float",
        None,
        "Divide inputs by this, e.g. 255.",
        "Data",
        optional=True,
        load=True,
    ),
    Option(
        "normalize",
        "--normalize",
        "str",
        None,
        "MEAN,STD per channel, e.g. 0.1307,0.3081.",
        "Data",
        optional=True,
        load=True,
    ),
    Option(
        "block_size",
        "--block-size",
        "int",
        None,
        (
            "Window length T of a token file: inputs t\\[i:i+T], next-token targets "
            "t\\[i+1:i+T+1] (the targets are shifted once, whatever --loss)."
        ),
        "Data",
        optional=True,
        load=True,
    ),
    Option(
        "token_dtype",
        "--token-dtype",
        "str",
        None,
        (
            "How a token file stores its ids: uint16, int32, uint32 or int64 (default: the "
            ".npy header; uint16 for .bin)."
        ),
        "Data",
        optional=True,
        load=True,
    ),
    Option(
        "load_strict",
        "--load-strict/--no-load-strict",
        "bool",
        True,
        (
            "Refuse state-dict entries that are not parameters or buffers (--no-load-strict"
            " ignores them; missing parameters are always refused)."
        ),
        "Input",
        optional=False,
        load=True,
    ),
    Option(
        "forward_kwargs",
        "--forward-kwargs",
        "str",
        None,
        "Fixed extra arguments of the model's forward, e.g. sr=16000.",
        "Input",
        optional=True,
        load=True,
    ),
    Option(
        "output",
        "--output",
        "str",
        None,
        (
            "INDEX or KEY of the output the loss takes when the model returns a tuple or "
            "dict (default: the tensor, or 'logits')."
        ),
        "Input",
        optional=True,
        load=True,
    ),
    Option(
        "group",
        "--group",
        "str",
        None,
        (
            "Parameter groups as blocks: 'NAME=GLOB|GLOB;NAME=GLOB', e.g. "
            "'attention=*.attn.*;mlp=*.mlp.*'."
        ),
        "Input",
        optional=True,
        load=True,
    ),
    Option(
        "ignore_index",
        "--ignore-index",
        "int",
        -100,
        "Target value that is no loss term (padding).",
        "Input",
        optional=False,
        load=True,
    ),
    Option(
        "hvp",
        "--hvp",
        "str",
        "auto",
        (
            "Hessian products: auto (double backward, finite differences where an operation"
            " has no second derivative), double-backward, forward-over-reverse or "
            "finite-difference (use float64)."
        ),
        "Numerics",
        optional=False,
        load=False,
    ),
    Option(
        "hvp_cache",
        "--hvp-cache",
        "str",
        "auto",
        (
            "Memory Hessian products may keep of each batch's first-order graph, so that "
            "later products run only the second backward (a third less time): auto (half of"
            " what --max-memory leaves), off, or a size (e.g. 4GB)."
        ),
        "Numerics",
        optional=False,
        load=True,
    ),
    Option(
        "compile",
        "--compile",
        "bool",
        False,
        (
            "torch.compile the forward and loss of first-order passes (losses, gradients: "
            "the solvers, finite-difference products); Hessian double backward and GGN "
            "products stay eager (torch.compile has no double backward). Compile seconds "
            "come first."
        ),
        "Numerics",
        optional=False,
        load=True,
    ),
    Option(
        "max_memory",
        "--max-memory",
        "str",
        None,
        (
            "Refuse a run whose estimated peak memory is larger (e.g. 8GB; default: what "
            "the device has free)."
        ),
        "Numerics",
        optional=True,
        load=False,
    ),
    Option(
        "basis_device",
        "--basis-device",
        "str",
        None,
        (
            "Where the Lanczos basis lives: cpu keeps it in host memory when the device is "
            "short; disk:DIR in a memory-mapped scratch file in DIR, removed at the end "
            "(default: the --device; the memory plan moves it to cpu or shrinks it to fit "
            "--max-memory)."
        ),
        "Numerics",
        optional=True,
        load=False,
    ),
    Option(
        "threads",
        "--threads",
        "int",
        None,
        (
            "CPU threads torch uses (default: the CPUs this process may use, or 1 when a "
            "probe finds other jobs on them; OMP_NUM_THREADS is honoured; README: "
            "Performance)."
        ),
        "Numerics",
        optional=True,
        load=False,
    ),
)
"""Every shared option, in the order of ``--help``."""

LOAD_OPTIONS: tuple[str, ...] = tuple(o.name for o in OPTIONS if o.load)
"""The keyword arguments of :func:`curvscope.load` that are shared options."""


def flag_of(name: str) -> str | None:
    """The command-line flag of option ``name`` (``None`` for a name that is no option)."""
    for o in OPTIONS:
        if o.name == name:
            return o.flag.split("/")[0]
    return None


# ---------------------------------------------------------------- flag strings
def parse_kwargs(
    value: str | Mapping[str, Any] | None, flag: str = "forward_kwargs"
) -> dict[str, Any]:
    """``K=V,K=V`` with numbers, booleans and ``None`` read as such.

    Raises:
        OptionError: for an item without ``=``.
    """
    if isinstance(value, Mapping):
        return dict(value)
    out: dict[str, Any] = {}
    for item in (value or "").split(","):
        if not item.strip():
            continue
        if "=" not in item:
            raise OptionError(f"{arg(flag)} {item!r} must be KEY=VALUE (e.g. sr=16000).")
        k, _, v = item.partition("=")
        v = v.strip()
        low = v.lower()
        if low in ("true", "false"):
            val: Any = low == "true"
        elif low == "none":
            val = None
        else:
            try:
                val = int(v)
            except ValueError:
                try:
                    val = float(v)
                except ValueError:
                    val = v
        out[k.strip()] = val
    return out


def parse_groups(value: str | Mapping[str, Any] | None) -> dict[str, list[str]]:
    """``NAME=GLOB|GLOB;NAME=GLOB`` into named parameter groups.

    Raises:
        OptionError: for an item without ``=``.
    """
    if isinstance(value, Mapping):
        return {str(k): [v] if isinstance(v, str) else list(v) for k, v in value.items()}
    out: dict[str, list[str]] = {}
    for item in (value or "").split(";"):
        if not item.strip():
            continue
        if "=" not in item:
            raise OptionError(
                f"{arg('group')} {item!r} must be NAME=GLOB (several globs joined by |), e.g. "
                "'attention=*.attn.*'."
            )
        name, _, globs = item.partition("=")
        out[name.strip()] = [g.strip() for g in globs.split("|") if g.strip()]
    return out


# ---------------------------------------------------------------------- before the work
def parse_memory(value: str | float | int | None) -> float | None:
    """``"8GB"``, ``"512MiB"``, ``"2e9"`` -> bytes; ``None`` stays ``None``.

    Raises:
        OptionError: for text that is not an amount of memory.
    """
    if value is None or isinstance(value, (int, float)):
        return None if value is None else float(value)
    text = str(value).strip().replace(" ", "")
    units = {
        "": 1,
        "b": 1,
        "k": 1e3,
        "kb": 1e3,
        "kib": 2**10,
        "m": 1e6,
        "mb": 1e6,
        "mib": 2**20,
        "g": 1e9,
        "gb": 1e9,
        "gib": 2**30,
        "t": 1e12,
        "tb": 1e12,
        "tib": 2**40,
    }
    number = text.rstrip("kKmMgGtTiIbB")
    unit = text[len(number) :].lower()
    try:
        amount = float(number) * units[unit]
    except (KeyError, ValueError):
        amount = math.nan
    if not amount > 0:
        raise OptionError(
            f"{arg('max_memory')} {value!r} is not an amount of memory (e.g. 8GB, 512MiB)."
        )
    return amount


def parse_hvp_cache(value: str | float | None) -> float | None:
    """``--hvp-cache``: ``auto`` -> ``None`` (sized by the memory plan), ``off`` -> 0, a size.

    Raises:
        OptionError: for text that is neither auto, off nor an amount of memory.
    """
    if value is None or isinstance(value, (int, float)):
        return None if value is None else float(value)
    text = str(value).strip().lower()
    if text == "auto":
        return None
    if text in ("off", "0", "none"):
        return 0.0
    try:
        return parse_memory(text)
    except OptionError:
        raise OptionError(
            f"{arg('hvp_cache')} {value!r} is not auto, off or an amount of memory (e.g. 4GB).",
            option="hvp_cache",
        ) from None


def parse_basis_device(value: str | None) -> tuple[str | None, str | None]:
    """``--basis-device``: ``(device, None)`` for a torch device, ``("cpu", DIR)`` for ``disk:DIR``.

    ``None`` stays ``(None, None)`` (the parameters' device). A disk basis computes on the
    CPU: its vectors are read from the mapped file there.

    Raises:
        OptionError: for text that is no device, or a ``disk:`` folder that does not exist
            or cannot be written, in one sentence naming the flag.
    """
    if value is None:
        return None, None
    text = str(value).strip()
    if text.lower().startswith("disk:"):
        import os

        folder = text[5:]
        if not folder:
            raise OptionError(
                f"{arg('basis_device')} disk: needs a folder (e.g. disk:/scratch/me).",
                option="basis_device",
            )
        if not os.path.isdir(folder):
            raise OptionError(
                f"{arg('basis_device')} {text!r}: {folder} is not an existing folder.",
                option="basis_device",
            )
        if not os.access(folder, os.W_OK | os.X_OK):
            raise OptionError(
                f"{arg('basis_device')} {text!r}: {folder} cannot be written.",
                option="basis_device",
            )
        return "cpu", folder
    import torch

    try:
        torch.device(text)
    except (RuntimeError, ValueError):
        raise OptionError(
            f"{arg('basis_device')} {text!r} is neither a device (cpu, cuda, cuda:N) nor "
            "disk:DIR.",
            option="basis_device",
        ) from None
    return text, None
