"""``curvscope.load``: checkpoint and data in, a :class:`~curvscope.problem.Problem` out.

The one loading routine the command line, ``solve``'s test data, the report pipeline and the
scripts share: it reads the model (a checkpoint file of any supported format, a HuggingFace
folder, or a module), the data (a built-in set, a file, a token file, a Python data source,
or batches given directly), falls back on what the checkpoint records (its data, loss,
reduction, input shape and normalisation), checks that the data fit the model, and gives the
problem its input record (:class:`~curvscope.problem.InputRecord`: the result document's
``input`` section, read back as ``problem.input_info``) with ``Problem.recorded``.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._errors import CurvscopeError, DataError, OptionError, arg
from ._losses import Loss, ModelLoss, get_loss
from .problem import InputRecord, Problem, check_output_finite

__all__ = ["DTYPES", "load", "load_like", "parse_device", "parse_dtype"]

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}
"""Dtypes an analysis runs in. In ``bfloat16`` the model computes in bfloat16 while vectors,
sums over batches and the Lanczos basis are float32, and the final residual check runs on a
float32 copy of the model (:meth:`CurvatureOperator.accurate`)."""


def parse_dtype(value: str | torch.dtype) -> torch.dtype:
    """``float32``, ``float64`` or ``bfloat16`` (names or torch dtypes).

    Raises:
        OptionError: for any other value.
    """
    if isinstance(value, torch.dtype) and value in DTYPES.values():
        return value
    if str(value) not in DTYPES:
        raise OptionError(
            f"{arg('dtype')} {value!r} is not supported; choose float32, float64 or bfloat16."
        )
    return DTYPES[str(value)]


def parse_device(value: str | torch.device) -> torch.device:
    """A device that exists on this machine (``cpu``, ``cuda``, ``cuda:N``).

    Raises:
        OptionError: for an unknown device or CUDA without a CUDA device.
    """
    try:
        dev = torch.device(value)
    except (RuntimeError, TypeError):
        raise OptionError(
            f"{arg('device')} {value!r} is not a device; use cpu, cuda or cuda:N."
        ) from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise OptionError(
                f"{arg('device')} {value} was asked for, but this machine has no CUDA device "
                f"(torch.cuda.is_available() is False); use {arg('device')} cpu."
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise OptionError(
                f"{arg('device')} {value}: only {torch.cuda.device_count()} CUDA device(s) exist."
            )
    elif dev.type != "cpu":
        raise OptionError(f"{arg('device')} {value!r} is not supported; use cpu, cuda or cuda:N.")
    return dev


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


class _Source:
    """What ``load`` needs of a data source: batches, a description and hashes."""

    def __init__(self, batches: Iterable, source: str, sha256: str | None, files: dict,
                 obj: Any = None, vocab_size: int | None = None) -> None:
        self.batches = batches
        self.source = source
        self.sha256 = sha256
        self.files = dict(files)
        self.obj = obj
        self.vocab_size = vocab_size


def _source_from(data: Any, *, batch_size: int, samples: int | None, seed: int,
                 base_dir: Path | None, options: dict) -> tuple[_Source, bool]:
    """The data source for ``data``; the flag says whether ``samples`` was applied already."""
    from . import io

    if isinstance(data, Mapping) and data.get("kind") == "tokens":
        spec = dict(data)
        block = options.get("block_size") or spec.get("block_size")
        if block is None:
            raise OptionError(f"token data need {arg('block_size')}.", option="block_size")
        windows = io.load_tokens(
            spec["path"], block_size=int(block), samples=samples, seed=seed,
            dtype=options.get("token_dtype") or spec.get("dtype"), base_dir=base_dir,
        )
        return _Source(windows.batches(batch_size), windows.source, windows.sha256,
                       getattr(windows, "files", {str(windows.path): windows.sha256}),
                       windows, windows.vocab_size), True
    if isinstance(data, (str, Path)):
        spec = str(data)
        if ".py:" in spec or (spec.endswith(".py") and ":" not in spec):
            return _python_source(spec, batch_size, base_dir), False
        path = Path(spec)
        if base_dir is not None and not path.is_absolute():
            path = Path(base_dir) / path
        if path.suffix in (".bin", ".npy") and (
            options.get("block_size") or path.suffix == ".bin"
        ):
            return _source_from(
                {"kind": "tokens", "path": str(path)}, batch_size=batch_size, samples=samples,
                seed=seed, base_dir=None, options=options,
            )
        dataset = io.load_dataset(
            spec,
            base_dir=base_dir,
            x_key=options.get("x_key"),
            y_key=options.get("y_key"),
            label_column=options.get("label_column"),
            split=options.get("split", "train"),
            input_shape=options.get("input_shape"),
            scale=options.get("scale"),
            normalize=options.get("normalize"),
        )
        if samples is not None:
            dataset = dataset.subset(samples, seed)
        files = getattr(dataset, "files", None) or (
            {dataset.source: dataset.sha256} if dataset.sha256 else {}
        )
        return _Source(dataset.batches(batch_size), dataset.source, dataset.sha256, files,
                       dataset), True
    if hasattr(data, "batches") and hasattr(data, "source"):  # a curvscope data set
        if samples is not None and hasattr(data, "subset"):
            data = data.subset(samples, seed)
            applied = True
        else:
            applied = False
        return _Source(data.batches(batch_size), str(data.source),
                       getattr(data, "sha256", None), getattr(data, "files", {}), data), applied
    return _Source(_as_batches(data, batch_size), f"in-memory {type(data).__name__}", None, {},
                   data), False


def _as_batches(data: Any, batch_size: int) -> Iterable:
    """Batches from a torch ``Dataset`` (map-style), a ``DataLoader`` or any re-iterable."""
    from torch.utils.data import DataLoader, Dataset, IterableDataset

    if isinstance(data, DataLoader):
        return data
    if isinstance(data, Dataset) and not isinstance(data, IterableDataset):
        if hasattr(data, "__len__") and hasattr(data, "__getitem__"):
            return DataLoader(data, batch_size=batch_size, shuffle=False)
    if isinstance(data, IterableDataset):
        return DataLoader(data, batch_size=batch_size)
    if isinstance(data, Iterable) and not isinstance(data, (str, bytes)):
        if iter(data) is data:
            raise DataError(
                "the data are a one-shot iterator (a generator?): every product needs a fresh "
                "pass, so pass a list, a DataLoader or an object whose __iter__ starts over."
            )
        return data
    raise DataError(
        f"the data ({type(data).__name__}) are neither a file, a data set nor an iterable of "
        "batches."
    )


def _python_source(spec: str, batch_size: int, base_dir: Path | None) -> _Source:
    """``FILE.py:FN``: the function returns a torch Dataset, a DataLoader or re-iterable batches.

    The file runs only because the user named it; its hash is recorded.
    """
    from .io import file_sha256, import_callable

    fn, path = import_callable(spec, what="data", base_dir=base_dir)
    try:
        obj = fn()
    except CurvscopeError:
        raise
    except Exception as exc:  # noqa: BLE001 - the user's code: one sentence, no traceback
        first = str(exc).splitlines()[0][:200] if str(exc) else ""
        raise DataError(
            f"{arg('data')} {spec}: calling it raised {type(exc).__name__}: {first}.",
            option="data",
        ) from None
    batches = _as_batches(obj, batch_size)
    files = {str(path): file_sha256(path)}
    return _Source(batches, f"{spec} ({type(obj).__name__})", files[str(path)], files, obj)


def _first_batch(problem: Problem) -> Any:
    """The first batch that holds samples: the checks against the model run on it.

    A source may give empty batches (``[(x[:0], y[:0]), (x, y)]``); a forward and a loss on
    zero samples succeed whatever the shapes, so checking such a batch would let targets
    that do not fit the model through.
    """
    first = None
    for batch in problem.batches():
        if batch.size:
            return batch
        first = batch if first is None else first
    return first


def _forward_hint(model: nn.Module, problem: Problem, exc: BaseException) -> str:
    """Name a forward's arguments the batches do not give (with ``forward_kwargs``)."""
    try:
        sig = inspect.signature(model.forward)
    except (TypeError, ValueError):
        return ""
    batch = _first_batch(problem)
    given = len(batch.inputs.args)
    names = set(batch.inputs.kwargs)
    missing = []
    for i, (name, prm) in enumerate(sig.parameters.items()):
        if prm.kind in (prm.VAR_POSITIONAL, prm.VAR_KEYWORD):
            continue
        if prm.default is prm.empty and i >= given and name not in names:
            missing.append(name)
    if missing:
        return (
            f"; its forward also needs {', '.join(missing)}: pass fixed values with "
            f"{arg('forward_kwargs')} (e.g. {missing[0]}=...)"
        )
    return ""


