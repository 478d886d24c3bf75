r"""The analysed problem: model, loss, a fixed ordered sample set and the selected parameters.

:class:`Problem` is the only place in curvscope that loops over data. Everything above it
(operators, linear algebra, diagnostics, solvers) asks it for losses, gradients and per-batch
evaluations at given parameter values and never touches the model or the data loader itself.

The loss it describes is

.. math:: L(w) = c \sum_{i=1}^N \ell(f(x_i; w), y_i) + \frac{\lambda}{2} \lVert w \rVert^2,

with :math:`c = 1/N` for ``reduction="mean"`` and :math:`c = 1` for ``"sum"`` (torch's per-sample
definitions: ``mse`` with mean also averages over the output entries). Batch ``b`` of size
:math:`n_b` enters with weight :math:`n_b / N` for mean reduction and 1 for sum, so unequal
batches give the full-data loss exactly.
"""

from __future__ import annotations

import contextlib
import fnmatch
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from ._errors import DeterminismError, NonFiniteError, OptionError
from ._losses import get_loss, is_classification

__all__ = ["Batch", "Problem"]

_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


@dataclass(frozen=True)
class Batch:
    """One batch on the parameters' device and dtype, with its weight in the total loss."""

    x: torch.Tensor
    y: torch.Tensor
    weight: float
    size: int


def _is_scripted(model: nn.Module) -> bool:
    return isinstance(model, torch.jit.ScriptModule)


