"""Shared command-line plumbing: common flags, loading, progress, errors, result documents.

Every analysis command takes the same input flags (docs/DESIGN.md "Shared flags"). Rather than
repeating two dozen ``Annotated`` parameters per command, :func:`common_options` adds them to
a command's signature and hands them over as one :class:`CommonArgs`.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import threading
import time
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, make_dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from .._errors import CurvscopeError, OptionError
from .._options import LOAD_OPTIONS, OPTIONS, Option
from .._options import parse_hvp_cache as graph_cache_option

if TYPE_CHECKING:  # torch-free at import: --help must not load torch (issue 14)
    from ..problem import Problem

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

console = Console()
err_console = Console(stderr=True)


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
@dataclass
class Session:
    """Everything a command needs after loading: the problem and what to record about it."""

    problem: Problem
    common: CommonArgs
    started: float = field(default_factory=time.perf_counter)
    passes_before: int = 0
    memory: dict[str, Any] | None = None

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


def check_out_dir(out: Path, flag: str = "--out") -> Path:
    """Make sure results can be written to folder ``out``, before any computation.

    The folder is created if needed, and a probe file is written and removed (``os.access``
    says yes to root even on a read-only file system). A folder created here is removed again
    when the command is refused (:func:`guarded`), so a refusal leaves no new folder behind.

    Raises:
        OptionError: when ``out`` names a file, lies under a file, or cannot be written.
    """
    import tempfile

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OptionError(f"{flag} names a file, not a folder: {out}.")
    for parent in out.parents:
        if parent.exists() and not parent.is_dir():
            raise OptionError(f"{flag} {out} cannot be a folder: {parent} is a file.")
    # the topmost folder this command creates: a refusal removes it again (see guarded)
    created = next((p for p in [*reversed(out.parents), out] if not p.exists()), None)
    try:
        out.mkdir(parents=True, exist_ok=True)
        if created is not None and RUN_STATE["created"] is None:
            RUN_STATE["created"] = created
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as exc:
        raise OptionError(
            f"{flag} {out} cannot be created or written ({exc.strerror or exc})."
        ) from None
    return out

# ---------------------------------------------------------------------- runs
RUN_STATE: dict[str, Any] = {"created": None, "run": None, "out": None, "previous": None}
"""The command's run: the folder it created, its run, its ``--out`` and the marker it found."""

MARKER_IGNORED_STATES = ("complete",)
"""A folder whose marker is in one of these states takes any run."""


def _reset_run_state() -> None:
    import sys

    RUN_STATE.update(created=None, run=None, out=None, previous=None, fingerprints={})
    io = sys.modules.get(f"{__package__.rpartition('.')[0]}.io")
    if io is not None:  # never imported (torch with it) only to say there is no run
        io.set_current_run(None)


def _command_name(depth: int = 2) -> str:
    """The command calling: ``spectrum`` for a call from ``curvscope.cli.spectrum``."""
    import sys

    module = str(sys._getframe(depth).f_globals.get("__name__", ""))
    package, _, name = module.rpartition(".")
    return name if package == __package__ and not name.startswith("_") else "curvscope"


def refuse_other_run(
    out: Path, command: str, overwrite: bool, model_sha256: str | None = None
) -> dict[str, Any] | None:
    """Refuse an ``--out`` folder that another, unfinished run left (unless ``--overwrite``).

    The folder's marker (:data:`curvscope.io.MARKER`) says which run wrote it last. When that
    run was interrupted (or is still running) and was another command, or the same command
    on another model, the folder is refused: the new documents would sit beside the other
    run's partial ones. The same command on the same model takes the folder over (``track``
    resumes). Returns the marker found (``None`` when there is none).

    Raises:
        OptionError: naming the folder, the other run's command and ``--overwrite``.
    """
    from ..io import read_marker

    marker = read_marker(out)
    if marker is None or marker.get("state") in MARKER_IGNORED_STATES or overwrite:
        return marker
    other = str(marker.get("command") or "?")
    theirs = marker.get("model_sha256")
    differs = other != command or (
        model_sha256 is not None and theirs is not None and theirs != model_sha256
    )
    if differs:
        what = "another model" if other == command else f"curvscope {other}"
        how = "was interrupted" if marker.get("state") == "interrupted" else "did not finish"
        raise OptionError(
            f"--out {out} holds the run {marker.get('id')} of {what}, which {how}; give "
            "another --out, rerun that command to finish it, or add --overwrite to replace it.",
            option="out",
        )
    return marker