def _check_ids(problem: Problem, source: str, hint: int | None) -> None:
    """Token ids past the model's embedding, named before any forward pass."""
    vocab = _embedding_size(problem.model)
    if vocab is None:
        return
    if hint is not None and hint > vocab:
        raise DataError(
            f"token id {hint - 1} in {source} is past the model's vocabulary of {vocab} "
            f"(ids must lie in 0..{vocab - 1}).",
            option="data",
        )
    batch = _first_batch(problem)
    ids = [t for t in batch.inputs.args if isinstance(t, torch.Tensor)]
    ids += [v for k, v in batch.inputs.kwargs.items() if k == "input_ids"]
    for t in ids:
        if t.is_floating_point() or t.dtype == torch.bool or not t.numel():
            continue
        if int(t.max()) >= vocab or int(t.min()) < 0:
            bad = int(t.max()) if int(t.max()) >= vocab else int(t.min())
            raise DataError(
                f"token id {bad} in {source} is past the model's vocabulary of {vocab} "
                f"(ids must lie in 0..{vocab - 1}).",
                option="data",
            )


def _check_fit(problem: Problem, source: str, vocab_hint: int | None = None) -> torch.Tensor:
    """Run the first batch through the model; a failure is a sentence naming the data."""
    _check_ids(problem, source, vocab_hint)
    batch = _first_batch(problem)
    try:
        with torch.no_grad(), problem.mode():
            out = problem.forward(problem.params, batch.inputs)
    except CurvscopeError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure here is a mismatch with the data
        first = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        shapes = [tuple(t.shape) for t in batch.inputs.args if isinstance(t, torch.Tensor)]
        shapes += [f"{k}={tuple(v.shape)}" for k, v in batch.inputs.kwargs.items()
                   if isinstance(v, torch.Tensor)]
        hint = _forward_hint(problem.model, problem, exc)
        if not hint and problem.loss_fn.name not in ("causal_lm",):
            hint = f"; reshape them with {arg('input_shape')} if the model expects another shape"
        raise DataError(
            f"the data of {source} (first batch {', '.join(map(str, shapes))}) do not fit the "
            f"model's forward ({first}){hint}.",
            option="data",
        ) from None
    if not isinstance(out, torch.Tensor):
        raise DataError(f"the model's output for {source} is not a tensor.")
    if not bool(torch.isfinite(out).all()):
        problem.check_data(source=source)  # NaN in weights or data: the clearer cause
        check_output_finite(out, batch.index, "loss" if isinstance(problem.loss_fn, ModelLoss)
                            else "output")
    try:
        with torch.no_grad():
            value = problem.batch_value(out, batch)
    except Exception as exc:  # noqa: BLE001 - the targets do not fit the output or the loss
        # targets out of range or not finite have a clearer sentence: say that one if it holds
        problem.check_data(source=source, classes=_classes(problem, out),
                           vocabulary=_embedding_size(problem.model))
        if isinstance(exc, CurvscopeError):  # the loss's own sentence, with its data
            raise DataError(f"the data of {source}: {exc.message}", option="data") from None
        first = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        target = batch.target
        shape = tuple(target.shape) if isinstance(target, torch.Tensor) else type(target).__name__
        raise DataError(
            f"the targets of {source} (first batch {shape}) do not fit the model's output "
            f"{tuple(out.shape)} under the {problem.loss_name} loss ({first}).",
            option="data",
        ) from None
    check_output_finite(value.reshape(1, 1), batch.index, "loss")
    return out


