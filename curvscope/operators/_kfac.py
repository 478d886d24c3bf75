r"""Kronecker-factored curvature: KFAC and EKFAC for Linear, Conv1D, Conv2d and Embedding layers.

KFAC: Martens & Grosse 2015, KFC for convolutions: Grosse & Martens 2016, EKFAC: George et
al. 2018.

Notation for one layer with weight ``W`` (``[out, in]``; Conv2d: ``[out, C*kh*kw]``;
HuggingFace ``Conv1D`` and Embedding store it transposed) and bias ``b``: per sample ``i``
and location ``l`` (one location for Linear on ``[N, in]`` inputs; the ``T`` positions of
``[N, T, in]`` inputs, weight shared over time; the output pixels of a Conv2d, whose inputs
are the unfolded patches: "expand" KFC, Eschenhagen et al. 2023; the locations of every call
of a layer called several times in a forward, whose weight the calls share as positions do),
:math:`a_{il}` is the layer input augmented by a 1 when the layer has a bias, and
:math:`g_{il}` the derivative of the per-sample loss w.r.t. the layer output. The layer's
block of the Fisher-type matrix the factors approximate is

.. math::
    B = c \sum_i E_y\Big[\big(\textstyle\sum_l g_{il} \otimes a_{il}\big)
        \big(\textstyle\sum_l g_{il} \otimes a_{il}\big)^T\Big],
    \qquad c = 1/N \text{ (mean) or } 1 \text{ (sum)},

for the row-major flattening of :math:`[W \mid b]` (``[out, in + 1]``), and KFAC replaces it by

.. math::
    B \approx G \otimes A, \qquad
    A = \frac{1}{N R} \sum_{i,l} a_{il} a_{il}^T, \qquad
    G = c \sum_{i,l} E_y[g_{il} g_{il}^T],

with ``R`` locations per sample (``N R``: the locations over all samples and calls). For one
sample and one location this is exact; in general it assumes samples' (and locations') ``a``
and ``g`` independent. The expectation over ``y``: ``exact`` sums over the model's predictive
distribution (the output Fisher's square root, as :class:`FisherOperator`; on ``[N, T, V]``
outputs one column per position and class, the positions' labels being independent given
the input: ``T V`` backward passes a batch), ``mc`` draws ``mc_samples`` labels per sample
(and position) with ``seed``, ``empirical`` uses the observed labels (then ``B`` is the
empirical Fisher's block).

An Embedding's input is a one-hot, so its ``A`` is diagonal (token frequencies; ids at its
``padding_idx`` get no gradient and count as zero vectors); ids of batch size 1 in a batch
of ``n`` samples (GPT2's position ids) are read as shared by the samples. A weight held by two
different modules (GPT2's ``wte`` tied to ``lm_head``) is left out, with a note: its uses
multiply it in transposed orders, so its block is a sum of two Kronecker products, not one.

Weight and bias of a layer form one Kronecker block (cross terms kept); different layers
are independent (block-diagonal). Selecting only a layer's weight (or bias) gives
:math:`G \otimes A_{ww}` (or :math:`G A_{bb}`), the slice of the full block.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch
import torch.nn.functional as F
from torch import nn

from .._errors import OptionError, UnsupportedModelError, arg
from ..linalg import LinearOperator
from ..problem import Problem, batch_seed
from ._base import CurvatureOperator
from ._outputs import LossView, per_term_scale, refuse_train_mode

__all__ = ["EKFACOperator", "KFACFisherType", "KFACOperator"]


class KFACFisherType(str, Enum):
    """Which expectation over labels the factor ``G`` uses."""

    EXACT = "exact"
    MC = "mc"
    EMPIRICAL = "empirical"


@dataclass
class _KLayer:
    name: str
    module: nn.Module
    has_bias: bool
    weight: str | None  # selected full parameter name, or None
    bias: str | None
    n_in: int  # columns of W (without the bias column); Embedding: num_embeddings
    n_out: int  # Embedding: embedding_dim

    @property
    def embedding(self) -> bool:
        """Whether the layer is an ``nn.Embedding``.

        Its weight ``[V, d]`` is the Linear-style ``[d, V]`` transposed, and its input a one-hot
        whose factor ``A`` is diagonal (the token frequencies).
        """
        return isinstance(self.module, nn.Embedding)

    @property
    def transposed(self) -> bool:
        """Whether the weight is stored ``[in, out]`` (Embedding, HuggingFace ``Conv1D``)."""
        return self.embedding or _is_conv1d(self.module)

    def index(self) -> list[int]:
        idx = list(range(self.n_in)) if self.weight else []
        return idx + ([self.n_in] if self.bias else [])


SUPPORTED = (nn.Linear, nn.Conv2d, nn.Embedding)
"""Layers with Kronecker factors (and HuggingFace's ``Conv1D``, :func:`_is_conv1d`); Linear on
``[N, ..., in]`` inputs shares its weight over the middle (sequence) positions: the expand
approximation (Eschenhagen et al. 2023)."""

COVERED = "Linear, Conv1D (HuggingFace), Conv2d and Embedding"


def _is_conv1d(module: nn.Module) -> bool:
    """HuggingFace's ``transformers.pytorch_utils.Conv1D``: a Linear with weight ``[in, out]``.

    Recognised by its class (no import of transformers): ``forward`` is
    ``x @ weight + bias`` over the last dimension.
    """
    cls = type(module)
    return (
        cls.__name__ == "Conv1D"
        and cls.__module__.startswith("transformers")
        and isinstance(getattr(module, "weight", None), torch.Tensor)
        and module.weight.dim() == 2
    )


def _layer_kind(module: nn.Module) -> str | None:
    """Why a module has no Kronecker factors here (its type, with the reason), or None."""
    if _is_conv1d(module):
        return None
    if not isinstance(module, SUPPORTED):
        return type(module).__name__
    if isinstance(module, nn.Embedding) and (
        module.max_norm is not None or module.scale_grad_by_freq or module.sparse
    ):
        return "Embedding with max_norm, scale_grad_by_freq or sparse"
    return None


def _tied_owners(model: nn.Module) -> dict[int, list[tuple[str, nn.Module]]]:
    """``id(parameter)`` -> the distinct modules that hold it directly (name, module)."""
    owners: dict[int, list[tuple[str, nn.Module]]] = {}
    for mname, module in model.named_modules(remove_duplicate=False):
        for p in module.parameters(recurse=False):
            mods = owners.setdefault(id(p), [])
            if all(m is not module for _, m in mods):
                mods.append((mname, module))
    return owners


def kfac_supported(problem: Problem) -> tuple[list[str], dict[str, str]]:
    """Selected parameter names KFAC covers, and the others by module (name -> layer type).

    A parameter held by two different modules (GPT2's token embedding tied to its output
    layer) is left out: the uses multiply its entries in transposed orders, so its block is a
    sum of two Kronecker products of different shapes, not one ("Embedding tied to ...").
    """
    covered, skipped = [], {}
    owners = _tied_owners(problem.model)
    for pname in problem.names:
        mname, _, leaf = pname.rpartition(".")
        module = problem.model.get_submodule(mname)
        why = _layer_kind(module)
        if why is None:
            param = getattr(module, leaf)
            others = [n for n, m in owners.get(id(param), []) if m is not module]
            if others:
                other = problem.model.get_submodule(others[0])
                why = f"{type(module).__name__} tied to {others[0]} ({type(other).__name__})"
        if why is None:
            covered.append(pname)
        else:
            skipped[mname or "model"] = why
    return covered, skipped


def _kfac_layers(problem: Problem, matrix: str) -> list[_KLayer]:
    layers: dict[str, _KLayer] = {}
    for pname in problem.names:
        mname, _, leaf = pname.rpartition(".")
        module = problem.model.get_submodule(mname)
        if _layer_kind(module) is not None:
            raise UnsupportedModelError(
                f"the {matrix} matrix supports {COVERED} layers only; layer "
                f"{mname or 'model'!r} ({type(module).__name__}) has selected parameters "
                "(select fewer parameters).",
                matrix=matrix,
                layer=mname,
            )
        if mname in layers:
            setattr(layers[mname], leaf, pname)
            continue
        if isinstance(module, nn.Conv2d) and (
            module.groups != 1 or module.padding_mode != "zeros" or isinstance(module.padding, str)
        ):
            raise UnsupportedModelError(
                f"the {matrix} matrix supports Conv2d with groups=1, zero padding given as "
                f"numbers; layer {mname!r} has groups={module.groups}, "
                f"padding={module.padding!r}, padding_mode={module.padding_mode!r}.",
                matrix=matrix,
            )
        w = module.weight
        if isinstance(module, nn.Embedding) or _is_conv1d(module):  # stored [in, out]
            n_in, n_out = w.shape
        else:
            n_in, n_out = w[0].numel(), w.shape[0]
        bias = getattr(module, "bias", None) is not None
        layers[mname] = _KLayer(mname, module, bias, None, None, n_in, n_out)
        setattr(layers[mname], leaf, pname)
    return list(layers.values())


def _recorder(store: list, n: int):
    """Forward hook recording ``(input, output)`` of each call.

    An Embedding called on ids with batch dimension 1 in a batch of ``n > 1`` samples
    (GPT2's position ids ``[1, T]``, broadcast over the batch) is read as applied to every
    sample: its ids and output are expanded to the batch (same values downstream), so that
    each sample's output derivative exists.
    """

    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor):
        x = inputs[0]
        if isinstance(module, nn.Embedding) and n > 1 and x.dim() >= 1 and x.shape[0] == 1:
            output = output.expand(n, *output.shape[1:])
            store.append((x.expand(n, *x.shape[1:]), output, True))
            return output
        store.append((x, output, False))
        return None

    return hook


def _patches(layer: _KLayer, x: torch.Tensor) -> torch.Tensor:
    """Layer inputs as ``[n, R, in (+1)]`` (Conv2d: unfolded patches; Embedding: ids ``[n, R]``).

    An Embedding's ids at its ``padding_idx`` become -1 (their row gets no gradient).
    """
    m = layer.module
    n = x.shape[0]
    if layer.embedding:
        ids = x.reshape(n, -1)
        if m.padding_idx is not None:
            ids = ids.masked_fill(ids == m.padding_idx, -1)
        return ids
    if isinstance(m, nn.Conv2d):
        a = F.unfold(x, m.kernel_size, dilation=m.dilation, padding=m.padding, stride=m.stride)
        a = a.transpose(1, 2)
    else:
        a = x.reshape(n, -1, x.shape[-1])
    if layer.has_bias:
        a = torch.cat([a, torch.ones_like(a[..., :1])], dim=-1)
    return a


def _out_grads(layer: _KLayer, g: torch.Tensor) -> torch.Tensor:
    """Output derivatives as ``[n, R, out]``."""
    n = g.shape[0]
    if isinstance(layer.module, nn.Conv2d):
        return g.reshape(n, g.shape[1], -1).transpose(1, 2)
    return g.reshape(n, -1, g.shape[-1])


class KFACOperator(CurvatureOperator):
    r"""KFAC: per layer :math:`G \otimes A`, block-diagonal over layers (module docstring).

    Products apply :math:`G\,\tilde V A` per layer (:math:`\tilde V` the ``[out, in+1]``
    layout of the column). :meth:`eigenvalues` gives each layer's exact eigenvalues (outer
    products of the factors' eigenvalues) and :meth:`inverse` the damped inverse through the
    factors' eigendecompositions. Factors are computed in one pass at construction (``exact``:
    one backward pass per output dimension and batch) and shared with :meth:`block` views.

    Args:
        problem: model (selected parameters in Linear, Conv1D, Conv2d and Embedding layers;
            the others are left out, with a note), loss and data.
        fisher_type: ``exact``, ``mc`` or ``empirical``.
        mc_samples: labels drawn per sample (``mc``).
        seed: seed of the label draws (``mc``).

    Raises:
        UnsupportedModelError: when no selected parameter is covered, in train mode, for a
            layer not called, or called on inputs whose leading dimension is not the batch's
            samples, or for a loss that is not a likelihood (``exact``, ``mc``).
        OptionError: for an unknown ``fisher_type`` or ``mc_samples < 1``.
    """

    name = "kfac"
    _ekfac = False

    def __init__(
        self,
        problem: Problem,
        *,
        fisher_type: str | KFACFisherType = KFACFisherType.EXACT,
        mc_samples: int = 1,
        seed: int = 0,
        _shared: dict | None = None,
    ) -> None:
        try:
            fisher_type = KFACFisherType(fisher_type)
        except ValueError:
            valid = ", ".join(k.value for k in KFACFisherType)
            raise OptionError(
                f"KFAC fisher type {fisher_type!r} is not known; choose one of {valid}."
            ) from None
        if int(mc_samples) < 1:
            raise OptionError(f"{arg('mc_samples')} must be at least 1, got {mc_samples}.")
        base = "ekfac" if self._ekfac else "kfac"
        self.name = base if fisher_type is KFACFisherType.EXACT else f"{base}-{fisher_type.value}"
        covered, skipped = kfac_supported(problem)
        self.skipped_layers = dict(skipped)
        if skipped:
            if not covered:
                first = next(iter(skipped))
                raise UnsupportedModelError(
                    f"the {self.name} matrix covers {COVERED} layers; the "
                    f"selected parameters are in none (layer {first!r} is "
                    f"{skipped[first]}).",
                    matrix=self.name,
                    layer=first,
                )
            problem = problem.select(covered)
        super().__init__(problem, fisher_type=fisher_type, mc_samples=int(mc_samples), seed=seed)
        if skipped:
            shown = ", ".join(f"{m} ({t})" for m, t in list(skipped.items())[:6])
            self.notes.append(
                f"{self.name} covers the {COVERED} layers only: it is the "
                f"matrix of those {problem.num_params} parameters; the parameters of "
                f"{len(skipped)} other layer(s) are left out: {shown}"
                + (" ..." if len(skipped) > 6 else "")
                + "."
            )
        refuse_train_mode(problem, self.name)
        self.fisher_type = fisher_type
        self.mc_samples = int(mc_samples)
        self.seed = int(seed)
        self.view = LossView(problem, self.name)
        if fisher_type is not KFACFisherType.EMPIRICAL:
            self.view.require_likelihood()
        self.layers = _kfac_layers(problem, self.name)
        self._shared = _shared if _shared is not None else {"raw": {}, "S": {}}
        missing = [layer for layer in self.layers if layer.name not in self._shared["raw"]]
        if missing:
            self._shared["raw"].update(self._factor_pass(missing))
        self._eig: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    # ------------------------------------------------------------------ factors
    def _columns(self, out: torch.Tensor, y: torch.Tensor, gen: torch.Generator):
        """Output columns ``q`` (each shaped like ``out``), per sample summing to the matrix."""
        if self.fisher_type is KFACFisherType.EXACT:
            for Q in self.view.fisher_sqrt_columns(out, y):
                yield from Q
            return
        if self.fisher_type is KFACFisherType.MC:
            yield from self.view.sample_columns(out, y, self.mc_samples, gen)
            return
        yield from self.view.label_columns(out, y)

    def _forward(self, layers: list[_KLayer], batch):
        """Forward with hooks: ``(out, {layer: [(input, output, expanded) per call]})``."""
        p = self.problem
        captured: dict[str, list] = {layer.name: [] for layer in layers}
        handles = [
            layer.module.register_forward_hook(_recorder(captured[layer.name], batch.size))
            for layer in layers
        ]
        try:
            with p.mode(), torch.enable_grad():
                leaves = {n: t.detach().requires_grad_(True) for n, t in p.params.items()}
                out = self.view.forward(leaves, batch.inputs)
        finally:
            for h in handles:
                h.remove()
        for layer in layers:
            calls = captured[layer.name]
            if not calls:
                raise UnsupportedModelError(
                    f"the {self.name} matrix needs each covered layer called in the forward; "
                    f"layer {layer.name!r} was not called.",
                    matrix=self.name,
                    layer=layer.name,
                )
            for x, _, expanded in calls:
                if expanded and len(calls) > 1:
                    raise UnsupportedModelError(
                        f"the {self.name} matrix reads an Embedding called on ids of batch size 1 "
                        f"as shared by the batch's {batch.size} samples, which needs one call; "
                        f"layer {layer.name!r} was called {len(calls)} times.",
                        matrix=self.name,
                        layer=layer.name,
                    )
                if x.dim() == 0 or x.shape[0] != batch.size:
                    raise UnsupportedModelError(
                        f"the {self.name} matrix reads the leading dimension of a layer's input "
                        f"as the samples; layer {layer.name!r} was called on inputs of shape "
                        f"{tuple(x.shape)} in a batch of {batch.size} samples.",
                        matrix=self.name,
                        layer=layer.name,
                    )
        return out, captured

    def _passes(self, layers: list[_KLayer]):
        """Yield per batch ``(c, {layer: a [n,R,in+1]}, columns)``.

        ``columns`` is a generator of ``{layer: g [n,R,out]}``, one per output column. A layer
        called several times has the locations of all its calls (concatenated along ``R``):
        the weight is shared by the calls as by the positions of a sequence.
        """
        p = self.problem
        for batch in p.batches():
            gen = torch.Generator().manual_seed(batch_seed(self.seed, batch.index))
            out, captured = self._forward(layers, batch)
            acts = {
                layer.name: torch.cat(
                    [_patches(layer, x.detach()) for x, _, _ in captured[layer.name]], dim=1
                )
                for layer in layers
            }
            yield per_term_scale(p, batch), acts, self._grads(layers, out, captured, batch, gen)

    def _grads(self, layers: list[_KLayer], out, captured, batch, gen):
        """Per output column, each layer's output derivatives ``[n, R, out]`` over its calls."""
        outs = [o for layer in layers for _, o, _ in captured[layer.name]]
        for q in self._columns(out.detach(), batch.y, gen):
            gs = iter(
                torch.autograd.grad(
                    out,
                    outs,
                    grad_outputs=q.reshape(out.shape),
                    retain_graph=True,
                    allow_unused=True,
                )
            )
            col = {}
            for layer in layers:
                parts = []
                for _, o, _ in captured[layer.name]:
                    g = next(gs)  # None: a call the output does not depend on
                    g = torch.zeros_like(o) if g is None else g.detach()
                    parts.append(_out_grads(layer, g))
                col[layer.name] = torch.cat(parts, dim=1)
            yield col

    def _factor_pass(self, layers: list[_KLayer]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        A = {layer.name: 0.0 for layer in layers}
        G = {layer.name: 0.0 for layer in layers}
        rows = {layer.name: 0 for layer in layers}  # locations over all samples and calls
        for c, acts, cols in self._passes(layers):
            for layer in layers:
                a = acts[layer.name]
                rows[layer.name] += a.shape[0] * a.shape[1]
                if layer.embedding:  # one-hot inputs: A is the diagonal of token counts
                    ids = a.reshape(-1)
                    counts = torch.bincount(ids[ids >= 0], minlength=layer.n_in)
                    A[layer.name] = A[layer.name] + counts.to(self.problem.device, self.dtype)
                else:
                    A[layer.name] = A[layer.name] + torch.einsum("nri,nrj->ij", a, a)
            for col in cols:
                for layer in layers:
                    g = col[layer.name]
                    G[layer.name] = G[layer.name] + c * torch.einsum("nro,nrp->op", g, g)
        if self.problem.group.active:
            # every rank must hold a tensor per layer, also one that evaluated no batch
            A, G, rows = self._share_factors(layers, A, G, rows)
        return {layer.name: (A[layer.name] / rows[layer.name], G[layer.name]) for layer in layers}

    def _share_factors(self, layers: list[_KLayer], A: dict, G: dict, R: dict):
        """Factors summed over the data-parallel ranks (ranks without a batch add zeros)."""
        p = self.problem
        for layer in layers:
            n = layer.name
            if not isinstance(A[n], torch.Tensor):
                m = layer.n_in + (1 if layer.has_bias else 0)
                shape = (layer.n_in,) if layer.embedding else (m, m)
                A[n] = torch.zeros(shape, dtype=p.dtype, device=p.device)
            if not isinstance(G[n], torch.Tensor):
                G[n] = torch.zeros(layer.n_out, layer.n_out, dtype=p.dtype, device=p.device)
        A, G = p.reduce([A, G])
        names = [layer.name for layer in layers]
        rows = p.reduce([R.get(n, 0) for n in names])  # locations over all samples
        return A, G, dict(zip(names, rows, strict=True))

    def factors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per layer ``(A, G)`` restricted to the selected weight/bias columns of ``A``."""
        out = {}
        for layer in self.layers:
            A, G = self._shared["raw"][layer.name]
            if layer.embedding:  # A is kept as its diagonal
                out[layer.name] = (A, G)
                continue
            idx = layer.index()
            out[layer.name] = (A[idx][:, idx], G)
        return out

    def _eigen(self, layer: _KLayer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        r"""``(Q_G, Q_A, D)``: the layer block is :math:`(Q_G \otimes Q_A) diag(D) (..)^T`."""
        if layer.name not in self._eig:
            A, G = self.factors()[layer.name]
            lam_g, qg = torch.linalg.eigh(G)
            if layer.embedding:  # diagonal A: its eigenbasis is the identity (qa = None)
                self._eig[layer.name] = (qg, None, torch.outer(lam_g, A))
            else:
                lam_a, qa = torch.linalg.eigh(A)
                self._eig[layer.name] = (qg, qa, torch.outer(lam_g, lam_a))
        return self._eig[layer.name]

    # ------------------------------------------------------------------ layout
    def _layer_views(self, V: torch.Tensor) -> dict[str, torch.Tensor]:
        """Columns ``[P, k]`` -> per layer ``[k, out, m]`` (m = selected input columns)."""
        parts = self.problem.unflatten(V)
        k = V.shape[1]
        views = {}
        for layer in self.layers:
            if layer.embedding:  # [V, d] stored; the Linear-style layout is [d, V]
                views[layer.name] = parts[layer.weight].reshape(k, layer.n_in, layer.n_out).mT
                continue
            pieces = []
            if layer.weight and layer.transposed:  # HF Conv1D: [in, out] stored
                pieces.append(parts[layer.weight].reshape(k, layer.n_in, layer.n_out).mT)
            elif layer.weight:
                pieces.append(parts[layer.weight].reshape(k, layer.n_out, layer.n_in))
            if layer.bias:
                pieces.append(parts[layer.bias].reshape(k, layer.n_out, 1))
            views[layer.name] = torch.cat(pieces, dim=-1)
        return views

    def _assemble(self, results: dict[str, torch.Tensor], k: int) -> torch.Tensor:
        parts = {}
        for layer in self.layers:
            r = results[layer.name]
            if layer.embedding:
                parts[layer.weight] = r.mT
                continue
            if layer.weight:
                w = r[..., : layer.n_in]
                parts[layer.weight] = w.mT if layer.transposed else w
            if layer.bias:
                parts[layer.bias] = r[..., -1]
        p = self.problem
        return torch.cat([parts[n].reshape(k, -1) for n in p.names], dim=1).T

    # ------------------------------------------------------------------ products
    def _apply_layer(self, layer: _KLayer, X: torch.Tensor) -> torch.Tensor:
        A, G = self.factors()[layer.name]
        if layer.embedding:
            return (G @ X) * A
        return G @ X @ A

    def _data_matmat(self, V: torch.Tensor) -> torch.Tensor:
        views = self._layer_views(V)
        res = {layer.name: self._apply_layer(layer, views[layer.name]) for layer in self.layers}
        return self._assemble(res, V.shape[1])

    def eigenvalues(self) -> dict[str, torch.Tensor]:
        """Per layer, every eigenvalue of its block (weight decay included), descending."""
        wd = self.problem.weight_decay
        return {
            layer.name: (self._eigen(layer)[2].reshape(-1) + wd).sort(descending=True).values
            for layer in self.layers
        }

    def inverse(self, damping: float) -> LinearOperator:
        r"""The damped inverse :math:`(K + \lambda_{wd} I + \text{damping}\, I)^{-1}`.

        Raises:
            OptionError: when a damped eigenvalue is not positive.
        """
        return _KroneckerInverse(self, float(damping))

    def _with_problem(self, problem: Problem) -> CurvatureOperator:
        return type(self)(problem, **self._knobs, _shared=self._shared)

    def block(self, name: str) -> CurvatureOperator:
        """The block of a covered layer or parameter; a left-out layer is refused.

        Raises:
            UnsupportedModelError: for a block of a layer KFAC does not cover.
        """
        if name in self.skipped_layers or name.rpartition(".")[0] in self.skipped_layers:
            module = name if name in self.skipped_layers else name.rpartition(".")[0]
            raise UnsupportedModelError(
                f"the {self.name} matrix does not cover layer {module!r} "
                f"({self.skipped_layers[module]}).",
                matrix=self.name,
                layer=module,
            )
        return super().block(name)


class EKFACOperator(KFACOperator):
    r"""EKFAC (George et al. 2018): KFAC's eigenbasis with the exact diagonal in it.

    With :math:`A = Q_A \Lambda_A Q_A^T` and :math:`G = Q_G \Lambda_G Q_G^T` (per layer,
    factors as in :class:`KFACOperator`), the block is
    :math:`(Q_G \otimes Q_A)\,\mathrm{diag}(S)\,(Q_G \otimes Q_A)^T` with

    .. math::
        S_{jk} = c \sum_i E_y\big[(Q_G^T \Gamma_i Q_A)_{jk}^2\big], \qquad
        \Gamma_i = \textstyle\sum_l g_{il} a_{il}^T,

    the second moments of the per-sample gradients in that basis (computed in a second pass
    at construction). It matches the true block's diagonal in the Kronecker eigenbasis, so it
    is at least as close to it as KFAC in Frobenius norm (George et al. 2018, section 3).

    Args:
        problem: as :class:`KFACOperator`.
        fisher_type: ``exact``, ``mc`` or ``empirical``.
        mc_samples: labels drawn per sample (``mc``).
        seed: seed of the label draws (``mc``).
    """

    name = "ekfac"
    _ekfac = True

    def _eigen(self, layer: _KLayer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if layer.name not in self._eig:
            self._scales()
        return self._eig[layer.name]

    def _scales(self) -> None:
        factors = self.factors()
        bases = {}
        for layer in self.layers:
            A, G = factors[layer.name]
            # an Embedding's A is diagonal: its eigenbasis is the identity (qa = None)
            qa = None if layer.embedding else torch.linalg.eigh(A)[1]
            bases[layer.name] = (torch.linalg.eigh(G)[1], qa)
        key = {layer.name: (layer.name, tuple(layer.index())) for layer in self.layers}
        todo = [layer for layer in self.layers if key[layer.name] not in self._shared["S"]]
        if todo:
            S = {layer.name: 0.0 for layer in todo}
            for c, acts, cols in self._passes(todo):
                rotated = {}
                for layer in todo:
                    qa = bases[layer.name][1]
                    a = acts[layer.name]
                    rotated[layer.name] = a if qa is None else a[..., layer.index()] @ qa
                for col in cols:
                    for layer in todo:
                        g = col[layer.name] @ bases[layer.name][0]
                        a = rotated[layer.name]
                        if layer.embedding:
                            sq = _embedding_squares(g, a, layer.n_in)
                        else:
                            gam = torch.einsum("nro,nrm->nom", g, a)
                            sq = (gam * gam).sum(0)
                        S[layer.name] = S[layer.name] + c * sq
            if self.problem.group.active:
                for layer in todo:  # a rank without a batch adds zeros
                    if not isinstance(S[layer.name], torch.Tensor):
                        S[layer.name] = torch.zeros(
                            layer.n_out, len(layer.index()), dtype=self.dtype, device=self.device
                        )
                S = self.problem.reduce(S)
            for layer in todo:
                self._shared["S"][key[layer.name]] = S[layer.name]
        for layer in self.layers:
            qg, qa = bases[layer.name]
            self._eig[layer.name] = (qg, qa, self._shared["S"][key[layer.name]])

    def _apply_layer(self, layer: _KLayer, X: torch.Tensor) -> torch.Tensor:
        qg, qa, D = self._eigen(layer)
        if qa is None:  # Embedding: identity basis for A
            return qg @ (D * (qg.T @ X))
        return qg @ (D * (qg.T @ X @ qa)) @ qa.T


def _embedding_squares(g: torch.Tensor, ids: torch.Tensor, vocab: int) -> torch.Tensor:
    r""":math:`\sum_i \Gamma_i^2` (entrywise), ``[d, V]``, for an Embedding.

    ``g [n, R, d]`` (in :math:`G`'s eigenbasis), ``ids [n, R]`` (-1: no gradient).
    :math:`\Gamma_i[:, v] = \sum_{l: x_{il} = v} g_{il}`, summed per (sample, token) pair.
    """
    n, R, d = g.shape
    keep = (ids >= 0).reshape(-1)
    pair = (torch.arange(n, device=ids.device).unsqueeze(1) * vocab + ids).reshape(-1)[keep]
    uniq, inv = torch.unique(pair, return_inverse=True)
    gam = torch.zeros(len(uniq), d, dtype=g.dtype, device=g.device)
    gam.index_add_(0, inv, g.reshape(-1, d)[keep])
    out = torch.zeros(d, vocab, dtype=g.dtype, device=g.device)
    return out.index_add_(1, uniq % vocab, (gam * gam).T)


class _KroneckerInverse(LinearOperator):
    """``(K + (lambda_wd + damping) I)^{-1}`` through each layer's eigendecomposition."""

    SELF_ADJOINT = True

    def __init__(self, op: KFACOperator, damping: float) -> None:
        super().__init__(op.shape, dtype=op.dtype, device=op.device)
        self.op = op
        self.damping = damping
        self.name = f"{op.name}-inverse"
        shift = op.problem.weight_decay + damping
        for layer in op.layers:
            D = op._eigen(layer)[2]
            if float((D + shift).min()) <= 0:
                raise OptionError(
                    f"damping {damping:g} leaves a non-positive eigenvalue in layer "
                    f"{layer.name!r} of {op.name}; use a larger damping."
                )
        self.shift = shift

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        views = self.op._layer_views(V)
        res = {}
        for layer in self.op.layers:
            qg, qa, D = self.op._eigen(layer)
            if qa is None:  # Embedding: diagonal A
                res[layer.name] = qg @ ((qg.T @ views[layer.name]) / (D + self.shift))
                continue
            res[layer.name] = qg @ ((qg.T @ views[layer.name] @ qa) / (D + self.shift)) @ qa.T
        return self.op._assemble(res, V.shape[1])

    def block_names(self) -> list[str]:
        """The operator's block names."""
        return self.op.block_names()

    def block(self, name: str) -> LinearOperator:
        """The inverse of the operator's block (block-diagonal, so the block of the inverse)."""
        return _KroneckerInverse(self.op.block(name), self.damping)
