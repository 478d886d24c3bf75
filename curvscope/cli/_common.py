"""Shared command-line plumbing: common flags, loading, progress, errors, result documents.

Every analysis command takes the same input flags (docs/DESIGN.md "Shared flags"). Rather than
repeating two dozen ``Annotated`` parameters per command, :func:`common_options` adds them to
a command's signature and hands them over as one :class:`CommonArgs`.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import threading
import time
import typing
from collections.abc import Callable, Iterator
from dataclasses import field, make_dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from .._errors import CurvscopeError, OptionError
from .._options import OPTIONS, Option
from ..app import (  # the run engine; these names were defined here before
    RANK_STATE,
    Session,
    add_notice_sink,
    announce,
    check_inputs,
    check_out_dir,
    check_paths,
    end_run,
    finish,
    keep_partial,
    load_kwargs,
    open_session,
    peak_memory,
    plan_line,
    plan_memory,
    prepare_torch,
    refuse_other_run,
    refuse_shard,
    remove_run_documents,
    reset_run_state,
    start_run,
    write_marker,
)

__all__ = [
    "batch_line",
    "CommonArgs",
    "announce",
    "check_inputs",
    "check_paths",
    "check_out_dir",
    "peak_memory",
    "plan_line",
    "plan_memory",
    "prepare_torch",
    "block_mode",
    "Session",
    "common_options",
    "console",
    "err_console",
    "finish",
    "guarded",
    "computing",
    "keep_partial",
    "load_kwargs",
    "open_session",
    "refuse_other_run",
    "refuse_shard",
    "remove_run_documents",
    "start_run",
    "write_marker",
    "parse_floats",
    "parse_list",
    "print_batch_line",
    "print_findings",
    "print_table",
    "progress_bar",
    "table",
]

class _RankConsole(Console):
    """A console that is quiet on the ranks of a ``torchrun`` job other than 0."""

    @property
    def quiet(self) -> bool:  # rank 0 prints; the others print errors only (err_console)
        return self._quiet or not RANK_STATE["main"]

    @quiet.setter
    def quiet(self, value: bool) -> None:
        self._quiet = bool(value)


console = _RankConsole()
err_console = Console(stderr=True)


def _print_notice(kind: str, text: str) -> None:
    """The engine's notices on stderr: plans dim, warnings yellow."""
    from rich.markup import escape

    style = "dim" if kind == "plan" else "yellow"
    err_console.print(f"[{style}]{escape(text)}[/]", highlight=False, soft_wrap=True)


add_notice_sink(_print_notice)


def _opt(*names: str, help: str, **kw: Any) -> Any:
    return typer.Option(*names, help=help, **kw)


_TYPES = {"str": str, "int": int, "float": float, "bool": bool, "Path": Path}


def _declare(o: Option) -> tuple[Any, Any]:
    """The typer annotation and default of a shared option (from :data:`OPTIONS`)."""
    base = _TYPES[o.type]
    kind = base | None if o.optional else base
    default = Path(o.default) if o.type == "Path" and o.default is not None else o.default
    return Annotated[kind, _opt(o.flag, help=o.help, rich_help_panel=o.panel)], default


# name -> (annotation, default), in the order of --help: the checkpoint, then OPTIONS
_COMMON: dict[str, tuple[Any, Any]] = {
    "model_path": (
        Annotated[
            Path,
            typer.Argument(
                help="Checkpoint: curvscope .pt, .safetensors, state dict "
                "(with --model), TorchScript, pickled module, or a HuggingFace folder.",
                show_default=False,
            ),
        ],
        inspect.Parameter.empty,
    ),
    **{o.name: _declare(o) for o in OPTIONS},
}


def _settings(self: Any) -> dict[str, Any]:
    """Every shared option with its value, for the result document."""
    out = dict(self.__dict__)
    out["model_path"] = str(self.model_path)
    out["out"] = str(self.out)
    return out


CommonArgs = make_dataclass(
    "CommonArgs",
    [("model_path", Path)]
    + [(name, ann, field(default=default)) for name, (ann, default) in list(_COMMON.items())[1:]]
    # processes under torchrun, set when the command joins them
    + [("world_size", int, field(default=1))],
    namespace={"settings": _settings},
)
CommonArgs.__doc__ = "The shared flags of every analysis command (:data:`OPTIONS`), as given."


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
    asked = [
        m
        for m, on in (
            ("per-layer", per_layer),
            ("per-param", per_param),
            ("per-group", bool(group)),
        )
        if on
    ]
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
@contextlib.contextmanager
def computing(
    session: Session,
    command: str,
    settings: dict[str, Any],
    planned: int,
    results_of: Callable[[Any], dict[str, Any]] = lambda r: r.to_results(),
    show: Callable[[Any, Path], None] | None = None,
) -> Iterator[Callable[[int, int, str], None]]:
    """A command's computation: its progress bar, and on Ctrl-C its partial document.

    Yields the ``progress`` callback for the library (see :func:`progress_bar`); see
    :func:`keep_partial` for what an interrupt writes (and ``show`` prints). Every Lanczos
    basis inside puts itself where ``--basis-device`` says, as the memory plan priced it.
    """
    from ..linalg import basis_placement

    with (
        keep_partial(session, command, settings, results_of, show),
        progress_bar(session=session, planned=planned) as update,
        basis_placement(session.common.basis_device),
    ):
        yield update


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
    "load_strict=False": "--no-load-strict",
    "resume=False": "add --overwrite",
    "out_dir": "--out",
}
"""Library argument names whose command-line flag is not ``--`` plus the dashed name."""