def _embedding_size(model: nn.Module) -> int | None:
    for m in model.modules():
        if isinstance(m, nn.Embedding):
            return int(m.num_embeddings)
    return None


def load(
    path: str | Path | nn.Module,
    data: Any = None,
    *,
    loss: str | Loss | None = None,
    reduction: str | None = None,
    params: str | Sequence[str] | None = None,
    weight_decay: float = 0.0,
    batch_size: int = 512,
    samples: int | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = "float32",
    train_mode: bool = False,
    model: str | None = None,
    trust_checkpoint: bool = False,
    state_key: str | None = None,
    strip_prefix: str | None = None,
    load_strict: bool = True,
    forward_kwargs: str | Mapping[str, Any] | None = None,
    output: int | str | None = None,
    group: str | Mapping[str, Sequence[str]] | None = None,
    ignore_index: int = -100,
    hvp_cache: str | float | None = None,
    compile: bool = False,  # noqa: A002  (the shared option's name)
    check_deterministic: bool | None = None,
    process_group: Any = None,
    shard: bool = False,
    **data_options: Any,
) -> Problem:
    """Load a model and data into a :class:`~curvscope.problem.Problem`.

    Args:
        path: a checkpoint path (curvscope ``.pt``, ``.safetensors``, a state dict with
            ``model``, TorchScript, a HuggingFace folder, or a pickled module with
            ``trust_checkpoint``) or an ``nn.Module``. The keyword arguments below are the
            shared flags of the command line under the same names (:data:`OPTIONS`).
        data: a built-in name, a data file, a token file, ``FILE.py:FN``, a torch ``Dataset``,
            a ``DataLoader``, batches, or ``None`` for the data the checkpoint records.
        loss: a loss name, ``FILE.py:FN`` (a user function), ``model`` (the model's own loss)
            or a :class:`~curvscope._losses.Loss`; default the checkpoint's.
        reduction: ``mean`` or ``sum`` as the model was trained (default the checkpoint's,
            else mean).
        params: globs of the parameters to analyse (default all).
        weight_decay: adds ``weight_decay/2 ||w||^2`` to the loss.
        batch_size: samples per batch for files.
        samples: a seeded random subset of this many samples (or token windows).
        seed: seed of that subset.
        device: ``cpu``, ``cuda`` or ``cuda:N``.
        dtype: ``float32`` or ``float64``.
        train_mode: BatchNorm with batch statistics.
        model: ``MODULE:CALLABLE`` or ``file.py:CALLABLE`` building the module for a state
            dict (or wrapping a TorchScript file).
        trust_checkpoint: allow unpickling a whole module (runs code from the file).
        state_key: key of the state dict inside a wrapped checkpoint.
        strip_prefix: prefix removed from state-dict keys.
        load_strict: refuse state-dict entries that are not parameters or buffers.
        forward_kwargs: fixed keyword arguments of every forward: ``{"sr": 16000}`` or the
            flag's ``"sr=16000"``.
        output: which output the loss takes when the model returns several.
        group: named groups of parameters usable as blocks: ``{name: [globs]}`` or the
            flag's ``"NAME=GLOB|GLOB;NAME=GLOB"``.
        ignore_index: target value that marks no loss term.
        hvp_cache: bytes Hessian products may keep of first-order graphs: a number,
            ``"4GB"``, ``"off"`` (0) or ``"auto"``/``None`` (half the device's free memory;
            see :class:`~curvscope.problem.Problem`).
        compile: ``torch.compile`` the forward and loss of losses and gradients (see
            :class:`~curvscope.problem.Problem`).
        check_deterministic: compare two passes over the first batches (default: for
            Python data sources and data given directly).
        process_group: data parallelism: a :class:`~curvscope.Group` or an initialised
            ``torch.distributed`` process group (see :class:`~curvscope.problem.Problem`).
        shard: sharded mode (docs/sharded.md): after loading and checking, the problem keeps
            an FSDP2-sharded copy of the model over ``process_group``'s ranks
            (:meth:`~curvscope.problem.Problem.shard`); only the Hessian is then available.
        **data_options: file options (``x_key``, ``y_key``, ``label_column``, ``split``,
            ``input_shape``, ``scale``, ``normalize``, ``block_size``, ``token_dtype``).
            The names of earlier versions are still taken: ``builder`` (now ``model``),
            ``groups`` (``group``), ``graph_cache`` (``hvp_cache``), and a process group
            given as ``group``.

    Returns:
        The problem with its input record: ``input_info`` (the result document's ``input``
        section), ``notes``, ``loaded`` (what was read), ``data_source`` and
        ``load_options``.

    Raises:
        CurvscopeError: for every user mistake, with one sentence naming the file or argument.
    """
    from . import io
    from ._options import parse_groups, parse_hvp_cache, parse_kwargs

    model = data_options.pop("builder", model)  # the names of earlier versions
    group = data_options.pop("groups", group)
    hvp_cache = data_options.pop("graph_cache", hvp_cache)
    if group is not None and not isinstance(group, (str, Mapping)):
        process_group, group = group, None  # a process group, as ``group=`` was before
    groups = parse_groups(group)
    forward_kwargs = parse_kwargs(forward_kwargs)
    graph_cache = parse_hvp_cache(hvp_cache)
    dtype_t = parse_dtype(dtype)
    device_t = parse_device(device)
    if batch_size < 1:
        raise OptionError(f"{arg('batch_size')} must be at least 1, got {batch_size}.")
    known = {"x_key", "y_key", "label_column", "split", "input_shape", "scale", "normalize",
             "block_size", "token_dtype"}
    unknown = sorted(set(data_options) - known)
    if unknown:
        raise OptionError(f"load() got unknown options {', '.join(unknown)}.")
    if isinstance(path, nn.Module):
        loaded = io.LoadedModel(path, Path(type(path).__name__), "module", "")
        base_dir = None
    elif io.is_hf_folder(path):
        loaded = io.load_hf(path)
        base_dir = Path(path).resolve()
    else:
        loaded = io.load_checkpoint(
            path,
            model=model,
            trust_checkpoint=trust_checkpoint,
            state_key=state_key,
            strip_prefix=strip_prefix,
            load_strict=load_strict,
        )
        base_dir = Path(path).resolve().parent
    meta = dict(loaded.meta or {})
    options = dict(data_options)
    options.setdefault("input_shape", _meta_shape(meta))
    options.setdefault("normalize", _meta_normalize(meta))
    if options.get("input_shape") is None:
        options["input_shape"] = _meta_shape(meta)
    if options.get("normalize") is None:
        options["normalize"] = _meta_normalize(meta)
    data_spec = data if data is not None else meta.get("data")
    if data_spec is None:
        raise OptionError(
            f"{loaded.path} does not record its data; pass {arg('data')} (digits, a .npz "
            "file, a token file, FILE.py:FN...).",
            option="data",
        )
    # a path the checkpoint records is relative to its folder; a given one to the cwd
    src, applied = _source_from(
        data_spec, batch_size=batch_size, samples=samples, seed=seed,
        base_dir=base_dir if data is None else None, options=options,
    )
    loss_spec = loss if loss is not None else meta.get("loss")
    if loss_spec is None:
        raise OptionError(
            f"{loaded.path} does not record its loss; pass {arg('loss')} (cross_entropy, mse, "
            "causal_lm, FILE.py:FN, model...).",
            option="loss",
        )
    red = reduction or meta.get("reduction") or "mean"
    loss_obj = _make_loss(loss_spec, red, ignore_index)
    causal = _is_causal_lm(loaded.model)
    if isinstance(loss_obj, ModelLoss) and causal:
        # HuggingFace shifts the labels inside
        loss_obj = ModelLoss(shifted=True, ignore_index=ignore_index)
    targets_how = None
    if isinstance(src.obj, io.TokenWindows):
        loss_obj, targets_how = _token_targets(loss_obj, loaded, src)
    own_loss_note = None
    if isinstance(loss_obj, ModelLoss) and dtype_t == torch.float64 and loaded.format == (
        "huggingface"
    ):
        better = "causal_lm" if causal else "cross_entropy"
        own_loss_note = (
            "the model's own loss: HuggingFace may compute it in float32 (logits.float()) even "
            f"in a float64 run; {arg('loss')} {better} computes the same loss in float64."
        )
    stored = {p.dtype for p in loaded.model.parameters() if p.is_floating_point()}
    half = sorted(str(d).replace("torch.", "") for d in stored
                  if d in (torch.bfloat16, torch.float16))
    net = loaded.model.to(device=device_t, dtype=dtype_t)
    direct = not isinstance(data_spec, (str, Path, Mapping)) or ".py:" in str(data_spec)
    problem = Problem(
        net,
        loss_obj,
        src.batches,
        reduction=red,
        params=params,
        weight_decay=weight_decay,
        train_mode=train_mode,
        forward_kwargs=forward_kwargs,
        output=output,
        groups=groups,
        group=process_group,
        graph_cache=graph_cache,
        compile=compile,
    )
    # the batches must fit the model (one sentence naming the data) before two passes over
    # the source compare them
    out = _check_fit(problem, src.source, src.vocab_size)
    _check_targets(problem, src.source, causal)
    if direct if check_deterministic is None else check_deterministic:
        problem.check_deterministic()
    if samples is not None and not applied:
        problem = problem.subsample(samples, seed)
    problem.check_data(source=src.source, classes=_classes(problem, out),
                       vocabulary=_embedding_size(net))
    notes = list(loaded.notes) + list(problem.notes)
    if dtype_t == torch.bfloat16:
        rounded = "" if half else (
            " The checkpoint's weights were rounded to bfloat16: the matrix is the rounded "
            "model's."
        )
        notes.append(
            "the model computes in bfloat16 (--dtype bfloat16); vectors, sums over batches and "
            "the Lanczos basis are float32, and the final residual checks run on a float32 copy "
            "of the model, so residuals and bounds hold for its exact products." + rounded
        )
    elif half:  # a bf16/fp16 checkpoint (as HuggingFace LLMs ship): products from its values
        notes.append(
            f"the checkpoint stores {', '.join(half)} weights; they are analysed in "
            f"{str(dtype_t).replace('torch.', '')} (cast exactly from the stored values), so "
            "products and bounds carry the run's round-off, not the storage format's."
        )
    precision = problem.precision
    if precision.note():
        notes.append(precision.note())
    elif own_loss_note:
        notes.append(own_loss_note)
    if train_mode:
        notes.append(problem.mode_note())
    files = dict(getattr(loaded, "files", {}) or {})
    if loaded.sha256 and str(loaded.path) not in files:
        files[str(loaded.path)] = loaded.sha256
    files.update(src.files)
    info = {
        "model": {
            "path": str(loaded.path),
            "sha256": loaded.sha256 or None,
            "format": loaded.format,
            "num_params": sum(p.numel() for p in net.parameters()),
            "params_selected": problem.num_params,
            "param_names": list(problem.names),
        },
        "data": {
            "source": src.source,
            "sha256": src.sha256,
            "num_samples": problem.num_samples,
            "num_terms": problem.num_terms,
            "batch_size": batch_size,
            "subset_seed": seed if samples is not None else None,
            "targets": targets_how or _targets_description(problem),
        },
        "loss": problem.loss_name,
        "reduction": red,
        "weight_decay": weight_decay,
        "dtype": str(dtype_t).replace("torch.", ""),
        "device": str(device_t),
        "seed": seed,
        "train_mode": train_mode,
        "compile": bool(compile),
        "batch_dependent": problem.batch_dependent,
        "precision": precision.to_dict(),
        "files": files,
        "versions": io.versions(),
    }
    load_options = {
        "batch_size": batch_size, "options": options, "base_dir": base_dir,
        "ignore_index": ignore_index, "forward_kwargs": dict(forward_kwargs or {}),
        "output": output, "groups": dict(groups or {}),
    }
    if shard:
        problem = problem.shard()
        # the record must not hold the unsharded module: a full copy of the parameters on
        # every rank, the memory sharding is there to save (no sharded command reads it)
        loaded = dataclasses.replace(loaded, model=None)
        info["sharded"] = {
            "world_size": problem.sharding.world_size,
            "local_params": problem.sharding.n_local,
            "layout": "FSDP2 fully_shard, dim-0 chunks of every parameter",
        }
    return problem.recorded(InputRecord(
        info=info, notes=notes, loaded=loaded, source=src, load_options=load_options
    ))


