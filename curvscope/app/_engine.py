"""The run engine every command uses: options in, documents out.

A command of the command line (or a script) hands its options to this engine, which

* checks them before any work (``--out``, input files, the run folder's marker);
* sets up the process (threads, torch's denormals, the ranks of a ``torchrun`` job);
* loads the model and data into a :class:`Session` (``curvscope.load``, one run id), builds
  the operators it asks for (:meth:`Session.operators`), and plans the memory and products;
* writes the documents (:func:`finish`), on Ctrl-C the partial one (:func:`keep_partial`),
  and marks the run's folder complete or interrupted.

It prints nothing: plans, warnings and notices go to the sinks a front end installs with
:func:`add_notice_sink` (the command line prints them to stderr on rank 0). The options are the
shared options of :data:`curvscope._options.OPTIONS` as attributes of one object
(:data:`RunOptions`, the command line's ``CommonArgs``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._errors import OptionError, arg
from .._options import LOAD_OPTIONS
from .._options import parse_hvp_cache as graph_cache_option

if TYPE_CHECKING:  # torch-free at import: --help must not load torch
    from ..problem import Problem

__all__ = [
    "RANK_STATE",
    "RunOptions",
    "Session",
    "add_notice_sink",
    "announce",
    "check_inputs",
    "check_out_dir",
    "check_paths",
    "default_threads",
    "end_run",
    "finish",
    "join_ranks",
    "keep_partial",
    "load_kwargs",
    "refuse_shard",
    "notice",
    "open_session",
    "peak_memory",
    "plan_line",
    "plan_memory",
    "prepare_torch",
    "refuse_other_run",
    "remove_run_documents",
    "reset_run_state",
    "start_run",
    "write_marker",
]

RunOptions = Any
"""The shared options of a run: an object with one attribute per entry of ``OPTIONS`` (the
command line's ``CommonArgs``), plus ``model_path`` and ``world_size``."""

_SINKS: list[Callable[[str, str], None]] = []


def add_notice_sink(sink: Callable[[str, str], None]) -> None:
    """Install ``sink(kind, text)`` for the engine's notices (``plan``, ``warning``)."""
    if sink not in _SINKS:
        _SINKS.append(sink)


def notice(kind: str, text: str) -> None:
    """Hand a notice to the installed sinks, on rank 0 of a ``torchrun`` job only."""
    if RANK_STATE["main"]:
        for sink in _SINKS:
            sink(kind, text)


@dataclass
class Session:
    """Everything a command needs after loading: the problem and what to record about it."""

    problem: Problem
    common: RunOptions
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

    def test_problem(self, spec: str) -> Problem:
        """Other data (``solve --test-data``) through the same loading and preprocessing."""
        from .._load import load_like
        from ..operators import graph_account

        split = "test" if self.common.split == "train" else self.common.split
        # the budget the memory plan chose for this run's kept graphs
        budget = graph_account(self.problem).budget
        return load_like(self.problem, spec, split=split, graph_cache=budget)

    def operators(
        self,
        names: str | list[str],
        *,
        skip_unsupported: bool = False,
        preconditioner: Any = None,
    ) -> tuple[dict[str, Any], list[dict[str, str]]]:
        """The curvature operators ``names`` of the session's problem, with its options.

        Monte-Carlo matrices draw with ``--seed``, Hessian products follow ``--hvp``; with a
        ``preconditioner`` (an optimiser's diagonal P) each is ``P^-1/2 A P^-1/2``, named
        ``preconditioned <name>``. Returns ``({name: operator}, skipped)``; see
        :func:`curvscope.operators.build_operators`.
        """
        from ..operators import build_operators, preconditioned

        ops, skipped = build_operators(
            self.problem,
            names,
            seed=self.common.seed,
            hvp=self.common.hvp,
            skip_unsupported=skip_unsupported,
        )
        if preconditioner is not None:
            ops = {f"preconditioned {k}": preconditioned(op, preconditioner)
                   for k, op in ops.items()}
        return ops, skipped


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


def reset_run_state() -> None:
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
    front = package.endswith(".cli") or package == "cli"
    return name if front and not name.startswith("_") else "curvscope"


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
            f"{arg('out')} {out} holds the run {marker.get('id')} of {what}, which {how}; give "
            f"another {arg('out')}, rerun that command to finish it, or add {arg('overwrite')} to "
            "replace it.",
            option="out",
        )
    return marker


