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

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from .._errors import CurvscopeError, OptionError
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
    "load_kwargs",
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
    block_size: int | None = None
    load_strict: bool = True
    forward_kwargs: str | None = None
    output: str | None = None
    group: str | None = None
    ignore_index: int = -100
    hvp: str = "auto"

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
                help="Data: digits, sinus, blobs2d, a .npz/.pt/.csv file, an IDX file or "
                "folder, a token file (.bin/.npy with --block-size), or FILE.py:FN returning a "
                "Dataset, DataLoader or batches (default: the data the checkpoint records).",
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
                help="cross_entropy (also over [B,T,V] logits), causal_lm, mse, "
                "bce_with_logits, nll, chen_nonconvex, FILE.py:FN (your function of (output, "
                "target)) or model (the model's own loss) (default: the checkpoint's).",
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


_COMMON.update(
    {
        "block_size": (
            Annotated[
                int | None,
                _opt(
                    "--block-size",
                    help="Window length T of a token file (windows t[i:i+T] -> t[i+1:i+T+1]).",
                    rich_help_panel="Data",
                ),
            ],
            None,
        ),
        "load_strict": (
            Annotated[
                bool,
                _opt(
                    "--load-strict/--no-load-strict",
                    help="Refuse state-dict entries that are not parameters or buffers "
                    "(--no-load-strict ignores them; missing parameters are always refused).",
                    rich_help_panel="Input",
                ),
            ],
            True,
        ),
        "forward_kwargs": (
            Annotated[
                str | None,
                _opt(
                    "--forward-kwargs",
                    help="Fixed extra arguments of the model's forward, e.g. sr=16000.",
                    rich_help_panel="Input",
                ),
            ],
            None,
        ),
        "output": (
            Annotated[
                str | None,
                _opt(
                    "--output",
                    help="INDEX or KEY of the output the loss takes when the model returns a "
                    "tuple or dict (default: the tensor, or 'logits').",
                    rich_help_panel="Input",
                ),
            ],
            None,
        ),
        "group": (
            Annotated[
                str | None,
                _opt(
                    "--group",
                    help="Parameter groups as blocks: 'NAME=GLOB|GLOB;NAME=GLOB', e.g. "
                    "'attention=*.attn.*;mlp=*.mlp.*'.",
                    rich_help_panel="Input",
                ),
            ],
            None,
        ),
        "ignore_index": (
            Annotated[
                int,
                _opt(
                    "--ignore-index",
                    help="Target value that is no loss term (padding).",
                    rich_help_panel="Input",
                ),
            ],
            -100,
        ),
        "hvp": (
            Annotated[
                str,
                _opt(
                    "--hvp",
                    help="Hessian products: auto (double backward, finite differences where "
                    "an operation has no second derivative), double-backward, "
                    "forward-over-reverse or finite-difference (use float64).",
                    rich_help_panel="Numerics",
                ),
            ],
            "auto",
        ),
    }
)


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


def block_mode(per_layer: bool, per_param: bool, group: str | None = None) -> str:
    """``"per-layer"``, ``"per-param"``, ``"per-group"`` (with ``--group``) or ``"all"``.

    Raises:
        OptionError: when more than one is asked for.
    """
    asked = [m for m, on in (("per-layer", per_layer), ("per-param", per_param),
                             ("per-group", bool(group))) if on]
    if len(asked) > 1:
        raise OptionError(
            f"{', '.join('--' + a if a != 'per-group' else '--group' for a in asked)} exclude "
            "each other; pick one."
        )
    return asked[0] if asked else "all"


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


# ---------------------------------------------------------------------- session
@dataclass
class Session:
    """Everything a command needs after loading: the problem and what to record about it."""

    problem: Problem
    common: CommonArgs
    started: float = field(default_factory=time.perf_counter)
    passes_before: int = 0

    @property
    def input_info(self) -> dict[str, Any]:
        """The result document's ``input`` section."""
        return self.problem.input_info

    @property
    def notes(self) -> list[str]:
        """Sentences about the input (checkpoint notes, train mode...)."""
        return self.problem.notes

    @property
    def seed(self) -> int:
        """The run's seed."""
        return self.common.seed


def parse_kwargs(value: str | None, flag: str) -> dict[str, Any]:
    """``K=V,K=V`` with numbers, booleans and ``None`` read as such.

    Raises:
        OptionError: for an item without ``=``.
    """
    out: dict[str, Any] = {}
    for item in (value or "").split(","):
        if not item.strip():
            continue
        if "=" not in item:
            raise OptionError(f"{flag} {item!r} must be KEY=VALUE (e.g. sr=16000).")
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