def _is_causal_lm(model: nn.Module) -> bool:
    """Whether ``model`` is a HuggingFace causal language model (it shifts labels inside)."""
    return type(model).__name__.endswith(("ForCausalLM", "LMHeadModel"))


class _OwnLabels:
    """Token-file batches as dicts for a model's own loss: ``labels`` are the inputs.

    A HuggingFace causal LM shifts its labels by one inside, so handing it the window's
    inputs as labels shifts the targets exactly once (``T - 1`` terms a window).
    """

    def __init__(self, batches: Iterable) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        for x, _ in self.batches:
            yield {"input_ids": x, "labels": x}


def _token_targets(loss: Loss, loaded: Any, src: _Source) -> tuple[Loss, str]:
    """The loss for a token file's windows, shifted once, and how the targets were formed.

    The windows already pair inputs ``t[i:i+T]`` with next-token targets ``t[i+1:i+T+1]``:
    ``causal_lm`` takes them without its own shift, a model's own loss gets the inputs as
    labels and shifts them itself, every other loss gets the next-token targets.

    Raises:
        OptionError: for a HuggingFace model that is not a causal language model, whose
            training targets a token file cannot give.
    """
    from ._losses import CausalLM

    name = type(loaded.model).__name__
    if loaded.format == "huggingface" and not _is_causal_lm(loaded.model):
        raise OptionError(
            f"a token file gives next-token targets, but {name} is not a causal language "
            f"model; pass its batches (input_ids, labels...) with {arg('data')} FILE.py:FN.",
            option="data",
        )
    if isinstance(loss, CausalLM):
        return (
            CausalLM(loss.ignore_index, shift=False),
            "next tokens t[i+1:i+T+1] of the token file's windows, taken as they are "
            "(causal_lm does not shift them again)",
        )
    if isinstance(loss, ModelLoss):
        if not _is_causal_lm(loaded.model):
            raise OptionError(
                f"{arg('loss')} model on a token file needs a causal language model that "
                f"shifts its labels inside; {name} is not one: name the loss with "
                f"{arg('loss')} (cross_entropy, FILE.py:FN).",
                option="loss",
            )
        src.batches = _OwnLabels(src.batches)
        return loss, (
            "labels = the window's inputs t[i:i+T], shifted once inside the model "
            "(T - 1 terms a window)"
        )
    return loss, f"next tokens t[i+1:i+T+1] of the token file's windows, given to {loss.name}"