def start_run(
    common: CommonArgs,
    command: str,
    *,
    model_sha256: str | None = None,
    data_sha256: str | None = None,
):
    """Begin the command's run: a new run id, and the marker ``running`` in ``--out``.

    Called when the work starts (after loading). With ``--overwrite`` the documents of the
    interrupted run the folder held are removed first. The marker becomes ``complete`` or
    ``interrupted`` when the command ends (:func:`guarded`).
    """
    from ..io import MARKER, Run, set_current_run

    out = Path(common.out)
    marker = refuse_other_run(out, command, common.overwrite, model_sha256)
    run = Run(command)
    set_current_run(run)
    if not RANK_STATE["main"]:
        return run
    path = out / MARKER
    previous = path.read_text(encoding="utf-8") if path.is_file() else None
    RUN_STATE.update(
        run=run,
        out=out,
        previous=previous,
        fingerprints={"model_sha256": model_sha256, "data_sha256": data_sha256},
    )
    if common.overwrite and marker is not None and marker.get("state") != "complete":
        remove_run_documents(out, marker)
    write_marker("running")
    return run


def write_marker(state: str) -> None:
    """Write the current run's marker into its ``--out`` folder in ``state``."""
    import json

    from ..io import MARKER, write_atomic

    run, out = RUN_STATE.get("run"), RUN_STATE.get("out")
    if run is None or out is None:
        return
    marker = {
        "id": run.id,
        "command": run.command,
        "started": run.started,
        "state": state,
        **(RUN_STATE.get("fingerprints") or {}),
    }
    write_atomic(Path(out) / MARKER, json.dumps(marker, indent=1) + "\n")


def remove_run_documents(out: Path, marker: dict[str, Any]) -> list[Path]:
    """Remove the result documents of the run ``marker`` names (and its report page)."""
    import json

    from ..io import run_of

    removed = []
    for path in sorted(Path(out).glob("*.json")):
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(doc, dict) and run_of(doc).get("id") == marker.get("id"):
            path.unlink()
            removed.append(path)
    if marker.get("command") == "report":
        from ..report import SKIPPED_FILE

        for name in ("report.html", SKIPPED_FILE):
            if (Path(out) / name).is_file():
                (Path(out) / name).unlink()
                removed.append(Path(out) / name)
    return removed


def _end_run(outcome: str) -> None:
    """Close the command's run: ``complete``, ``interrupted`` or ``refused``.

    A refused run leaves the folder as it found it: a folder this command created is
    removed when nothing but the marker is in it, and the marker found is put back.
    """
    import shutil

    try:
        if outcome == "refused":
            created = RUN_STATE.get("created")
            out = RUN_STATE.get("out")
            if out is not None:  # a run started: its marker goes, the one found comes back
                from ..io import MARKER

                path = Path(out) / MARKER
                previous = RUN_STATE.get("previous")
                if previous is None:
                    path.unlink(missing_ok=True)
                else:
                    path.write_text(previous, encoding="utf-8")
            if created is not None and Path(created).is_dir():
                if not any(p.is_file() or p.is_symlink() for p in Path(created).rglob("*")):
                    shutil.rmtree(created, ignore_errors=True)
        elif RUN_STATE.get("run") is not None:
            write_marker(outcome)
    except OSError:
        pass  # the folder went away or became read-only: nothing more to say about it
    finally:
        _reset_run_state()


def _near(path: str, base: Path | None) -> bool:
    """Whether ``path`` exists as given or relative to ``base`` (a checkpoint's folder)."""
    p = Path(path)
    return p.exists() or (base is not None and not p.is_absolute() and (base / p).exists())


def _python_file(spec: str) -> str | None:
    """The file of ``FILE.py:NAME`` (or a bare ``FILE.py``), else ``None``."""
    if ".py:" in spec:
        return spec.rpartition(":")[0]
    if spec.endswith(".py"):
        return spec
    return None


def check_inputs(common: CommonArgs) -> None:
    """Every input path of the shared flags exists, before anything is loaded.

    Checks MODEL, ``--data`` (unless a built-in set's name), and ``--model`` and ``--loss``
    when they name a ``.py`` file.

    Raises:
        OptionError: naming the flag and the missing file.
    """
    model = Path(common.model_path) if common.model_path is not None else None
    if model is not None and not model.exists():
        raise OptionError(f"checkpoint {model} does not exist.")
    for flag, value in (("--model", common.model), ("--loss", common.loss)):
        file = _python_file(value) if value else None
        if file and not _near(file, _base(common)):
            raise OptionError(f"{flag} file {file} does not exist.")
    check_paths(common, {"--data": common.data})


