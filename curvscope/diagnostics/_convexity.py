r"""The sign-based convexity certificate (Veitch Thm 4.1, sign corrected; FINDINGS.md 1).

For hidden layer :math:`l` with pre-activation :math:`Z = W h + b`, output
:math:`X = \sigma(Z)` and per-sample :math:`\delta_i = \partial L / \partial X_i`, the diagonal
block of the Hessian for :math:`(W_l, b_l)` is exactly (Chen eq. 4b, Veitch eq. 66-70)

.. math::
    \sum_i J_i^T \big[ D'_i W_{l+1}^T H_Z^{[l+1](i)} W_{l+1} D'_i
    + \mathrm{diag}(\sigma''(Z_i) \odot \delta_i) \big] J_i .

It is PSD when :math:`\sigma''(Z) \odot \partial L/\partial X \ge 0` for every sample and unit
of this layer *and of every hidden layer above it* (the upper layers' terms are carried down
through :math:`H_Z^{[l+1]}`), and the loss is convex in the network outputs. For sigmoid and
tanh (:math:`\sigma'' < 0` for :math:`z > 0`) that is :math:`\mathrm{sign}(Z) =
-\mathrm{sign}(\partial L/\partial Z)`: the paper's eq. 32 prints the opposite sign, and we
built weights where the printed condition holds everywhere and the block has eigenvalues down
to -0.5. The certificate covers that layer's diagonal block at these weights only, never the
whole Hessian (cross-layer blocks can still make it indefinite), and never convexity of L.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .._errors import UnsupportedModelError
from .._sampling import as_generator
from ..linalg import eigsh
from ..operators import HessianOperator, activation_derivatives, mlp_chain
from ..problem import Problem

__all__ = ["CONVEX_OUTPUT_LOSSES", "ConvexityLayer", "ConvexityResult", "convexity_certificate"]

CONVEX_OUTPUT_LOSSES = ("cross_entropy", "mse", "bce_with_logits", "nll")
"""Losses convex in the network outputs (nll: with the final LogSoftmax as part of the loss)."""

_PIECEWISE_LINEAR = (nn.ReLU, nn.LeakyReLU, nn.ReLU6, nn.Hardtanh, nn.Identity)

NEGATIVE_TOLERANCE = 100
"""A certified block may show eigenvalues down to -100 eps ||block|| beyond the residual."""


@dataclass(frozen=True)
class ConvexityLayer:
    """The certificate for one hidden layer (named after its Linear module)."""

    name: str
    activation: str
    fraction_satisfied: float
    fraction_satisfied_as_printed: float
    certified: bool
    min_eigenvalue: float | None
    min_eigenvalue_residual: float | None
    second_term_vanishes: bool
    condition_holds: bool


@dataclass(frozen=True)
class ConvexityResult:
    """The ``convexity`` entry of ``results.checks`` (a certificate: ``passed`` is null)."""

    name: str = "convexity"
    passed: None = None
    reason: str = ""
    layers: list[ConvexityLayer] = field(default_factory=list)
    num_matvecs: int = 0


def _activation_name(acts: list[nn.Module]) -> str:
    return "+".join(type(a).__name__ for a in acts) if acts else "identity"


def convexity_certificate(
    problem: Problem,
    *,
    eigen_tol: float = 1e-6,
    max_iter: int | None = None,
    seed: int | torch.Generator = 0,
) -> ConvexityResult:
    r"""Fractions of :math:`\sigma''(Z)\,\partial L/\partial X \ge 0`, certificate and check.

    Args:
        problem: an MLP of Linear layers and elementwise activations.
        eigen_tol: tolerance of the Lanczos cross-check of each block's smallest eigenvalue.
        max_iter: Lanczos step limit for the cross-check.
        seed: start vectors of the cross-check (an int or a generator).

    Returns:
        The certificate, or an entry whose ``reason`` names the layer that stops it.
    """
    try:
        flatten, chain = mlp_chain(problem.model, "convexity certificate", problem.loss_name)
    except UnsupportedModelError as exc:
        return ConvexityResult(
            reason=str(exc).replace("the convexity certificate matrix", "the convexity certificate")
        )
    if problem.train_mode:
        return ConvexityResult(
            reason="the certificate is per sample and refuses --train-mode "
            "(BatchNorm batch statistics couple the samples)."
        )
    hidden = chain[:-1]
    if not hidden:
        return ConvexityResult(
            reason="the model has no hidden layer (a single Linear layer): "
            "its Hessian is that of a convex loss in a linear model."
        )
    params = dict(problem.model.named_parameters())
    counts = {"ok": [0] * len(hidden), "printed": [0] * len(hidden), "total": [0] * len(hidden)}
    holds_everywhere = [True] * len(hidden)
    dtype = problem.dtype
    for batch in problem.batches():
        x = batch.x.flatten(1) if flatten else batch.x
        zs, xs = [], []
        h = x
        with problem.mode():
            for t, layer in enumerate(chain):
                w = params[f"{layer.name}.weight"].detach()
                bname = f"{layer.name}.bias"
                z = h @ w.T + (params[bname].detach() if bname in params else 0)
                if t < len(hidden):
                    if not z.requires_grad:  # the first layer: make the graph start here
                        z = z.requires_grad_(True)
                    zs.append(z)
                    xout = z
                    for a in layer.acts:
                        xout = a(xout)
                    xs.append(xout)
                    h = xout
                else:
                    for a in layer.acts:
                        z = a(z)
                    h = z
            out = h
            if problem.loss_name == "nll" and isinstance(
                list(problem.model.modules())[-1], nn.LogSoftmax
            ):
                out = torch.log_softmax(out, dim=-1)
            loss = problem.loss_fn(out, batch.y, "sum")
            grads = torch.autograd.grad(loss, [*xs, *zs])
            dx, dz = grads[: len(xs)], grads[len(xs) :]
        for t, layer in enumerate(hidden):
            _, _, s2 = activation_derivatives(layer.acts, zs[t].detach().to(dtype))
            term = s2 * dx[t]
            ok = term >= 0
            counts["ok"][t] += int(ok.sum())
            counts["printed"][t] += int((torch.sign(zs[t].detach()) == torch.sign(dz[t])).sum())
            counts["total"][t] += ok.numel()
            holds_everywhere[t] = holds_everywhere[t] and bool(ok.all())
    if problem.group.active:  # counts over every rank's batches
        fails = [0 if h else 1 for h in holds_everywhere]
        counts, fails = problem.reduce([counts, fails])
        holds_everywhere = [f == 0 for f in fails]
    convex_loss = problem.loss_name in CONVEX_OUTPUT_LOSSES
    H = HessianOperator(problem)
    gen = as_generator(seed)
    layers = []
    matvecs = 0
    for t, layer in enumerate(hidden):
        above = all(holds_everywhere[t:])
        certified = bool(above and convex_loss)
        block = H.block(layer.name)
        (res,) = eigsh(block, top=0, bottom=1, tol=eigen_tol, max_matvecs=max_iter, seed=gen)
        matvecs += res.num_matvecs
        layers.append(
            ConvexityLayer(
                name=layer.name,
                activation=_activation_name(layer.acts),
                fraction_satisfied=counts["ok"][t] / max(counts["total"][t], 1),
                fraction_satisfied_as_printed=counts["printed"][t] / max(counts["total"][t], 1),
                certified=certified,
                min_eigenvalue=float(res.eigenvalues[0]),
                min_eigenvalue_residual=float(res.residual_norms[0]),
                second_term_vanishes=all(isinstance(a, _PIECEWISE_LINEAR) for a in layer.acts),
                condition_holds=holds_everywhere[t],
            )
        )
    reason = (
        "certificate for each hidden layer's diagonal Hessian block at these weights (not the "
        "whole Hessian: cross-layer blocks are not covered); condition sigma''(Z) * dL/dX >= 0 "
        "(Veitch eq. 32 with its sign corrected)"
    )
    if not convex_loss:
        reason += (
            f"; the loss {problem.loss_name} is not convex in the outputs, so no block is certified"
        )
    return ConvexityResult(reason=reason, layers=layers, num_matvecs=matvecs)