def parse_groups(value: str | None) -> dict[str, list[str]]:
    """``NAME=GLOB|GLOB;NAME=GLOB`` into named parameter groups.

    Raises:
        OptionError: for an item without ``=``.
    """
    out: dict[str, list[str]] = {}
    for item in (value or "").split(";"):
        if not item.strip():
            continue
        if "=" not in item:
            raise OptionError(
                f"--group {item!r} must be NAME=GLOB (several globs joined by |), e.g. "
                "'attention=*.attn.*'."
            )
        name, _, globs = item.partition("=")
        out[name.strip()] = [g.strip() for g in globs.split("|") if g.strip()]
    return out


def load_kwargs(common: CommonArgs) -> dict[str, Any]:
    """What :func:`curvscope.load` takes besides the model and the data, from the shared flags.

    For commands that load several checkpoints (``track``); :func:`open_session` passes the
    same arguments for one.

    Raises:
        OptionError: for a malformed ``--forward-kwargs`` or ``--group``.
    """
    options = {
        k: v
        for k, v in {
            "x_key": common.x_key,
            "y_key": common.y_key,
            "label_column": common.label_column,
            "split": common.split,
            "input_shape": common.input_shape,
            "scale": common.scale,
            "normalize": common.normalize,
            "block_size": common.block_size,
        }.items()
        if v is not None
    }
    return {
        "loss": common.loss,
        "reduction": common.reduction,
        "params": common.params,
        "weight_decay": common.weight_decay,
        "batch_size": common.batch_size,
        "samples": common.samples,
        "seed": common.seed,
        "device": common.device,
        "dtype": common.dtype,
        "train_mode": common.train_mode,
        "builder": common.model,
        "trust_checkpoint": common.trust_checkpoint,
        "state_key": common.state_key,
        "strip_prefix": common.strip_prefix,
        "load_strict": common.load_strict,
        "forward_kwargs": parse_kwargs(common.forward_kwargs, "--forward-kwargs"),
        "output": common.output,
        "groups": parse_groups(common.group),
        "ignore_index": common.ignore_index,
        **options,
    }


def open_session(common: CommonArgs) -> Session:
    """Load checkpoint and data through :func:`curvscope.load` and start the clock.

    Raises:
        CurvscopeError: for every user mistake, with one sentence naming the file or flag.
    """
    from .._load import load

    if common.tol <= 0:
        raise OptionError(f"--tol must be positive, got {common.tol}.")
    if common.max_iter is not None and common.max_iter < 1:
        raise OptionError(f"--max-iter must be at least 1, got {common.max_iter}.")
    started = time.perf_counter()
    options = {
        k: v
        for k, v in {
            "x_key": common.x_key,
            "y_key": common.y_key,
            "label_column": common.label_column,
            "split": common.split,
            "input_shape": common.input_shape,
            "scale": common.scale,
            "normalize": common.normalize,
            "block_size": common.block_size,
        }.items()
        if v is not None
    }
    problem = load(
        common.model_path,
        common.data,
        loss=common.loss,
        reduction=common.reduction,
        params=common.params,
        weight_decay=common.weight_decay,
        batch_size=common.batch_size,
        samples=common.samples,
        seed=common.seed,
        device=common.device,
        dtype=common.dtype,
        train_mode=common.train_mode,
        builder=common.model,
        trust_checkpoint=common.trust_checkpoint,
        state_key=common.state_key,
        strip_prefix=common.strip_prefix,
        load_strict=common.load_strict,
        forward_kwargs=parse_kwargs(common.forward_kwargs, "--forward-kwargs"),
        output=common.output,
        groups=parse_groups(common.group),
        ignore_index=common.ignore_index,
        **options,
    )
    return Session(problem, common, started, problem.data_passes)


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
    from ..app import document, save_document

    extra = {k: v for k, v in (timings or {}).items() if k != "total_s"}
    doc = document(
        session.problem,
        command,
        settings={**session.common.settings(), **settings},
        results=results,
        started=session.started,
        passes_before=session.passes_before,
        matvecs=int((counts or {}).get("matvecs", 0)),
        notes=notes,
        timings=extra,
        counts={k: v for k, v in (counts or {}).items() if k != "matvecs"},
    )
    return save_document(doc, session.common.out)


FLAG_NAMES = {
    "model_path": "MODEL",
    "model": "MODEL",
    "builder": "--model",
    "matrices": "--matrix",
    "ops": "--matrix",
    "range_": "--range",
    "num_probes": "--probes",
    "num_steps": "--lanczos-steps",
    "hutchinson_probes": "--probes",
    "from_dir": "--from",
    "blocks": "--per-layer/--per-param/--group",
    "token_dtype": "--token-dtype",
    "max_matvecs": "--max-matvecs (or --max-iter)",
    "checkpoints": "CKPT",
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