def start_run(
    common: RunOptions,
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


def end_run(outcome: str) -> None:
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
        reset_run_state()


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


def check_inputs(common: RunOptions) -> None:
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


def _base(common: RunOptions) -> Path | None:
    model = common.model_path
    return Path(model).resolve().parent if model is not None else None


def check_paths(common: RunOptions, paths: dict[str, str | Path | None]) -> None:
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


def prepare_torch(common: RunOptions | None = None) -> None:
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
            raise OptionError(f"{arg('threads')} must be at least 1, got {common.threads}.")
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
        notice(
            "warning",
            f"other jobs are using these {n} CPUs ({n} threads were no faster than one on a "
            "probe): running with --threads 1; pass --threads N to choose.",
        )


RANK_STATE = {"main": True}
"""Whether this process prints plans and progress: rank 0 of a ``torchrun`` job, or alone."""


def join_ranks(common: RunOptions):
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

        RANK_STATE["main"] = False  # the front end prints nothing on this rank
        private = tempfile.mkdtemp(prefix=f"curvscope-rank{group.rank}-")
        atexit.register(shutil.rmtree, private, ignore_errors=True)
        common.out = Path(private)
    common.world_size = group.world_size
    return group


def load_kwargs(common: RunOptions) -> dict[str, Any]:
    """What :func:`curvscope.load` takes besides the checkpoint, from the shared flags.

    The options marked ``load`` in :data:`OPTIONS`, under the same names (``cs.load`` parses
    ``--forward-kwargs``, ``--group`` and ``--hvp-cache`` strings itself). For commands that
    load several checkpoints (``track``); :func:`open_session` passes the same for one.
    """
    return {name: getattr(common, name) for name in LOAD_OPTIONS}


BFLOAT16_COMMANDS = ("spectrum", "track")
"""Commands that take ``--dtype bfloat16``: their eigenvalues' final residual checks run on a
float32 copy of the model, so the bounds include what bfloat16 did to the iteration."""


SHARD_COMMANDS = ("spectrum",)
"""Commands that run in sharded mode (``--shard``, docs/sharded.md)."""


def refuse_shard(common: RunOptions, command: str) -> None:
    """Refuse ``--shard`` for a command that needs whole vectors, in one sentence.

    Raises:
        OptionError: for ``--shard`` on a command other than :data:`SHARD_COMMANDS`.
    """
    if getattr(common, "shard", False) and command not in SHARD_COMMANDS:
        raise OptionError(
            f"{arg('shard')} is available for spectrum only: {command} needs whole parameter "
            f"vectors or matrices other than the Hessian; drop {arg('shard')}.",
            option="shard",
        )


def open_session(common: RunOptions, command: str | None = None) -> Session:
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
        raise OptionError(f"{arg('tol')} must be positive, got {common.tol}.")
    if common.max_iter is not None and common.max_iter < 1:
        raise OptionError(f"{arg('max_iter')} must be at least 1, got {common.max_iter}.")
    if common.threads is not None and common.threads < 1:
        raise OptionError(f"{arg('threads')} must be at least 1, got {common.threads}.")
    command = command or _command_name()
    refuse_shard(common, command)
    if str(common.dtype) == "bfloat16" and command not in BFLOAT16_COMMANDS:
        raise OptionError(
            f"{arg('dtype')} bfloat16 is for {' and '.join(BFLOAT16_COMMANDS)} (Lanczos, "
            f"whose final checks run in float32); {command}'s error bars would not include "
            "bfloat16's round-off: use float32."
        )
    from .._options import parse_basis_device

    parse_basis_device(common.basis_device)  # a bad device or disk: folder, before loading
    check_inputs(common)
    check_out_dir(common.out)
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
    from ._documents import document, save_document

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
            notice("warning", f"partial result (complete: false) written: {path}")
        raise


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
    slq_probes: int = 1,
    trace_probes: int = 0,
    k: int = 1,
    explicit_basis: bool = False,
    movable: bool = False,
    phases: dict[str, dict] | None = None,
):
    """Estimate the run's peak memory, fit the Lanczos basis, print both, or refuse.

    The default limit is what the device has free (plus what the process holds). With
    ``movable`` (the command passes the returned choice on to ``eigsh``) a default basis
    (not ``explicit_basis``) that does not fit is shrunk, down to the minimum for ``k``
    pairs, or moved to host memory on a GPU (:func:`~curvscope.app._memory.fit_memory`);
    one line says what was chosen and what it costs. The estimate goes into the document's
    ``memory`` section beside the measured peak. SLQ's probes (``slq_probes`` of
    ``slq_steps`` steps) run in the largest block that fits (``probe_block``).

    ``phases`` (a report): later parts that run one after another, each with its own
    ``matrices``/``vectors``/``basis``/``slq_*``/``float64`` (keywords of
    :func:`~curvscope.app._memory.fit_memory`); each is fitted like the first, and the
    estimate printed and recorded is the largest, named. A phase that does not fit is left
    out (``session.memory["left_out"]``: part -> the reason, with what would fit) instead
    of refusing the run.

    Returns:
        The :class:`~curvscope.app._memory.BasisChoice`: the basis size and
        ``basis_device`` to run with.

    Raises:
        OptionError: when nothing fits, naming only changes that would fit.
    """
    from torch import nn

    from ..operators import graph_account
    from ._memory import available_memory, fit_memory, measure, parse_memory

    common = session.common
    p = session.problem
    layers = [
        (m.weight[0].numel() + 1, m.weight.shape[0])
        for m in p.model.modules()
        if isinstance(m, (nn.Linear, nn.Conv2d))
    ]
    limit = parse_memory(common.max_memory)
    if limit is None:
        limit = available_memory(p.device)
    account = graph_account(p)
    account.budget = graph_cache_option(common.hvp_cache)
    every = {m for kw in (phases or {}).values() for m in kw.get("matrices", ())}
    measured = measure(p, sorted(every.union(matrices)))  # the model runs once

    def fit(**kw):
        kfac = any(m.startswith(("kfac", "ekfac")) for m in kw.get("matrices", matrices))
        return fit_memory(
            p, basis_device=common.basis_device, kfac_layers=layers if kfac else (),
            limit=limit, k=k, explicit=explicit_basis, movable=movable, measured=measured,
            **kw,
        )

    estimate, choice = fit(
        matrices=matrices, vectors=vectors, basis=basis, slq_steps=slq_steps,
        slq_probes=slq_probes, trace_probes=trace_probes,
    )
    lines = [choice.line]
    largest = ""
    left_out = {}
    for name, kw in (phases or {}).items():
        try:
            e, c = fit(**kw)
        except OptionError as exc:  # that part is left out, the others run
            from .._options import flag_of

            left_out[name] = f"left out: it does not fit the memory; {exc.render(flag_of)}"
            continue
        lines.append(c.line)
        if c.probe_block is not None:
            choice = dataclasses.replace(choice, probe_block=c.probe_block)
        if e.total > estimate.total:
            estimate, largest = e, name
    if p.group.active:
        choice = _agree(p, choice, left_out, list(phases or {}))
    if estimate.graph_budget is not None:
        account.budget = estimate.graph_budget
    notice("plan", f"memory: {estimate.describe()}" + (f" in its largest part, {largest}"
                                                       if largest else ""))
    for line in lines:
        if line is not None:
            from .._errors import render_args
            from .._options import flag_of

            notice("plan", render_args(line, flag_of))
    session.memory = {
        **estimate.to_dict(),
        "limit_bytes": None if limit is None else int(limit),
        "basis": {"size": choice.size, "device": choice.device},
    }
    if largest:
        session.memory["largest_part"] = largest
    if left_out:
        session.memory["left_out"] = left_out
        for name, why in left_out.items():
            notice("plan", f"{name}: {why}")
    if choice.probe_block is not None:
        session.memory["slq_probe_block"] = choice.probe_block
    if estimate.disk_bytes:
        session.memory["disk_bytes"] = int(estimate.disk_bytes)
    if p.device.type == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats(p.device)
    return choice


