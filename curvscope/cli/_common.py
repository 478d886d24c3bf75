"""Shared command-line plumbing: common flags, loading, progress, errors, result documents.

Every analysis command takes the same input flags (DESIGN.md "Contracts"). Rather than
repeating two dozen ``Annotated`` parameters per command, :func:`common_options` adds them to
a command's signature and hands them over as one :class:`CommonArgs`.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import time
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import torch
import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from .._errors import CurvscopeError, OptionError
from ..io import make_document, versions, write_document
from ..problem import Problem

__all__ = [
    "CommonArgs",
    "block_mode",
    "Session",
    "common_options",
    "console",
    "err_console",
    "finish",
    "guarded",
    "open_session",
    "parse_floats",
    "parse_list",
    "progress_bar",
]

console = Console()
err_console = Console(stderr=True)


@dataclass
class CommonArgs:
    """The shared flags of every analysis command, as given on the command line."""

    model_path: Path
    data: str | None = None
    model: str | None = None
    loss: str | None = None
    reduction: str | None = None
    weight_decay: float = 0.0
    params: str | None = None
    batch_size: int = 512
    samples: int | None = None
    device: str = "cpu"
    dtype: str = "float32"
    seed: int = 0
    out: Path = Path("curvscope-out")
    max_iter: int | None = None
    tol: float = 1e-4
    train_mode: bool = False
    trust_checkpoint: bool = False
    state_key: str | None = None
    strip_prefix: str | None = None
    x_key: str | None = None
    y_key: str | None = None
    label_column: str | None = None
    split: str = "train"
    input_shape: str | None = None
    scale: float | None = None
    normalize: str | None = None

    def settings(self) -> dict[str, Any]:
        """Every shared option with its value, for the result document."""
        out = dict(self.__dict__)
        out["model_path"] = str(self.model_path)
        out["out"] = str(self.out)
        return out


def _opt(*names: str, help: str, **kw: Any) -> Any:
    return typer.Option(*names, help=help, **kw)


# name -> (annotation, default); order is the order of --help.
_COMMON: dict[str, tuple[Any, Any]] = {
    "model_path": (
        Annotated[
            Path,
            typer.Argument(
                help="Checkpoint: curvscope .pt, .safetensors, state dict "
                "(with --model), TorchScript or pickled module.",
                show_default=False,
            ),
        ],
        inspect.Parameter.empty,
    ),
    "data": (
        Annotated[
            str | None,
            _opt(
                "--data",
                help="Data: digits, sinus, blobs2d, a .npz/"
                ".pt/.csv file or an IDX file or folder (default: the data the checkpoint "
                "records).",
                rich_help_panel="Input",
            ),
        ],
        None,
    ),
    "model": (
        Annotated[
            str | None,
            _opt(
                "--model",
                help="MODULE:CALLABLE or path/file.py:"
                "CALLABLE building the module for a plain state dict.",
                rich_help_panel="Input",
            ),
        ],
        None,
    ),
    "loss": (
        Annotated[
            str | None,
            _opt(
                "--loss",
                help="cross_entropy, mse, bce_with_logits, "
                "nll or chen_nonconvex (default: the checkpoint's).",
                rich_help_panel="Input",
            ),
        ],
        None,
    ),
    "reduction": (
        Annotated[
            str | None,
            _opt(
                "--reduction",
                help="mean or sum, as the model "
                "was trained (default: the checkpoint's, else mean).",
                rich_help_panel="Input",
            ),
        ],
        None,
    ),
    "weight_decay": (
        Annotated[
            float,
            _opt("--weight-decay", help="Adds WD/2 ||w||^2 to the loss.", rich_help_panel="Input"),
        ],
        0.0,
    ),
    "params": (
        Annotated[
            str | None,
            _opt(
                "--params",
                help="Glob(s) of parameter names to analyse, e.g. 'fc1.*' (default: all).",
                rich_help_panel="Input",
            ),
        ],
        None,
    ),
    "batch_size": (
        Annotated[int, _opt("--batch-size", help="Samples per batch.", rich_help_panel="Input")],
        512,
    ),
    "samples": (
        Annotated[
            int | None,
            _opt(
                "--samples",
                help="Use a seeded random subset of N samples.",
                rich_help_panel="Input",
            ),
        ],
        None,
    ),
    "device": (
        Annotated[str, _opt("--device", help="cpu, cuda or cuda:N.", rich_help_panel="Numerics")],
        "cpu",
    ),
    "dtype": (
        Annotated[str, _opt("--dtype", help="float32 or float64.", rich_help_panel="Numerics")],
        "float32",
    ),
    "seed": (
        Annotated[
            int,
            _opt(
                "--seed",
                help="Seed for probes, start vectors, subsets.",
                rich_help_panel="Numerics",
            ),
        ],
        0,
    ),
    "out": (
        Annotated[
            Path, _opt("--out", help="Folder for the result document.", rich_help_panel="Output")
        ],
        Path("curvscope-out"),
    ),
    "max_iter": (
        Annotated[
            int | None,
            _opt("--max-iter", help="Iteration limit of the method.", rich_help_panel="Numerics"),
        ],
        None,
    ),
    "tol": (
        Annotated[
            float, _opt("--tol", help="Relative residual tolerance.", rich_help_panel="Numerics")
        ],
        1e-4,
    ),
    "train_mode": (
        Annotated[
            bool,
            _opt(
                "--train-mode",
                help="BatchNorm with batch statistics "
                "(running statistics untouched); default eval mode.",
                rich_help_panel="Input",
            ),
        ],
        False,
    ),
    "trust_checkpoint": (
        Annotated[
            bool,
            _opt(
                "--trust-checkpoint",
                help="Allow loading a pickled nn.Module (runs code from the file).",
                rich_help_panel="Input",
            ),
        ],
        False,
    ),
    "state_key": (
        Annotated[
            str | None,
            _opt(
                "--state-key",
                help="Key of the state dict inside a wrapped checkpoint, e.g. model_state_dict.",
                rich_help_panel="Input",
            ),
        ],
        None,
    ),
    "strip_prefix": (
        Annotated[
            str | None,
            _opt(
                "--strip-prefix",
                help="Prefix to remove from state-dict keys, e.g. 'model.'.",
                rich_help_panel="Input",
            ),
        ],
        None,
    ),
    "x_key": (
        Annotated[
            str | None,
            _opt("--x-key", help="Input array name in a .npz file.", rich_help_panel="Data"),
        ],
        None,
    ),
    "y_key": (
        Annotated[
            str | None,
            _opt("--y-key", help="Label array name in a .npz file.", rich_help_panel="Data"),
        ],
        None,
    ),
    "label_column": (
        Annotated[
            str | None,
            _opt(
                "--label-column",
                help="Label column of a .csv file (name or index).",
                rich_help_panel="Data",
            ),
        ],
        None,
    ),
    "split": (
        Annotated[
            str, _opt("--split", help="train or test, for an IDX folder.", rich_help_panel="Data")
        ],
        "train",
    ),
    "input_shape": (
        Annotated[
            str | None,
            _opt("--input-shape", help="Reshape each input, e.g. 1,28,28.", rich_help_panel="Data"),
        ],
        None,
    ),
    "scale": (
        Annotated[
            float | None,
            _opt("--scale", help="Divide inputs by this, e.g. 255.", rich_help_panel="Data"),
        ],
        None,
    ),
    "normalize": (
        Annotated[
            str | None,
            _opt(
                "--normalize",
                help="MEAN,STD per channel, e.g. 0.1307,0.3081.",
                rich_help_panel="Data",
            ),
        ],
        None,
    ),
}


def common_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """Add the shared flags to a command and pass them as ``common: CommonArgs``.

    The decorated function's own parameters follow the shared ones in ``--help``.
    """
    sig = inspect.signature(func)
    # Resolve the command's own annotations in its module: with postponed evaluation they
    # are strings, and typer would otherwise lose their Annotated option declarations.
    hints = typing.get_type_hints(func, include_extras=True)
    own = [
        p.replace(annotation=hints.get(name, p.annotation))
        for name, p in sig.parameters.items()
        if name != "common"
    ]
    shared = [
        inspect.Parameter(
            name,
            inspect.Parameter.KEYWORD_ONLY,
            annotation=ann,
            default=default if default is not inspect.Parameter.empty else inspect.Parameter.empty,
        )
        for name, (ann, default) in _COMMON.items()
    ]
    # The MODEL argument is positional; everything else is keyword-only.
    shared[0] = shared[0].replace(kind=inspect.Parameter.POSITIONAL_OR_KEYWORD)
    own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own]

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if args:
            kwargs["model_path"] = args[0]
        common = CommonArgs(**{k: kwargs.pop(k) for k in list(kwargs) if k in _COMMON})
        return func(common=common, **kwargs)

    params = [shared[0], *shared[1:], *own]
    wrapper.__signature__ = sig.replace(parameters=params, return_annotation=None)
    wrapper.__annotations__ = {p.name: p.annotation for p in params}
    return wrapper


# ---------------------------------------------------------------------- parsing helpers
def parse_list(value: str | None, flag: str, valid: list[str] | None = None) -> list[str]:
    """Split a comma-separated flag value; check items against ``valid`` if given.

    Raises:
        OptionError: naming the flag and listing the valid values.
    """
    items = [v.strip() for v in (value or "").split(",") if v.strip()]
    if valid is not None:
        bad = [v for v in items if v not in valid]
        if bad:
            raise OptionError(
                f"{flag} {','.join(bad)!r} is not known; choose from {', '.join(valid)}."
            )
    return items


def block_mode(per_layer: bool, per_param: bool) -> str:
    """``"per-layer"``, ``"per-param"`` or ``"all"`` from the two flags.

    Raises:
        OptionError: when both flags are given.
    """
    if per_layer and per_param:
        raise OptionError("--per-layer and --per-param exclude each other; pick one.")
    return "per-layer" if per_layer else "per-param" if per_param else "all"


def parse_floats(value: str | None, flag: str) -> list[float] | None:
    """Parse ``"0.1,0.2"`` into floats, naming ``flag`` in the error.

    Raises:
        OptionError: when an item is not a number.
    """
    if value is None:
        return None
    try:
        return [float(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise OptionError(f"{flag} {value!r} must be comma-separated numbers.") from None


def parse_dtype(value: str) -> torch.dtype:
    """``float32`` or ``float64``.

    Raises:
        OptionError: for any other value.
    """
    table = {"float32": torch.float32, "float64": torch.float64}
    if value not in table:
        raise OptionError(f"--dtype {value!r} is not supported; choose float32 or float64.")
    return table[value]


def parse_device(value: str) -> torch.device:
    """A device that exists on this machine.

    Raises:
        OptionError: for an unknown device or CUDA without a CUDA device.
    """
    try:
        dev = torch.device(value)
    except RuntimeError:
        raise OptionError(f"--device {value!r} is not a device; use cpu, cuda or cuda:N.") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise OptionError(
                f"--device {value} was asked for, but this machine has no CUDA device "
                "(torch.cuda.is_available() is False); use --device cpu."
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise OptionError(
                f"--device {value}: only {torch.cuda.device_count()} CUDA device(s) exist."
            )
    elif dev.type != "cpu":
        raise OptionError(f"--device {value!r} is not supported; use cpu, cuda or cuda:N.")
    return dev


# ---------------------------------------------------------------------- session
@dataclass
class Session:
    """Everything a command needs after loading: the problem and what to record about it."""

    problem: Problem
    input_info: dict[str, Any]
    notes: list[str]
    seed: int
    generator: torch.Generator
    loaded: Any
    dataset: Any
    common: CommonArgs
    started: float = field(default_factory=time.perf_counter)


def open_session(common: CommonArgs, *, progress: bool = True) -> Session:
    """Load checkpoint and data, check they fit, and build the :class:`Problem`.

    Raises:
        CurvscopeError: for every user mistake, with one sentence naming the file or flag.
    """
    from ..io import check_fits, load_checkpoint, load_dataset

    dtype = parse_dtype(common.dtype)
    device = parse_device(common.device)
    if common.batch_size < 1:
        raise OptionError(f"--batch-size must be at least 1, got {common.batch_size}.")
    if common.tol <= 0:
        raise OptionError(f"--tol must be positive, got {common.tol}.")
    if common.max_iter is not None and common.max_iter < 1:
        raise OptionError(f"--max-iter must be at least 1, got {common.max_iter}.")
    loaded = load_checkpoint(
        common.model_path,
        model=common.model,
        trust_checkpoint=common.trust_checkpoint,
        state_key=common.state_key,
        strip_prefix=common.strip_prefix,
    )
    meta = dict(loaded.meta or {})
    data_spec = common.data or meta.get("data")
    if not data_spec:
        raise OptionError(
            f"{common.model_path} does not record its data; pass --data (digits, a .npz file...)."
        )
    # A path recorded in the checkpoint is relative to the checkpoint's folder; a --data path
    # is relative to the working directory.
    base_dir = None if common.data else Path(common.model_path).resolve().parent
    dataset = load_dataset(
        data_spec,
        base_dir=base_dir,
        x_key=common.x_key,
        y_key=common.y_key,
        label_column=common.label_column,
        split=common.split,
        input_shape=common.input_shape or _meta_shape(meta),
        scale=common.scale,
        normalize=common.normalize or _meta_normalize(meta),
    )
    if common.samples is not None:
        dataset = dataset.subset(common.samples, common.seed)
    loss = common.loss or meta.get("loss")
    if not loss:
        raise OptionError(
            f"{common.model_path} does not record its loss; pass --loss (cross_entropy, mse, ...)."
        )
    reduction = common.reduction or meta.get("reduction") or "mean"
    model = loaded.model
    check_fits(model, dataset, loss)
    model = model.to(device=device, dtype=dtype)
    problem = Problem(
        model,
        loss,
        dataset.batches(common.batch_size),
        reduction=reduction,
        params=common.params,
        weight_decay=common.weight_decay,
        train_mode=common.train_mode,
    )
    problem.check_finite()
    notes = list(loaded.notes)
    if common.train_mode:
        notes.append(
            "train mode: BatchNorm used batch statistics of each batch (running statistics "
            "untouched); dropout off."
        )
    input_info = {
        "model": {
            "path": str(common.model_path),
            "sha256": loaded.sha256,
            "format": loaded.format,
            "num_params": sum(p.numel() for p in model.parameters()),
            "params_selected": problem.num_params,
            "param_names": list(problem.names),
        },
        "data": {
            "source": dataset.source,
            "sha256": dataset.sha256,
            "num_samples": problem.num_samples,
            "batch_size": common.batch_size,
            "subset_seed": common.seed if common.samples is not None else None,
        },
        "loss": loss,
        "reduction": reduction,
        "weight_decay": common.weight_decay,
        "dtype": common.dtype,
        "device": str(device),
        "seed": common.seed,
        "train_mode": common.train_mode,
        "versions": versions(),
    }
    return Session(
        problem=problem,
        input_info=input_info,
        notes=notes,
        seed=common.seed,
        generator=torch.Generator().manual_seed(common.seed),
        loaded=loaded,
        dataset=dataset,
        common=common,
    )


def _meta_shape(meta: dict) -> str | None:
    shape = meta.get("input_shape")
    if shape is None:
        return None
    return ",".join(str(int(s)) for s in shape)


def _meta_normalize(meta: dict) -> str | None:
    norm = meta.get("normalize")
    if not norm:
        return None
    if isinstance(norm, str):
        return norm
    mean, std = norm
    mean = mean if isinstance(mean, (list, tuple)) else [mean]
    std = std if isinstance(std, (list, tuple)) else [std]
    return ",".join(str(v) for v in [*mean, *std])


def finish(
    session: Session,
    command: str,
    *,
    settings: dict[str, Any],
    results: dict[str, Any],
    timings: dict[str, float] | None = None,
    counts: dict[str, int] | None = None,
    notes: list[str] | None = None,
) -> Path:
    """Write ``out/<command>.json`` (atomically) and return its path."""
    timings = dict(timings or {})
    timings.setdefault("total_s", time.perf_counter() - session.started)
    counts = dict(counts or {})
    counts.setdefault("data_passes", session.problem.data_passes)
    counts.setdefault("matvecs", 0)
    all_settings = {**session.common.settings(), **settings}
    doc = make_document(
        command,
        input=session.input_info,
        settings=all_settings,
        results=results,
        timings=timings,
        counts=counts,
        notes=[*session.notes, *(notes or [])],
    )
    return write_document(doc, session.common.out)


FLAG_NAMES = {
    "model_path": "MODEL",
    "matrices": "--matrix",
    "range_": "--range",
    "num_probes": "--probes",
    "num_steps": "--lanczos-steps",
    "hutchinson_probes": "--probes",
}
"""Library argument names whose command-line flag is not ``--`` plus the dashed name."""


def flag_name(name: str) -> str:
    """The command-line flag for library argument ``name`` (``max_iter`` -> ``--max-iter``)."""
    return FLAG_NAMES.get(name, "--" + name.replace("_", "-"))


@contextlib.contextmanager
def guarded() -> Iterator[None]:
    """Turn a :class:`CurvscopeError` into one red sentence and exit code 1.

    Ctrl-C exits with 130 after saying so.
    """
    try:
        yield
    except CurvscopeError as exc:
        from rich.markup import escape

        err_console.print(f"[bold red]error:[/] {escape(exc.render(flag_name))}", highlight=False)
        raise typer.Exit(code=1) from None
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted[/]")
        raise typer.Exit(code=130) from None


@contextlib.contextmanager
def progress_bar(enabled: bool = True) -> Iterator[Callable[[int, int, str], None]]:
    """A rich progress bar; yields ``update(completed, total, description)``.

    Each new description starts a new task line.
    """
    if not enabled:
        yield lambda *_: None
        return
    prog = Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err_console,
        transient=True,
    )
    tasks: dict[str, int] = {}

    def update(completed: int, total: int, description: str) -> None:
        if description not in tasks:
            tasks[description] = prog.add_task(description, total=total)
        prog.update(tasks[description], completed=completed, total=total)

    with prog:
        yield update