def _targets_description(problem: Problem) -> str:
    """How the loss's targets come from the batches, for the result document."""
    from ._losses import CausalLM

    fn = problem.loss_fn
    if isinstance(fn, CausalLM):
        return "labels (or input_ids) shifted by one inside the causal_lm loss"
    if isinstance(fn, ModelLoss):
        return "labels passed to the model, which computes its own loss" + (
            " (shifted by one inside)" if fn.shifted else ""
        )
    return "the batches' targets (or labels), as given"


def _check_targets(problem: Problem, source: str, causal: bool) -> None:
    """Refuse targets that cannot be the ones the model was trained on, in one sentence.

    * next-token targets given to ``causal_lm``, which shifts them again (each position
      would be scored against the token two ahead);
    * a causal LM's dict batches whose labels are its input ids, under a loss that does not
      shift them (each position would be scored against its own input token);
    * a loss function returning ``(scalar, n)`` whose scalar grows with ``n`` (a sum where
      the contract asks for the mean).
    """
    from ._losses import CallableLoss, CausalLM, CrossEntropy

    fn = problem.loss_fn
    batch = _first_batch(problem)
    ids = batch.inputs.kwargs.get("input_ids")
    if ids is None and len(batch.inputs.args) == 1:
        ids = batch.inputs.args[0]
    target = batch.target
    same_shape = (
        isinstance(ids, torch.Tensor) and isinstance(target, torch.Tensor)
        and ids.dim() == 2 and target.shape == ids.shape and ids.shape[1] > 1
        and not ids.is_floating_point() and not target.is_floating_point()
    )
    if same_shape:
        live = target != fn.ignore_index
        if isinstance(fn, CausalLM) and fn.shift:
            ahead = (target[:, :-1] == ids[:, 1:]) | ~live[:, :-1]
            if bool(ahead.all()) and not bool(((target == ids) | ~live).all()):
                raise DataError(
                    f"the targets of {source} are already the next tokens (targets[:, t] == "
                    f"inputs[:, t+1]), and causal_lm shifts them once more; use "
                    f"{arg('loss')} cross_entropy for pre-shifted targets.",
                    option="loss",
                )
        elif causal and type(fn) is CrossEntropy and bool(((target == ids) | ~live).all()):
            raise DataError(
                f"the labels of {source} are the input ids, and {problem.loss_name} scores each "
                "position against its own input token; a causal LM predicts the next one: use "
                f"{arg('loss')} causal_lm (or model), which shifts them once.",
                option="loss",
            )
    if isinstance(fn, CallableLoss) and problem.reduction == "mean":
        _check_callable_mean(problem, batch)


