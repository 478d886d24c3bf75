r"""The positive-curvature Hessian (PCH) of Chen et al. 2018 (EA-CG) for MLPs.

Chen, Chen, Tsai, Lin, "Efficient approximation of the Hessian for neural networks" (eq. 4-8),
with the corrections of FINDINGS.md section 2: the weight block for torch's row-major
flattening of ``W`` is :math:`H_b \otimes h h^T` (the paper's :math:`h h^T \otimes H_b` is for
column-major ``vec``), and the already-modified (hatted) matrix is carried down the recursion
(the literal eq. 8b, which feeds the unmodified one, is not PSD).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch
import torch.nn.functional as F
from torch import nn

from .._errors import OptionError, UnsupportedModelError
from ..problem import Batch, Problem
from ._base import CurvatureOperator
from ._outputs import LossView, per_term_scale, refuse_train_mode

__all__ = [
    "ELEMENTWISE_ACTIVATIONS",
    "PCHApproximation",
    "PCHMode",
    "PCHOperator",
    "activation_derivatives",
    "mlp_chain",
]

ELEMENTWISE_ACTIVATIONS = (
    nn.Tanh,
    nn.Sigmoid,
    nn.ReLU,
    nn.LeakyReLU,
    nn.ELU,
    nn.CELU,
    nn.SELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Softplus,
    nn.Softsign,
    nn.Tanhshrink,
    nn.Hardtanh,
    nn.ReLU6,
    nn.LogSigmoid,
    nn.Identity,
)
"""Activation modules treated as elementwise (derivatives by autograd, elementwise)."""


class PCHMode(str, Enum):
    """How eigenvalues are made non-negative: ``abs`` (PCH-1) or ``clip`` (PCH-2)."""

    ABS = "abs"
    CLIP = "clip"


class PCHApproximation(str, Enum):
    """Per-sample blocks averaged (``per-sample``) or the paper's eq. 8 (``expectation``)."""

    EXPECTATION = "expectation"
    PER_SAMPLE = "per-sample"


@dataclass
class _Layer:
    name: str
    module: nn.Linear
    acts: list[nn.Module]


def mlp_chain(model: nn.Module, matrix: str, loss_name: str) -> tuple[bool, list[_Layer]]:
    """The model as a chain of Linear layers, each followed by elementwise activations.

    Returns ``(flatten_first, layers)``. A leading ``Flatten`` and, with ``nll``, a trailing
    ``LogSoftmax`` are allowed.

    Raises:
        UnsupportedModelError: naming the first module that is not Linear or elementwise.
    """
    leaves = [(n, m) for n, m in model.named_modules() if not list(m.children())]
    layers: list[_Layer] = []
    flatten = False
    for i, (name, m) in enumerate(leaves):
        if isinstance(m, nn.Linear):
            layers.append(_Layer(name, m, []))
        elif isinstance(m, nn.Flatten) and not layers and i == 0:
            flatten = True
        elif isinstance(m, nn.LogSoftmax) and loss_name == "nll" and i == len(leaves) - 1:
            pass
        elif isinstance(m, ELEMENTWISE_ACTIVATIONS) and layers:
            layers[-1].acts.append(m)
        else:
            raise UnsupportedModelError(
                f"the {matrix} matrix needs an MLP of Linear layers and elementwise "
                f"activations; layer {name or 'model'!r} ({type(m).__name__}) stops it.",
                matrix=matrix,
            )
    if not layers:
        raise UnsupportedModelError(
            f"the {matrix} matrix needs an MLP; this model has no Linear.", matrix=matrix
        )
    return flatten, layers


def activation_derivatives(acts: list[nn.Module], z: torch.Tensor):
    """``(sigma(z), sigma'(z), sigma''(z))`` of the composed elementwise activations."""

    def f(u: torch.Tensor) -> torch.Tensor:
        for a in acts:
            u = a(u)
        return u

    def d1(u: torch.Tensor) -> torch.Tensor:
        return torch.func.grad(lambda v: f(v).sum())(u)

    s1 = d1(z)
    s2 = torch.func.grad(lambda v: d1(v).sum())(z)
    return f(z), s1, s2