def flag_name(name: str) -> str:
    """The command-line flag for library argument ``name`` (``max_iter`` -> ``--max-iter``)."""
    return FLAG_NAMES.get(name, "--" + name.replace("_", "-"))


@contextlib.contextmanager
def guarded() -> Iterator[None]:
    """Turn a :class:`CurvscopeError` into one red sentence and exit code 1.

    Ctrl-C exits with 130 after saying so. The command's run ends here: its marker becomes
    ``complete`` or ``interrupted``; a refusal leaves the ``--out`` folder as it was (a
    folder the command created and left empty is removed).
    """
    # off a terminal (a pipe, a log) sentences are not broken at 80 columns
    console.soft_wrap = not console.is_terminal
    reset_run_state()
    try:
        yield
    except CurvscopeError as exc:
        from rich.markup import escape

        end_run("refused")
        # soft wrap: a path in the sentence is never broken over lines (a terminal wraps it)
        err_console.print(
            f"[bold red]error:[/] {escape(exc.render(flag_name))}", highlight=False, soft_wrap=True
        )
        raise typer.Exit(code=1) from None
    except KeyboardInterrupt:
        end_run("interrupted")
        err_console.print("[yellow]interrupted[/]")
        raise typer.Exit(code=130) from None
    except typer.Exit:
        end_run("complete")
        raise
    except BaseException:
        end_run("interrupted")  # a crash: the run did not finish
        raise
    end_run("complete")


# ---------------------------------------------------------------------- tables
LABEL_MIN_WIDTH = 5
"""Label columns are never narrowed below this (or their longest cell)."""


def table(
    title: str,
    columns: list[str],
    *,
    numbers: tuple[str, ...] | list[str] = (),
    center: tuple[str, ...] | list[str] = (),
) -> Table:
    """A rich table whose ``numbers`` columns are never cut.

    Label columns wrap (and are narrowed first when the table is too wide); number columns
    are right-aligned, keep at least the width of their longest cell (set in
    :func:`print_table`) and fold rather than end in an ellipsis: ``1.087e-06`` never prints
    as ``1.087…``.

    Args:
        title: the table's title.
        columns: column headers, in order.
        numbers: headers of the columns that hold numbers.
        center: headers of centred columns (yes/no flags).
    """
    t = Table(title=title, title_style="bold")
    for col in columns:
        t.add_column(
            col,
            justify="right" if col in numbers else "center" if col in center else "left",
            overflow="fold",
        )
    t.number_columns = [i for i, col in enumerate(columns) if col in numbers]  # type: ignore[attr-defined]
    return t


def _cell_width(cell: Any) -> int:
    from rich.text import Text

    if isinstance(cell, str):
        return max((Text.from_markup(line).cell_len for line in cell.splitlines()), default=0)
    if isinstance(cell, Text):
        return cell.cell_len
    return 0


def print_findings(notes: list[str]) -> None:
    """Print the notes a reader must not miss: a matrix skipped, products that fell back."""
    from rich.markup import escape

    for note in notes:
        if note.startswith("skipped ") or "fell back" in note:
            console.print(f"[yellow]{escape(note)}[/]", highlight=False)


def batch_line(input_info: dict[str, Any]) -> str | None:
    """The one line under a command's table when its numbers depend on the batching.

    Train mode with BatchNorm (``input.batch_dependent``) makes the batch composition part
    of the function; ``None`` otherwise.
    """
    if not input_info.get("batch_dependent"):
        return None
    size = (input_info.get("data") or {}).get("batch_size")
    return (
        f"train mode: BatchNorm batch statistics make every number depend on the batch "
        f"composition (batches of {size}); another --batch-size, --samples or sample order "
        "gives other numbers."
    )


def precision_line(input_info: dict[str, Any]) -> str | None:
    """The line under a command's table when the model computes in a lower precision.

    ``input.precision`` records a float64 run whose model casts to float32 inside (HF Llama
    and T5 norms, ViT softmax, HF's own losses): its bounds and checks have float32's floor.
    """
    prec = input_info.get("precision") or {}
    if not prec or prec.get("computes_in") == prec.get("dtype"):
        return None
    where = ", ".join((prec.get("where") or [])[:2])
    return (
        f"the model computes in {prec['computes_in']} inside this {prec['dtype']} run "
        f"({where}): bounds and checks use {prec['computes_in']}'s round-off "
        f"(eps {prec['eps']:.1e})."
    )


def print_batch_line(session: Session) -> None:
    """Print :func:`batch_line` and :func:`precision_line` for the session's input."""
    from rich.markup import escape

    for line in (batch_line(session.input_info or {}), precision_line(session.input_info or {})):
        if line:
            console.print(f"[yellow]{escape(line)}[/]", highlight=False)