def _check_callable_mean(problem: Problem, batch: Any) -> None:
    """A ``(scalar, n)`` loss function's scalar must be the mean over its n terms.

    The function is evaluated on the first batch and on its first half: a mean changes
    little, a sum shrinks with the term count.
    """
    fn = problem.loss_fn
    target = batch.target
    if batch.size < 2 or not isinstance(target, torch.Tensor) or target.dim() == 0:
        return
    with torch.no_grad(), problem.mode():
        out = problem.forward(problem.params, batch.inputs)
        if not isinstance(out, torch.Tensor) or out.shape[:1] != target.shape[:1]:
            return
        v_all, n_all = fn._call(out, target)
        if n_all is None:
            return
        h = batch.size // 2
        v_half, n_half = fn._call(out[:h], target[:h])
    a, b = abs(float(v_all)), abs(float(v_half))
    if not n_half or not a or not b or n_all < 1.5 * n_half:
        return
    ratio, terms = a / b, n_all / n_half
    if ratio > terms ** 0.75 and ratio < terms ** 1.25:  # grows as the term count does
        raise OptionError(
            f"the loss function {fn.name} returned ({a:.6g}, {n_all}) on a batch and "
            f"({b:.6g}, {n_half}) on its first half: the value grows with the term count, so "
            "it looks like a sum; return (mean over the terms, number of terms), or the sum "
            f"with {arg('reduction')} sum.",
            option="loss",
        )


