r"""Kronecker-factored curvature: KFAC and EKFAC for Linear and Conv2d layers, on torch alone.

KFAC: Martens & Grosse 2015, KFC for convolutions: Grosse & Martens 2016, EKFAC: George et
al. 2018.

Notation for one layer with weight ``W`` (``[out, in]``; Conv2d: ``[out, C*kh*kw]``) and bias
``b``: per sample ``i`` and location ``l`` (one location for Linear on ``[N, in]`` inputs;
the output pixels of a Conv2d, whose inputs are the unfolded patches, "expand" KFC),
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

with ``R`` locations per sample. For one sample and one location this is exact; in general
it assumes samples' (and locations') ``a`` and ``g`` independent. The expectation over ``y``:
``exact`` sums over the model's predictive distribution (the output Fisher's square root, as
:class:`FisherOperator`), ``mc`` draws ``mc_samples`` labels per sample with ``seed``,
``empirical`` uses the observed labels (then ``B`` is the empirical Fisher's block).

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

    def index(self) -> list[int]:
        idx = list(range(self.n_in)) if self.weight else []
        return idx + ([self.n_in] if self.bias else [])


SUPPORTED = (nn.Linear, nn.Conv2d, nn.Embedding)
"""Layers with Kronecker factors; Linear on ``[N, ..., in]`` inputs shares its weight over
the middle (sequence) positions: the expand approximation (Eschenhagen et al. 2023)."""


def kfac_supported(problem: Problem) -> tuple[list[str], dict[str, str]]:
    """Selected parameter names KFAC covers, and the others by module (name -> layer type)."""
    covered, skipped = [], {}
    for pname in problem.names:
        mname = pname.rpartition(".")[0]
        module = problem.model.get_submodule(mname)
        ok = isinstance(module, SUPPORTED) and not (
            isinstance(module, nn.Embedding) and (module.max_norm is not None)
        )
        if ok:
            covered.append(pname)
        else:
            skipped[mname or "model"] = type(module).__name__
    return covered, skipped


def _kfac_layers(problem: Problem, matrix: str) -> list[_KLayer]:
    layers: dict[str, _KLayer] = {}
    for pname in problem.names:
        mname, _, leaf = pname.rpartition(".")
        module = problem.model.get_submodule(mname)
        if not isinstance(module, SUPPORTED):
            raise UnsupportedModelError(
                f"the {matrix} matrix supports Linear, Conv2d and Embedding layers only; layer "
                f"{mname or 'model'!r} ({type(module).__name__}) has selected parameters "
                "(select fewer parameters).",
                matrix=matrix,
                layer=mname,
            )
        if isinstance(module, nn.Embedding):
            if mname not in layers:
                V, d = module.weight.shape
                layers[mname] = _KLayer(mname, module, False, None, None, V, d)
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
        if mname not in layers:
            w = module.weight
            layers[mname] = _KLayer(
                mname, module, module.bias is not None, None, None, w[0].numel(), w.shape[0]
            )
        setattr(layers[mname], leaf, pname)
    return list(layers.values())


def _recorder(store: list):
    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        store.append((inputs[0], output))

    return hook


def _patches(layer: _KLayer, x: torch.Tensor) -> torch.Tensor:
    """Layer inputs as ``[n, R, in (+1)]`` (Conv2d: unfolded patches; Embedding: ids ``[n, R]``)."""
    m = layer.module
    n = x.shape[0]
    if layer.embedding:
        return x.reshape(n, -1)
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
        problem: model (selected parameters in Linear/Conv2d layers), loss and data.
        fisher_type: ``exact``, ``mc`` or ``empirical``.
        mc_samples: labels drawn per sample (``mc``).
        seed: seed of the label draws (``mc``).

    Raises:
        UnsupportedModelError: for selected parameters in other layers, in train mode, a
            layer called more than once, or a loss that is not a likelihood (``exact``, ``mc``).
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
                    f"the {self.name} matrix covers Linear, Conv2d and Embedding layers; the "
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
                f"{self.name} covers the Linear, Conv2d and Embedding layers only: it is the "
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
    def _columns(self, out: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        if self.fisher_type is KFACFisherType.EXACT:
            return self.view.fisher_sqrt(out)
        if self.fisher_type is KFACFisherType.MC:
            return self.view.sample_columns(out, y, self.mc_samples, gen)
        return self.view.label_columns(out, y)

    def _passes(self, layers: list[_KLayer]):
        """Yield per batch ``(c, {layer: a [n,R,in+1]}, [ {layer: g [n,R,out]} per column ])``."""
        p = self.problem
        for batch in p.batches():
            gen = torch.Generator().manual_seed(batch_seed(self.seed, batch.index))
            captured: dict[str, list] = {layer.name: [] for layer in layers}
            handles = [
                layer.module.register_forward_hook(_recorder(captured[layer.name]))
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
                if len(captured[layer.name]) != 1:
                    raise UnsupportedModelError(
                        f"the {self.name} matrix needs each layer called once per forward; "
                        f"layer {layer.name!r} was called {len(captured[layer.name])} times.",
                        matrix=self.name,
                    )
            acts = {
                layer.name: _patches(layer, captured[layer.name][0][0].detach()) for layer in layers
            }
            outs = [captured[layer.name][0][1] for layer in layers]
            Q = self._columns(out.detach(), batch.y, gen)
            cols = []
            for j in range(Q.shape[0]):
                gs = torch.autograd.grad(
                    out, outs, grad_outputs=Q[j].reshape(out.shape), retain_graph=True
                )
                cols.append(
                    {
                        layer.name: _out_grads(layer, g.detach())
                        for layer, g in zip(layers, gs, strict=True)
                    }
                )
            yield per_term_scale(p, batch), acts, cols

    def _factor_pass(self, layers: list[_KLayer]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        A = {layer.name: 0.0 for layer in layers}
        G = {layer.name: 0.0 for layer in layers}
        R = {}
        for c, acts, cols in self._passes(layers):
            for layer in layers:
                a = acts[layer.name]
                R[layer.name] = a.shape[1]
                if layer.embedding:  # one-hot inputs: A is the diagonal of token counts
                    counts = torch.bincount(a.reshape(-1), minlength=layer.n_in)
                    A[layer.name] = A[layer.name] + counts.to(self.problem.dtype)
                    A[layer.name] = A[layer.name].to(self.problem.device)
                    for col in cols:
                        g = col[layer.name]
                        G[layer.name] = G[layer.name] + c * torch.einsum("nro,nrp->op", g, g)
                    continue
                A[layer.name] = A[layer.name] + torch.einsum("nri,nrj->ij", a, a)
                for col in cols:
                    g = col[layer.name]
                    G[layer.name] = G[layer.name] + c * torch.einsum("nro,nrp->op", g, g)
        N = self.problem.num_samples
        if self.problem.group.active:
            # every rank must hold a tensor per layer, also one that evaluated no batch
            A, G, R = self._share_factors(layers, A, G, R)
        return {
            layer.name: (A[layer.name] / (N * R[layer.name]), G[layer.name]) for layer in layers
        }

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
        rows = p.reduce([R.get(n, 0) for n in names], op="max")  # positions per sample
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
            if layer.weight:
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
                parts[layer.weight] = r[..., : layer.n_in]
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
        emb = [layer.name for layer in self.layers if layer.embedding]
        if emb:
            raise UnsupportedModelError(
                f"the {self.name} matrix does not support Embedding layers yet (layer "
                f"{emb[0]!r}); use kfac, or select other parameters.",
                matrix=self.name,
                layer=emb[0],
            )
        factors = self.factors()
        bases = {}
        for layer in self.layers:
            A, G = factors[layer.name]
            bases[layer.name] = (torch.linalg.eigh(G)[1], torch.linalg.eigh(A)[1])
        key = {layer.name: (layer.name, tuple(layer.index())) for layer in self.layers}
        todo = [layer for layer in self.layers if key[layer.name] not in self._shared["S"]]
        if todo:
            S = {layer.name: 0.0 for layer in todo}
            for c, acts, cols in self._passes(todo):
                for layer in todo:
                    qg, qa = bases[layer.name]
                    a = acts[layer.name][..., layer.index()] @ qa
                    for col in cols:
                        gam = torch.einsum("nro,nrm->nom", col[layer.name] @ qg, a)
                        S[layer.name] = S[layer.name] + c * (gam * gam).sum(0)
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
        return qg @ (D * (qg.T @ X @ qa)) @ qa.T


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