class PCHOperator(CurvatureOperator):
    r"""Chen et al.'s positive-curvature Hessian, block-diagonal with one block per tensor.

    Per sample ``i`` (FINDINGS.md section 2, corrected eq. 4 and 8), with :math:`g^t` the
    per-sample loss gradient w.r.t. the output of Linear layer ``t`` (its bias) and
    :math:`s', s''` the activation derivatives at that layer's output:

    .. math::
        H_b^k = \mathrm{Pos}(\nabla^2_f \ell_i), \qquad
        H_b^{t-1} = \mathrm{diag}(s') W_t^T H_b^t W_t \mathrm{diag}(s')
                   + \mathrm{Pos}(\mathrm{diag}(s'' \odot (W_t^T g^t))),

    bias block :math:`H_b^t` and weight block :math:`H_b^t \otimes h^{t-1} h^{t-1,T}` for
    torch's row-major flattening of :math:`W_t` (``[out, in]``). ``Pos`` takes absolute values
    (``mode="abs"``, PCH-1) or positive parts (``mode="clip"``, PCH-2) of the eigenvalues of
    the matrix at the top and elementwise of the diagonal term, and the modified matrix is
    carried down, so every block is PSD.

    ``approximation="per-sample"`` sums the per-sample blocks: :math:`c \sum_i` (``c`` = 1/N
    for mean, 1 for sum, like the Hessian). With ``Pos`` the identity this is exactly the
    Hessian's per-tensor diagonal blocks; for ReLU (``s'' = 0``) the GGN's.

    ``approximation="expectation"`` is the paper's eq. 8 with expectations
    :math:`E = \frac1N \sum_i` over the samples:

    .. math::
        \hat H^k = \mathrm{Pos}(E[\nabla^2_f \ell_i]), \quad
        \hat H^{t-1} = (W_t^T \hat H^t W_t) \odot E[s' s'^T]
                     + \mathrm{Pos}(\mathrm{diag}(E[s'' \odot (W_t^T g_i^t)])),

    bias block :math:`cN \hat H^t`, weight block :math:`cN\, \hat H^t \otimes E[h h^T]`; the
    factors are computed in one pass at construction and products use only these small
    dense blocks. Per-sample blocks are computed per batch on each product (cached while
    :math:`\sum_t N (n_t^2 + n_{t-1})` numbers stay under ``cache_limit``).

    A trailing activation after the last Linear is handled by the same recursion; a trailing
    ``LogSoftmax`` with ``nll`` is part of the loss (cross-entropy on its input).

    Args:
        problem: an MLP (any module whose leaf modules, in order, are Linear layers and
            elementwise activations, optionally a leading Flatten), its loss and data.
        mode: ``abs`` or ``clip``.
        approximation: ``expectation`` or ``per-sample``.
        cache_limit: numbers kept for per-sample blocks between products.

    Raises:
        UnsupportedModelError: naming the first layer that is not Linear or elementwise, when
            the model's forward is not that chain, or for ``per-sample`` in train mode.
        OptionError: for an unknown mode or approximation.
    """

    name = "pch"

    def __init__(
        self,
        problem: Problem,
        *,
        mode: str | PCHMode = PCHMode.ABS,
        approximation: str | PCHApproximation = PCHApproximation.EXPECTATION,
        cache_limit: int = 2**26,
        _pos: str | None = None,
    ) -> None:
        try:
            mode = PCHMode(mode)
            approximation = PCHApproximation(approximation)
        except ValueError as exc:
            raise OptionError(
                f"PCH option not known ({exc}); modes: abs, clip; approximations: "
                "expectation, per-sample."
            ) from None
        suffix = "-persample" if approximation is PCHApproximation.PER_SAMPLE else ""
        self.name = f"pch-{mode.value}{suffix}"
        super().__init__(
            problem, mode=mode, approximation=approximation, cache_limit=cache_limit, _pos=_pos
        )
        if approximation is PCHApproximation.PER_SAMPLE:
            refuse_train_mode(problem, self.name)
        self.mode = mode
        self.approximation = approximation
        # ``_pos="identity"`` (tests only) turns Pos off: per-sample then gives the exact
        # diagonal Hessian blocks.
        self._pos_kind = _pos or mode.value
        self.cache_limit = int(cache_limit)
        self.view = LossView(problem, self.name)
        self.flatten, self.layers = mlp_chain(problem.model, self.name, problem.loss_name)
        self._check_chain()
        owner = {}
        for layer in self.layers:
            for pname, _ in layer.module.named_parameters(recurse=False):
                full = f"{layer.name}.{pname}" if layer.name else pname
                owner[full] = (layer, pname)
        self._owner = owner
        self._cache: dict[int, list] = {}
        self._expect: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
        if approximation is PCHApproximation.EXPECTATION:
            self._expect = self._expectation_blocks()

    # ------------------------------------------------------------------ structure
    def _weights(self) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        p = self.problem
        out = []
        for layer in self.layers:
            prefix = f"{layer.name}." if layer.name else ""
            w = p.params.get(prefix + "weight", layer.module.weight).detach()
            b = layer.module.bias
            b = None if b is None else p.params.get(prefix + "bias", b).detach()
            out.append((w, b))
        return out

    def _chain(self, x: torch.Tensor):
        """Forward through the chain: per layer (input h, pre-activation z), and the output."""
        weights = self._weights()
        h = x.reshape(x.shape[0], -1) if self.flatten else x
        record = []
        for layer, (w, b) in zip(self.layers, weights, strict=True):
            z = F.linear(h, w, b)
            record.append((h, z))
            h = z
            for a in layer.acts:
                h = a(h)
        return record, h

    def _check_chain(self) -> None:
        p = self.problem
        batch = next(iter(p.batches()))
        if batch.x.dim() != 2 and not self.flatten:
            raise UnsupportedModelError(
                f"the {self.name} matrix needs inputs of shape [N, features]; got "
                f"{tuple(batch.x.shape)} (add a leading nn.Flatten to the model).",
                matrix=self.name,
            )
        with torch.no_grad(), p.mode():
            want = self.view.forward(dict(p.params), batch.x)
            _, got = self._chain(batch.x)
        if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-5, atol=1e-6):
            raise UnsupportedModelError(
                f"the {self.name} matrix needs a model whose forward is the chain of its "
                "Linear and activation modules in order; this model computes something else "
                "(functional activations or skip connections?).",
                matrix=self.name,
            )

    # ------------------------------------------------------------------ Pos
    def _pos_sym(self, M: torch.Tensor) -> torch.Tensor:
        if self._pos_kind == "identity":
            return M
        lam, Q = torch.linalg.eigh(M)
        lam = lam.abs() if self._pos_kind == "abs" else lam.clamp(min=0)
        return (Q * lam.unsqueeze(-2)) @ Q.transpose(-1, -2)

    def _pos_diag(self, d: torch.Tensor) -> torch.Tensor:
        if self._pos_kind == "identity":
            return d
        return d.abs() if self._pos_kind == "abs" else d.clamp(min=0)

    # ------------------------------------------------------------------ per-sample
    def _per_sample(self, batch: Batch) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (bottom to top): per-sample bias blocks ``[n, o, o]`` and inputs ``[n, i]``."""
        with torch.no_grad(), self.problem.mode():
            record, out = self._chain(batch.x)
            M = self._pos_sym(self.view.dense_hessians(out, batch.y))
            g = self.view.dense_gradients(out, batch.y)
            blocks = []
            weights = self._weights()
            for t in reversed(range(len(self.layers))):
                h, z = record[t]
                if self.layers[t].acts:
                    _, s1, s2 = activation_derivatives(self.layers[t].acts, z)
                    M = s1.unsqueeze(-1) * M * s1.unsqueeze(-2)
                    M = M + torch.diag_embed(self._pos_diag(s2 * g))
                    g = s1 * g
                blocks.append((M, h))
                w = weights[t][0]
                M = w.T @ M @ w
                g = g @ w
        return blocks[::-1]

    def _batch_blocks(self, index: int, batch: Batch):
        if index in self._cache:
            return self._cache[index]
        blocks = self._per_sample(batch)
        p = self.problem
        size = sum(p.num_samples * (m.shape[1] ** 2 + h.shape[1]) for m, h in blocks)
        if size <= self.cache_limit:
            self._cache[index] = blocks
        return blocks

    # ------------------------------------------------------------------ expectation
    def _expectation_blocks(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        p = self.problem
        L = len(self.layers)
        sums: dict[str, list] = {"H": [0.0], "ss": [0.0] * L, "d": [0.0] * L, "hh": [0.0] * L}
        weights = self._weights()
        with torch.no_grad(), p.mode():
            for batch in p.batches():
                record, out = self._chain(batch.x)
                sums["H"][0] = sums["H"][0] + self.view.dense_hessians(out, batch.y).sum(0)
                g = self.view.dense_gradients(out, batch.y)
                for t in reversed(range(L)):
                    h, z = record[t]
                    if self.layers[t].acts:
                        _, s1, s2 = activation_derivatives(self.layers[t].acts, z)
                        sums["ss"][t] = sums["ss"][t] + s1.T @ s1
                        sums["d"][t] = sums["d"][t] + (s2 * g).sum(0)
                        g = s1 * g
                    sums["hh"][t] = sums["hh"][t] + h.T @ h
                    g = g @ weights[t][0]
        if p.group.active:
            sums = p.reduce(self._zero_sums(sums))
        N = p.num_samples
        # c N with c the weight of one term: N/T (mean; 1 when every sample is one term) or N
        scale = N / p.num_terms if p.reduction == "mean" else float(N)
        M = self._pos_sym(sums["H"][0] / N)
        result = {}
        for t in reversed(range(L)):
            if self.layers[t].acts:
                M = M * (sums["ss"][t] / N) + torch.diag(self._pos_diag(sums["d"][t] / N))
            result[self.layers[t].name] = (scale * M, sums["hh"][t] / N)
            w = weights[t][0]
            M = w.T @ M @ w
        return result

    def _zero_sums(self, sums: dict[str, list]) -> dict[str, list]:
        """The expectation's sums with tensors of zeros where this rank saw no batch."""
        p = self.problem
        weights = self._weights()
        like = {"ss": [], "d": [], "hh": []}
        for w, _ in weights:
            out_dim, in_dim = w.shape
            like["ss"].append((out_dim, out_dim))
            like["d"].append((out_dim,))
            like["hh"].append((in_dim, in_dim))
        k = weights[-1][0].shape[0]
        shapes = {"H": [(k, k)], **like}

        def fill(value, shape):
            if isinstance(value, torch.Tensor):
                return value
            return torch.zeros(shape, dtype=p.dtype, device=p.device)

        return {
            key: [fill(v, shape) for v, shape in zip(vals, shapes[key], strict=True)]
            for key, vals in sums.items()
        }

    # ------------------------------------------------------------------ products
    def _data_matmat(self, V: torch.Tensor) -> torch.Tensor:
        p = self.problem
        k = V.shape[1]
        parts = p.unflatten(V)
        outs = {n: torch.zeros_like(t) for n, t in parts.items()}
        index_of = {layer.name: t for t, layer in enumerate(self.layers)}
        if self._expect is not None:
            for n, t in parts.items():
                layer, kind = self._owner[n]
                M, hh = self._expect[layer.name]
                if kind == "bias":
                    outs[n] = t @ M
                else:
                    outs[n] = M @ t @ hh
        else:
            for i, batch in enumerate(p.batches()):
                c = per_term_scale(p, batch)
                blocks = self._batch_blocks(i, batch)
                for n, t in parts.items():
                    layer, kind = self._owner[n]
                    M, h = blocks[index_of[layer.name]]
                    if kind == "bias":
                        outs[n] += c * torch.einsum("nab,kb->ka", M, t)
                    else:
                        u = torch.einsum("kbc,nc->nkb", t, h)
                        u = torch.einsum("nab,nkb->nka", M, u)
                        outs[n] += c * torch.einsum("nka,nd->kad", u, h)
        out = torch.cat([outs[n].reshape(k, -1) for n in p.names], dim=1).T
        # the expectation form is computed from summed statistics, the same on every rank
        return out if self._expect is not None else p.reduce(out)

    def _with_problem(self, problem: Problem) -> CurvatureOperator:
        new = type(self)(problem, **self._knobs)
        return new