def _classes(problem: Problem, out: torch.Tensor) -> int | None:
    if problem.loss_fn.classification and out.dim() >= 1:
        return int(out.shape[-1])
    return None


def _make_loss(spec: Any, reduction: str, ignore_index: int) -> Loss:
    if isinstance(spec, Loss):
        return spec
    text = str(getattr(spec, "value", spec))
    if ".py:" in text:
        from ._losses import CallableLoss
        from .io import import_callable

        fn, _ = import_callable(text, what="loss")
        return CallableLoss(fn, name=text, reduction=reduction)
    if callable(spec):
        from ._losses import CallableLoss

        return CallableLoss(spec, name=getattr(spec, "__name__", "loss"), reduction=reduction)
    return get_loss(text, ignore_index=ignore_index)


def load_like(
    problem: Problem, data: Any, *, split: str | None = None, graph_cache: Any = "same"
) -> Problem:
    """The same model, loss and preprocessing as ``problem`` on other data (e.g. test data).

    The input shape, normalisation and other file options of the first load apply, so test
    data are preprocessed exactly as the training data were. ``graph_cache``: the kept-graph
    budget of the new problem (default: the one ``problem`` was built with).
    """
    opts = getattr(problem, "load_options", None) or {"batch_size": 512, "options": {}}
    options = dict(opts["options"])
    if split is not None:
        options["split"] = split
    src, _ = _source_from(data, batch_size=opts["batch_size"], samples=None, seed=0,
                          base_dir=None, options=options)
    new = Problem(
        problem.model,
        problem.loss_fn,
        src.batches,
        reduction=problem.reduction,
        params=list(problem.names),
        train_mode=problem.train_mode,
        compile=problem.compile,
        forward_kwargs=opts.get("forward_kwargs"),
        output=opts.get("output"),
        group=problem.group,
        graph_cache=problem.graph_cache if graph_cache == "same" else graph_cache,
        record=InputRecord(source=src),
    )
    out = _check_fit(new, src.source)
    new.check_data(source=src.source, classes=_classes(new, out),
                   vocabulary=_embedding_size(problem.model))
    return new