class Problem:
    r"""A model, a loss and a fixed sample set, seen as a function of the selected parameters.

    Args:
        model: the network. It is never modified: evaluation goes through
            ``torch.func.functional_call`` (TorchScript modules: through their own parameters,
            values swapped in and restored), and its train/eval flags are restored after
            every pass.
        loss: loss name (``cross_entropy``, ``mse``, ``bce_with_logits``, ``nll``,
            ``chen_nonconvex``).
        data: an iterable of ``(X, y)`` batches, iterated once per pass, in order. It must give
            the same batches every time (see ``check_deterministic``).
        reduction: ``"mean"`` or ``"sum"``, as the model was trained with.
        params: which parameters to analyse: ``None`` for all, a glob (``"fc1.*"``) or a list
            of globs matched against ``named_parameters()`` names, or a ``dict`` name -> tensor
            of the model's own parameters. The flat layout follows ``named_parameters()`` order.
        weight_decay: :math:`\lambda` of the added :math:`\frac{\lambda}{2}\lVert w\rVert^2`.
        train_mode: evaluate BatchNorm with batch statistics (without updating its running
            statistics); dropout stays off. Default: eval mode.
        check_deterministic: run two passes at construction and compare loss and gradient.
    """

    def __init__(
        self,
        model: nn.Module,
        loss: str,
        data: Iterable[tuple[torch.Tensor, torch.Tensor]],
        *,
        reduction: str = "mean",
        params: None | str | list[str] | dict[str, torch.Tensor] = None,
        weight_decay: float = 0.0,
        train_mode: bool = False,
        check_deterministic: bool = False,
    ) -> None:
        if reduction not in ("mean", "sum"):
            raise OptionError(f"--reduction {reduction!r} is not known; choose mean or sum.")
        if weight_decay < 0:
            raise OptionError(f"--weight-decay must be non-negative, got {weight_decay}.")
        self.model = model
        self.loss_name = loss.value if hasattr(loss, "value") else str(loss)
        self.loss_fn = get_loss(self.loss_name)
        self.data = data
        self.reduction = reduction
        self.weight_decay = float(weight_decay)
        self.train_mode = bool(train_mode)
        self.scripted = _is_scripted(model)
        if self.scripted and self.train_mode:
            raise OptionError(
                "--train-mode is not available for TorchScript models: their BatchNorm "
                "modules cannot be switched to batch statistics without updating running ones."
            )
        self.params = self._select(params)
        if not self.params:
            raise OptionError(f"--params {params!r} selects no parameter of the model.")
        self.names = list(self.params)
        self.shapes = [tuple(p.shape) for p in self.params.values()]
        self.numels = [p.numel() for p in self.params.values()]
        offsets = [0]
        for n in self.numels:
            offsets.append(offsets[-1] + n)
        self.offsets = offsets
        self.num_params = offsets[-1]
        first = next(iter(self.params.values()))
        self.dtype = first.dtype
        self.device = first.device
        self.data_passes = 0
        self.num_samples, self.batch_sizes = self._count_samples()
        if check_deterministic:
            self.check_deterministic()

    # ----------------------------------------------------------------- parameters
    def _select(self, params) -> dict[str, torch.Tensor]:
        named = dict(self.model.named_parameters())
        if isinstance(params, dict):
            unknown = [n for n in params if n not in named]
            if unknown:
                raise OptionError(f"parameters {unknown} are not parameters of the model.")
            chosen = [n for n in named if n in params]
        elif params is None:
            chosen = list(named)
        else:
            globs = [params] if isinstance(params, str) else list(params)
            globs = [g.strip() for pat in globs for g in pat.split(",") if g.strip()]
            chosen = [n for n in named if any(fnmatch.fnmatchcase(n, g) for g in globs)]
            if not chosen:
                raise OptionError(
                    f"--params {','.join(globs)!r} matches no parameter; the model has "
                    f"{', '.join(named)}."
                )
        return {n: named[n].detach() for n in chosen}

    def select(self, params: None | str | list[str]) -> Problem:
        """A problem over the same model, loss and data with another parameter selection.

        The new problem shares the data and the sample count; no pass over the data is made.
        """
        new = object.__new__(Problem)
        new.__dict__.update(self.__dict__)
        new.params = self._select(params)
        if not new.params:
            raise OptionError(f"{params!r} selects no parameter of the model.")
        new.names = list(new.params)
        new.shapes = [tuple(p.shape) for p in new.params.values()]
        new.numels = [p.numel() for p in new.params.values()]
        offsets = [0]
        for n in new.numels:
            offsets.append(offsets[-1] + n)
        new.offsets = offsets
        new.num_params = offsets[-1]
        return new

    def param_slices(self) -> dict[str, slice]:
        """Where each selected parameter lies in the flat vector."""
        return {n: slice(self.offsets[i], self.offsets[i + 1]) for i, n in enumerate(self.names)}

    def module_blocks(self) -> dict[str, list[str]]:
        """Selected parameter names grouped by the module that owns them (``--per-layer``).

        Module names are those of ``named_modules()``; only modules that own a selected
        parameter directly appear, in ``named_parameters()`` order.
        """
        blocks: dict[str, list[str]] = {}
        for name in self.names:
            module = name.rpartition(".")[0]
            blocks.setdefault(module, []).append(name)
        return blocks

    def block_param_names(self, block: str) -> list[str]:
        """Parameter names of a block: ``"all"``, a module name or a parameter name.

        Raises:
            OptionError: when no selected parameter belongs to ``block``, listing valid names.
        """
        if block == "all":
            return list(self.names)
        if block in self.params:
            return [block]
        modules = self.module_blocks()
        if block in modules:
            return modules[block]
        valid = ["all", *modules, *self.names]
        raise OptionError(f"block {block!r} does not exist; valid blocks: {', '.join(valid)}.")

    def flatten(self, tensors: dict[str, torch.Tensor] | list[torch.Tensor]) -> torch.Tensor:
        """Concatenate per-parameter tensors into one flat vector (selected-parameter order)."""
        parts = tensors.values() if isinstance(tensors, dict) else tensors
        return torch.cat([t.reshape(-1) for t in parts])

    def unflatten(self, vec: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split a flat vector ``[P]`` (or columns ``[P, k]`` -> ``[k, *shape]``) per parameter."""
        if vec.shape[0] != self.num_params:
            raise OptionError(
                f"a vector of length {vec.shape[0]} does not fit the {self.num_params} "
                "selected parameters."
            )
        out = {}
        for i, (name, shape) in enumerate(zip(self.names, self.shapes, strict=True)):
            piece = vec[self.offsets[i] : self.offsets[i + 1]]
            if vec.dim() == 1:
                out[name] = piece.reshape(shape)
            else:
                out[name] = piece.T.reshape(vec.shape[1], *shape)
        return out

    def param_vector(self) -> torch.Tensor:
        """A flat copy of the selected parameters' current values."""
        return self.flatten(self.params).clone()

    def params_at(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Parameter dict with values from the flat vector ``flat``."""
        return self.unflatten(flat)

    # ----------------------------------------------------------------- modes
    @contextlib.contextmanager
    def mode(self) -> Iterator[None]:
        """Put the model in the analysis mode and restore every module's flags afterwards.

        Eval mode by default. With ``train_mode`` BatchNorm modules use batch statistics with
        ``track_running_stats`` switched off for the pass, so running statistics are never
        updated; dropout stays off.
        """
        modules = list(self.model.modules())
        saved = [(m, m.training) for m in modules]
        saved_track = []
        try:
            self.model.eval()
            if self.train_mode:
                for m in modules:
                    if isinstance(m, _BN_TYPES):
                        saved_track.append((m, m.track_running_stats))
                        m.track_running_stats = False
                        m.training = True
            yield
        finally:
            for m, flag in saved_track:
                m.track_running_stats = flag
            for m, flag in saved:
                m.training = flag

    # ----------------------------------------------------------------- data
    def _raw_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for item in self.data:
            if not isinstance(item, (tuple, list)) or len(item) < 2:
                raise OptionError("data must yield (X, y) pairs.")
            yield item[0], item[1]

    def _count_samples(self) -> tuple[int, list[int]]:
        sizes = [int(x.shape[0]) for x, _ in self._raw_batches()]
        if not sizes or sum(sizes) == 0:
            raise OptionError("the data set is empty.")
        return sum(sizes), sizes

    def batch_weight(self, size: int) -> float:
        """Weight of a batch of ``size`` samples in the total loss (n_b/N or 1)."""
        return size / self.num_samples if self.reduction == "mean" else 1.0

    def batches(self) -> Iterator[Batch]:
        """One pass over the data: batches moved to the parameters' device and dtype."""
        self.data_passes += 1
        for x, y in self._raw_batches():
            x = x.to(self.device)
            if x.is_floating_point():
                x = x.to(self.dtype)
            y = y.to(self.device)
            if y.is_floating_point():
                y = y.to(self.dtype)
            n = int(x.shape[0])
            yield Batch(x, y, self.batch_weight(n), n)

    # ----------------------------------------------------------------- evaluation
    @contextlib.contextmanager
    def _scripted_bound(self, params: dict[str, torch.Tensor]):
        """TorchScript only: swap ``params`` into the module's own tensors, restore after."""
        named = dict(self.model.named_parameters())
        saved = {}
        with torch.no_grad():
            for n, p in params.items():
                if named[n].data_ptr() != p.data_ptr():
                    saved[n] = named[n].detach().clone()
                    named[n].copy_(p)
        try:
            yield {n: named[n] for n in params}
        finally:
            with torch.no_grad():
                for n, v in saved.items():
                    named[n].copy_(v)

    def forward(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """Model output at parameter values ``params`` (selected names) for inputs ``x``.

        Call it inside :meth:`mode`. Differentiable in ``params`` through ``torch.func`` for
        ordinary modules.
        """
        if self.scripted:
            raise RuntimeError("forward() is not available for TorchScript; use loss helpers.")
        return torch.func.functional_call(self.model, params, (x,), strict=False)

    def batch_loss(self, params: dict[str, torch.Tensor], batch: Batch) -> torch.Tensor:
        """Weighted data loss of one batch (its share of the total loss, without decay)."""
        out = self.forward(params, batch.x)
        return batch.weight * self.loss_fn(out, batch.y, self.reduction)

    def regulariser(self, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """The weight-decay term lambda/2 ||w||^2 over the selected parameters."""
        total = sum((p * p).sum() for p in params.values())
        return 0.5 * self.weight_decay * total

    def _default(self, params):
        if params is None:
            return self.params
        if isinstance(params, torch.Tensor):
            return self.unflatten(params)
        return params

    def loss(self, params: None | torch.Tensor | dict[str, torch.Tensor] = None) -> torch.Tensor:
        """Total loss (data term plus weight decay) at ``params`` (flat or dict; default: w)."""
        params = self._default(params)
        total = torch.zeros((), dtype=self.dtype, device=self.device)
        with torch.no_grad(), self.mode():
            if self.scripted:
                with self._scripted_bound(params) as own:
                    for b in self.batches():
                        out = self.model(b.x)
                        total = total + b.weight * self.loss_fn(out, b.y, self.reduction)
                    total = total + self.regulariser(own)
            else:
                for b in self.batches():
                    total = total + self.batch_loss(params, b)
                total = total + self.regulariser(params)
        return total

    def loss_and_grad(
        self, params: None | torch.Tensor | dict[str, torch.Tensor] = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Total loss and its flat gradient at ``params`` (default: the model's weights)."""
        params = self._default(params)
        total = torch.zeros((), dtype=self.dtype, device=self.device)
        grad = torch.zeros(self.num_params, dtype=self.dtype, device=self.device)
        with self.mode():
            if self.scripted:
                with self._scripted_bound(params) as own:
                    leaves = list(own.values())
                    for b in self.batches():
                        value = b.weight * self.loss_fn(self.model(b.x), b.y, self.reduction)
                        gs = torch.autograd.grad(value, leaves, allow_unused=True)
                        grad += self.flatten(_zeros_for_none(gs, leaves))
                        total = total + value.detach()
                    reg = self.regulariser(own)
                    total = total + reg.detach()
                    grad += self.weight_decay * self.flatten([p.detach() for p in leaves])
            else:
                leaves = {n: p.detach().requires_grad_(True) for n, p in params.items()}
                for b in self.batches():
                    value = self.batch_loss(leaves, b)
                    gs = torch.autograd.grad(value, list(leaves.values()), allow_unused=True)
                    grad += self.flatten(_zeros_for_none(gs, list(leaves.values())))
                    total = total + value.detach()
                total = total + self.regulariser(params).detach()
                grad += self.weight_decay * self.flatten([p.detach() for p in params.values()])
        return total, grad

    def outputs(
        self, params: None | dict[str, torch.Tensor] = None
    ) -> Iterator[tuple[torch.Tensor, Batch]]:
        """Model outputs batch by batch (no gradient), with the batches they came from."""
        params = self._default(params)
        with torch.no_grad(), self.mode():
            for b in self.batches():
                if self.scripted:
                    with self._scripted_bound(params):
                        yield self.model(b.x), b
                else:
                    yield self.forward(params, b.x), b

    def accuracy(
        self, params: None | torch.Tensor | dict[str, torch.Tensor] = None
    ) -> float | None:
        """Fraction of correctly classified samples, or ``None`` for a regression loss."""
        if not is_classification(self.loss_name) and self.loss_name != "bce_with_logits":
            return None
        correct = 0
        for out, b in self.outputs(self._default(params)):
            if self.loss_name == "bce_with_logits":
                pred = (out > 0).to(b.y.dtype).reshape(b.y.shape)
                correct += (
                    int((pred == b.y).all(dim=-1).sum())
                    if b.y.dim() > 1
                    else int((pred == b.y).sum())
                )
            else:
                correct += int((out.argmax(dim=-1) == b.y).sum())
        return correct / self.num_samples

    # ----------------------------------------------------------------- checks
    def check_finite(self) -> None:
        """Raise :class:`NonFiniteError` naming the parameter, or the data, that holds NaN/Inf."""
        for name, p in self.params.items():
            if not torch.isfinite(p).all():
                raise NonFiniteError(f"parameter {name} holds NaN or Inf values.")
        for b in self.batches():
            if b.x.is_floating_point() and not torch.isfinite(b.x).all():
                raise NonFiniteError("the input data hold NaN or Inf values.")
            if b.y.is_floating_point() and not torch.isfinite(b.y).all():
                raise NonFiniteError("the targets hold NaN or Inf values.")

    def check_deterministic(self, rtol: float | None = None) -> None:
        """Two passes must give the same loss and gradient.

        Raises:
            DeterminismError: naming the likely cause (shuffling, ``drop_last``, dropout,
                train-mode BatchNorm).
        """
        sizes = [int(x.shape[0]) for x, _ in self._raw_batches()]
        l1, g1 = self.loss_and_grad()
        l2, g2 = self.loss_and_grad()
        eps = torch.finfo(self.dtype).eps
        rtol = rtol if rtol is not None else 1000 * eps
        scale = max(float(g1.abs().max()), 1e-30)
        if sizes != self.batch_sizes:
            raise DeterminismError(
                f"the data gave batches of sizes {sizes} after {self.batch_sizes}: a sampler "
                "that drops or reorders samples (drop_last, a random sampler) makes every "
                "product a different matrix; pass a fixed list of batches."
            )
        if (
            abs(float(l1 - l2)) > rtol * max(abs(float(l1)), 1.0)
            or float((g1 - g2).abs().max()) > rtol * scale
        ):
            raise DeterminismError(
                "two passes over the data gave different losses or gradients: the data "
                "loader probably draws different samples each pass (shuffle=True with "
                "drop_last, a random sampler) or the model samples (dropout, "
                "stochastic layers); pass a fixed, ordered list of batches."
            )

    def subsample(self, n: int, generator: torch.Generator) -> Problem:
        """The same problem on a seeded random subset of ``n`` samples (for ``--repeats``).

        Batches keep the largest batch size of this problem.

        Raises:
            OptionError: when ``n`` is not between 1 and the number of samples.
        """
        if not 1 <= n <= self.num_samples:
            raise OptionError(
                f"--samples {n} must be between 1 and the {self.num_samples} samples available."
            )
        xs, ys = zip(*list(self._raw_batches()), strict=True)
        x, y = torch.cat(xs), torch.cat(ys)
        idx = torch.randperm(self.num_samples, generator=generator)[:n].sort().values
        x, y = x[idx], y[idx]
        size = max(self.batch_sizes)
        batches = [(x[i : i + size], y[i : i + size]) for i in range(0, n, size)]
        new = object.__new__(Problem)
        new.__dict__.update(self.__dict__)
        new.data = batches
        new.data_passes = 0
        new.num_samples, new.batch_sizes = new._count_samples()
        return new

    def to(self, dtype: torch.dtype) -> Problem:
        """The same problem with the model cast to ``dtype`` (a copy; this one is untouched)."""
        import copy

        if dtype == self.dtype:
            return self
        model = copy.deepcopy(self.model).to(dtype)
        return Problem(
            model,
            self.loss_name,
            self.data,
            reduction=self.reduction,
            params=list(self.names),
            weight_decay=self.weight_decay,
            train_mode=self.train_mode,
        )


def _zeros_for_none(grads, leaves) -> list[torch.Tensor]:
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, leaves, strict=True)]