def _base(common: CommonArgs) -> Path | None:
    model = common.model_path
    return Path(model).resolve().parent if model is not None else None


def check_paths(common: CommonArgs, paths: dict[str, str | Path | None]) -> None:
    """A command's own input paths (flag -> value; ``None`` skipped) exist.

    Data specs may be a built-in set's name or ``FILE.py:FN``; paths may be relative to the
    checkpoint's folder as well as to the current one.

    Raises:
        OptionError: naming the flag and the missing file.
    """
    base = _base(common)
    for flag, value in paths.items():
        if value is None:
            continue
        spec = str(value)
        file = _python_file(spec)
        if file is not None:
            if not _near(file, base):
                raise OptionError(f"{flag} file {file} does not exist.")
            continue
        if flag in ("--data", "--test-data") and os.sep not in spec and not Path(spec).suffix:
            if not Path(spec).exists():
                continue  # a built-in set's name: the loader knows them (and download names)
        if not _near(spec, base):
            raise OptionError(f"{flag} {spec} does not exist.")


def prepare_torch(common: CommonArgs | None = None) -> None:
    """Process-wide torch settings of a command: denormals flushed, ``--threads`` applied.

    Raises:
        OptionError: for ``--threads`` below 1.
    """
    import torch

    # Trained networks with saturated tanh/sigmoid units produce float32 subnormals in their
    # derivatives; on x86 CPUs arithmetic on them is microcoded. On the digits-mlp example a
    # gradient took 700 ms instead of 28 ms. Flushing them to zero changes results below
    # 1.2e-38 only, so the command line (which owns its process) turns it on.
    torch.set_flush_denormal(True)
    if common is None:
        return
    if common.threads is not None:
        if common.threads < 1:
            raise OptionError(f"--threads must be at least 1, got {common.threads}.")
        torch.set_num_threads(common.threads)
    elif not os.environ.get("OMP_NUM_THREADS"):
        default_threads(torch)
    common.threads = torch.get_num_threads()  # recorded in the document's settings