def print_table(t: Table, target: Console | None = None) -> None:
    """Print a table made by :func:`table` without cutting a number.

    Number columns get their longest cell as minimum width. On a terminal the table fits
    the width by wrapping labels first; when that is not enough its lines run past the
    edge instead of being cropped. Written to a file or a pipe, the table is printed at its
    full natural width, whatever COLUMNS says.
    """
    out = target or console
    if out.quiet:  # a torchrun rank other than 0: rank 0 prints
        return
    numbers = set(getattr(t, "number_columns", ()))
    for i, col in enumerate(t.columns):
        widest = max([_cell_width(c) for c in col.cells] + [1])
        # labels may fold down to LABEL_MIN_WIDTH characters a line, never vanish
        col.min_width = widest if i in numbers else min(widest, LABEL_MIN_WIDTH)
    if out.is_terminal:
        out.print(t, crop=False)
    else:
        natural = out.measure(t, options=out.options.update_width(100_000)).maximum
        # print() caps its width at the console's, so a wider twin writes to the same file
        wide = Console(file=out.file, width=max(natural, out.width), color_system=None)
        wide.print(t, crop=False)


PROGRESS_INTERVAL_S = 30.0
"""Off a terminal, a progress line goes to stderr at least this often."""


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class _Progress:
    """What a progress display shows: products done and planned, the phase, the time."""

    def __init__(self, session: Session | None, planned: int | None) -> None:
        self.session = session
        self.planned = planned
        self.done, self.total, self.what = 0, planned or 0, "starting"
        self.start_work = session.problem.work_done if session is not None else 0
        self.t0 = time.perf_counter()
        self.bar: Any = None  # the terminal's bar and its task, when there is one
        self.task: Any = None

    def figures(self) -> tuple[int, int]:
        """Products done and planned: the problem's count with a session, else the library's."""
        if self.session is not None:
            done = self.session.problem.work_done - self.start_work
            return done, max(self.planned or 0, done)
        return self.done, self.total

    def update(self, completed: int, total: int, description: str) -> None:
        """The library's report: the phase (and its own counts without a session)."""
        from rich.markup import escape

        # block names such as "[fc1.weight]" must not be read as markup
        description = escape(description)
        self.done, self.total, self.what = completed, total, description
        if self.bar is not None:
            done, tot = self.figures()
            self.bar.update(self.task, completed=done, total=max(tot, 1), description=description)

    def refresh(self) -> None:
        """Move the bar to the problem's count (products advance between library calls)."""
        done, tot = self.figures()
        self.bar.update(self.task, completed=done, total=max(tot, 1))

    def line(self) -> str:
        """One log line: elapsed time, phase, products done, planned and time left."""
        done, total = self.figures()
        elapsed = time.perf_counter() - self.t0
        text = f"[{_duration(elapsed)}] {self.what}: {done}"
        text += f" of about {total}" if total else ""
        text += " products" if self.session is not None else ""
        if done and total > done:
            text += f", about {_duration(elapsed / done * (total - done))} left"
        return text


@contextlib.contextmanager
def _every(seconds: float, action: Callable[[], None]) -> Iterator[None]:
    """Run ``action`` every ``seconds`` on a daemon thread while the block runs."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(seconds):
            action()

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


@contextlib.contextmanager
def _terminal_bar(progress: _Progress) -> Iterator[None]:
    """A rich bar on the terminal: products done, planned, elapsed time and time left."""
    from rich.progress import (
        BarColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    unit = "products" if progress.session is not None else ""
    progress.bar = Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} " + unit),
        TimeElapsedColumn(),
        TextColumn("left"),
        TimeRemainingColumn(),
        console=err_console,
        transient=True,
    )
    progress.task = progress.bar.add_task("starting", total=max(progress.planned or 1, 1))
    with progress.bar:
        if progress.session is None:
            yield
        else:  # products advance between the library's calls too
            with _every(0.5, progress.refresh):
                yield


@contextlib.contextmanager
def progress_bar(
    enabled: bool = True,
    *,
    session: Session | None = None,
    planned: int | None = None,
    interval: float = PROGRESS_INTERVAL_S,
) -> Iterator[Callable[[int, int, str], None]]:
    """Progress of a command in products; yields ``update(completed, total, description)``.

    With a ``session``, products done are read from its problem (:attr:`Problem.work_done`)
    and ``planned`` is the estimate :func:`announce` printed; the library's ``update`` calls
    then only name the current phase. Without one, the library's own counts are shown.
    On a terminal: a bar with products done, planned, elapsed time and time left. Otherwise
    (a pipe, a log file): one line to stderr at least every ``interval`` seconds with the
    same figures.
    """
    if not enabled or not RANK_STATE["main"]:
        yield lambda *_: None
        return
    progress = _Progress(session, planned)
    if err_console.is_terminal:
        with _terminal_bar(progress):
            yield progress.update
        return

    def log() -> None:
        err_console.print(progress.line(), highlight=False, soft_wrap=True)

    with _every(interval, log):
        yield progress.update