def _agree(p: Any, choice: Any, left_out: dict[str, str], phases: list[str]) -> Any:
    """The plan's choices made the same on every rank (each measured its own memory).

    Ranks run the same collectives, so they must run the same parts, basis and SLQ blocks:
    the smallest basis and block any rank chose, and every part any rank left out.
    """
    for name in phases:
        if p.reduce(1.0 if name in left_out else 0.0, op="max") and name not in left_out:
            left_out[name] = "left out: it does not fit the memory of another rank."
    size = int(-p.reduce(-float(choice.size), op="max"))
    block = choice.probe_block
    # every rank takes part in each reduction (collectives): no short cut around one
    if p.reduce(0.0 if block is None else 1.0, op="max"):
        mine = float(block) if block is not None else 1e18
        found = -p.reduce(-mine, op="max")
        block = None if found >= 1e18 else int(found)
    return dataclasses.replace(choice, size=size, probe_block=block)


def peak_memory(device) -> int:
    """The process's peak so far: max resident set (CPU) or max allocated (CUDA), bytes."""
    from .._device import peak_in_use

    return peak_in_use(device)


def announce(what: str, products: int, session: Session | None = None) -> int:
    """Print what the command will do, in products, before it starts (to stderr).

    Returns:
        ``products``, the total for :func:`progress_bar`.
    """
    notice("plan", plan_line(what, products, session))
    return products