def default_threads(torch: Any) -> None:
    """Threads when neither ``--threads`` nor ``OMP_NUM_THREADS`` says.

    The CPUs this process may use (affinity, cgroup quota), shared by the processes of a
    ``torchrun`` job, and one when a probe shows other jobs on those CPUs (torch's threads
    then wait for each other: 10-70x slower than one thread, measured here). Says so in one
    line.
    """
    from .._device import contended, usable_cpus

    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    n = max(1, min(torch.get_num_threads(), usable_cpus() // local))
    torch.set_num_threads(n)
    if contended(n):
        torch.set_num_threads(1)
        if RANK_STATE["main"]:
            err_console.print(
                f"[yellow]other jobs are using these {n} CPUs ({n} threads were no faster "
                "than one on a probe): running with --threads 1; pass --threads N to choose."
                "[/]",
                highlight=False,
            )


RANK_STATE = {"main": True}
"""Whether this process prints plans and progress: rank 0 of a ``torchrun`` job, or alone."""


def join_ranks(common: CommonArgs):
    """Join the process group ``torchrun`` started, once, and return it (one process: alone).

    Under ``torchrun`` every rank runs the same command on its share of the batches; rank 0
    prints and writes the documents and figures. The other ranks print nothing but errors
    and write into a private folder that is removed when they exit. With ``--device cuda``
    each rank takes its local GPU (``LOCAL_RANK``), and the backend is NCCL; gloo on CPUs.
    """
    from .._distributed import from_environment

    group, device = from_environment(common.device)
    common.device = device
    if group.active and not group.is_main:
        import atexit
        import shutil
        import tempfile

        RANK_STATE["main"] = False
        console.quiet = True
        private = tempfile.mkdtemp(prefix=f"curvscope-rank{group.rank}-")
        atexit.register(shutil.rmtree, private, ignore_errors=True)
        common.out = Path(private)
    common.world_size = group.world_size
    return group


def load_kwargs(common: CommonArgs) -> dict[str, Any]:
    """What :func:`curvscope.load` takes besides the checkpoint, from the shared flags.

    The options marked ``load`` in :data:`OPTIONS`, under the same names (``cs.load`` parses
    ``--forward-kwargs``, ``--group`` and ``--hvp-cache`` strings itself). For commands that
    load several checkpoints (``track``); :func:`open_session` passes the same for one.
    """
    return {name: getattr(common, name) for name in LOAD_OPTIONS}


def open_session(common: CommonArgs, command: str | None = None) -> Session:
    """Check the output folder and every input path, then load checkpoint and data.

    The command's run starts after loading (:func:`start_run`): its id goes into every
    document, and ``--out`` is marked as the run's.

    Everything a user can get wrong on the command line is refused here, before loading
    and before any product: ``--out`` (a folder that can be created or written), the input
    files (MODEL, ``--data``, ``--model``/``--loss`` files; a command checks its own path
    options with :func:`check_inputs` first), ``--tol``, ``--max-iter`` and ``--threads``.

    Raises:
        CurvscopeError: for every user mistake, with one sentence naming the file or flag.
    """
    if common.tol <= 0:
        raise OptionError(f"--tol must be positive, got {common.tol}.")
    if common.max_iter is not None and common.max_iter < 1:
        raise OptionError(f"--max-iter must be at least 1, got {common.max_iter}.")
    if common.threads is not None and common.threads < 1:
        raise OptionError(f"--threads must be at least 1, got {common.threads}.")
    check_inputs(common)
    check_out_dir(common.out)
    command = command or _command_name()
    refuse_other_run(common.out, command, common.overwrite)
    prepare_torch(common)
    from .._load import load

    group = join_ranks(common)
    started = time.perf_counter()
    problem = load(common.model_path, **load_kwargs(common), process_group=group)
    info = problem.input_info or {}
    start_run(
        common,
        command,
        model_sha256=(info.get("model") or {}).get("sha256"),
        data_sha256=(info.get("data") or {}).get("sha256"),
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
    complete: bool = True,
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
        complete=complete,
    )
    if session.memory is not None:
        doc["memory"] = {**session.memory, "peak_bytes": peak_memory(session.problem.device)}
    return save_document(doc, session.common.out)


@contextlib.contextmanager
def keep_partial(
    session: Session,
    command: str,
    settings: dict[str, Any],
    results_of: Callable[[Any], dict[str, Any]] = lambda r: r.to_results(),
    show: Callable[[Any, Path], None] | None = None,
) -> Iterator[None]:
    """On Ctrl-C, write what finished as ``out/<command>.json`` with ``"complete": false``.

    The library raises :class:`~curvscope._errors.Interrupted` with its partial result
    (finished blocks, densities or grid points); the document is written atomically,
    ``show(partial, path)`` prints its table when given, then the interrupt goes on (exit 130).
    """
    from .._errors import Interrupted

    try:
        yield
    except Interrupted as stop:
        if stop.partial is not None:
            path = finish(
                session,
                command,
                settings=settings,
                results=results_of(stop.partial),
                counts={"matvecs": int(getattr(stop.partial, "num_matvecs", 0))},
                notes=list(getattr(stop.partial, "notes", [])),
                complete=False,
            )
            if show is not None:
                show(stop.partial, path)
            err_console.print(f"[yellow]partial result (complete: false) written: {path}[/]")
        raise


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
    :func:`keep_partial` for what an interrupt writes (and ``show`` prints).
    """
    with (
        keep_partial(session, command, settings, results_of, show),
        progress_bar(session=session, planned=planned) as update,
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
    _reset_run_state()
    try:
        yield
    except CurvscopeError as exc:
        from rich.markup import escape

        _end_run("refused")
        # soft wrap: a path in the sentence is never broken over lines (a terminal wraps it)
        err_console.print(
            f"[bold red]error:[/] {escape(exc.render(flag_name))}", highlight=False, soft_wrap=True
        )
        raise typer.Exit(code=1) from None
    except KeyboardInterrupt:
        _end_run("interrupted")
        err_console.print("[yellow]interrupted[/]")
        raise typer.Exit(code=130) from None
    except typer.Exit:
        _end_run("complete")
        raise
    except BaseException:
        _end_run("interrupted")  # a crash: the run did not finish
        raise
    _end_run("complete")


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


def _count(n: float) -> str:
    """``1834`` -> ``1.8k``; ``3000`` -> ``3k``."""
    for size, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= size:
            return f"{n / size:.1f}".rstrip("0").rstrip(".") + suffix
    return str(int(n))


def plan_line(what: str, products: int, session: Session | None = None) -> str:
    """``"<what>: about N products of P parameters on S samples"``."""
    text = f"{what}: about {_count(products)} products"
    if session is not None:
        p = session.problem
        text += f" of {_count(p.num_params)} parameters on {_count(p.num_samples)} samples"
    return text


def plan_memory(
    session: Session,
    *,
    matrices: list[str],
    vectors: int = 0,
    basis: int = 0,
    slq_steps: int = 0,
) -> None:
    """Estimate the run's peak memory, print it, and refuse it over ``--max-memory``.

    The default limit is what the device has free (plus what the process holds). The
    estimate goes into the document's ``memory`` section beside the measured peak.

    Raises:
        OptionError: when the estimate is larger than the limit (naming what to lower).
    """
    from torch import nn

    from ..app import (
        available_memory,
        estimate_memory,
        parse_memory,
        refuse_if_too_large,
    )

    common = session.common
    p = session.problem
    layers = []
    if any(m.startswith(("kfac", "ekfac")) for m in matrices):
        for m in p.model.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                layers.append((m.weight[0].numel() + 1, m.weight.shape[0]))
    limit = parse_memory(common.max_memory)
    if limit is None:
        limit = available_memory(p.device)
    p.graph_cache = graph_cache_option(common.hvp_cache)
    estimate = estimate_memory(
        p,
        matrices=matrices,
        vectors=vectors,
        basis=basis,
        basis_device=common.basis_device,
        slq_steps=slq_steps,
        kfac_layers=layers,
        limit=limit,
    )
    if estimate.graph_budget is not None:
        p.graph_cache = estimate.graph_budget
    if RANK_STATE["main"]:
        err_console.print(f"[dim]memory: {estimate.describe()}[/]", highlight=False, soft_wrap=True)
    refuse_if_too_large(estimate, limit)
    session.memory = {**estimate.to_dict(), "limit_bytes": None if limit is None else int(limit)}
    if p.device.type == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats(p.device)


def peak_memory(device) -> int:
    """The process's peak so far: max resident set (CPU) or max allocated (CUDA), bytes."""
    from .._device import peak_in_use

    return peak_in_use(device)


def announce(what: str, products: int, session: Session | None = None) -> int:
    """Print what the command will do, in products, before it starts (to stderr).

    Returns:
        ``products``, the total for :func:`progress_bar`.
    """
    if RANK_STATE["main"]:
        err_console.print(
            f"[dim]{plan_line(what, products, session)}[/]", highlight=False, soft_wrap=True
        )
    return products


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
    state = {"done": 0, "total": planned or 0, "what": "starting"}
    start_work = session.problem.work_done if session is not None else 0
    t0 = time.perf_counter()

    def figures() -> tuple[int, int]:
        if session is not None:
            done = session.problem.work_done - start_work
            total = max(planned or 0, done)
        else:
            done, total = state["done"], state["total"]
        return done, total

    from rich.markup import escape

    def update(completed: int, total: int, description: str) -> None:
        # block names such as "[fc1.weight]" must not be read as markup
        description = escape(description)
        state.update(done=completed, total=total, what=description)
        if bar is not None:
            done, tot = figures()
            bar.update(task, completed=done, total=max(tot, 1), description=description)

    bar = task = None
    if err_console.is_terminal:
        from rich.progress import (
            BarColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        unit = "products" if session is not None else ""
        bar = Progress(
            TextColumn("[progress.description]{task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total} " + unit),
            TimeElapsedColumn(),
            TextColumn("left"),
            TimeRemainingColumn(),
            console=err_console,
            transient=True,
        )
        task = bar.add_task("starting", total=max(planned or 1, 1))
        if session is not None:  # products advance between the library's calls too
            stop = threading.Event()

            def poll() -> None:
                while not stop.wait(0.5):
                    done, tot = figures()
                    bar.update(task, completed=done, total=max(tot, 1))

            poller = threading.Thread(target=poll, daemon=True)
        with bar:
            if session is not None:
                poller.start()
            try:
                yield update
            finally:
                if session is not None:
                    stop.set()
                    poller.join()
        return

    stop = threading.Event()

    def line() -> None:
        done, total = figures()
        elapsed = time.perf_counter() - t0
        text = f"[{_duration(elapsed)}] {state['what']}: {done}"
        text += f" of about {total}" if total else ""
        text += " products" if session is not None else ""
        if done and total > done:
            text += f", about {_duration(elapsed / done * (total - done))} left"
        err_console.print(text, highlight=False, soft_wrap=True)

    def report() -> None:
        while not stop.wait(interval):
            line()

    reporter = threading.Thread(target=report, daemon=True)
    reporter.start()
    try:
        yield update
    finally:
        stop.set()
        reporter.join()
