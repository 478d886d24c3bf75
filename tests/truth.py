"""Dense float64 ground truth with torch.func on the concatenated data (STYLE.md section 5)."""

from __future__ import annotations

import torch

from curvscope._losses import get_loss

from .cases import RTOL, concat


def full_loss_fn(model, loss, data, reduction, names, weight_decay=0.0):
    """L(flat w) over the concatenated data: the definition, not the implementation."""
    x, y = concat(data)
    params = dict(model.named_parameters())
    shapes = [params[n].shape for n in names]
    numels = [params[n].numel() for n in names]
    fn = get_loss(loss)

    def f(flat):
        ps, i = {}, 0
        for n, s, k in zip(names, shapes, numels, strict=True):
            ps[n] = flat[i : i + k].reshape(s)
            i += k
        out = torch.func.functional_call(model, ps, (x,))
        value = fn(out, y, reduction)
        return value + 0.5 * weight_decay * (flat * flat).sum()

    w = torch.cat([params[n].detach().reshape(-1) for n in names])
    return f, w


def dense_hessian(model, loss, data, reduction, names=None, weight_decay=0.0):
    """The dense Hessian of the full-data loss with respect to ``names`` (default: all)."""
    names = names or [n for n, _ in model.named_parameters()]
    was = model.training
    model.eval()
    try:
        f, w = full_loss_fn(model, loss, data, reduction, names, weight_decay)
        return torch.func.hessian(f)(w).detach()
    finally:
        model.train(was)


def assert_close(actual, expected, rtol=RTOL, what="value"):
    """Compare with atol scaled by the largest expected entry; print mismatches first."""
    actual = torch.as_tensor(actual, dtype=torch.float64)
    expected = torch.as_tensor(expected, dtype=torch.float64)
    scale = max(float(expected.abs().max()), 1e-300)
    err = (actual - expected).abs()
    bad = err > rtol * scale
    if bad.any():
        idx = bad.nonzero()[:10].tolist()
        rows = [
            f"  {i}: got {float(actual[tuple(i)]):.17g} want {float(expected[tuple(i)]):.17g}"
            for i in idx
        ]
        raise AssertionError(
            f"{what}: {int(bad.sum())} entries differ by more than {rtol:.1e} x {scale:.3e} "
            f"(max {float(err.max()):.3e}):\n" + "\n".join(rows)
        )


def hessian_by_double_backward(f, w):
    """Dense Hessian of ``f`` at ``w``, one autograd double backward per row.

    torch.func's ``hessian``/``jacrev(jacrev(.))`` is wrong through LayerNorm and train-mode
    BatchNorm when both the input and the affine weights are differentiated (vmap over the
    norms' backward; functorch issue #534, seen in torch 2.13: 10-30% off), so sequence models
    use this instead, cross-checked against central differences of the gradient.
    """
    w = w.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(f(w), w, create_graph=True)
    rows = [torch.autograd.grad(g[i], w, retain_graph=True)[0] for i in range(w.numel())]
    return torch.stack(rows).detach()


def unflattener(model):
    """``(unflat, w)``: ``unflat(flat)`` gives ``{name: tensor}`` of ``model``'s parameters in
    ``named_parameters()`` order, ``w`` their current values, flat."""
    named = list(model.named_parameters())
    shapes = [(n, p.shape, p.numel()) for n, p in named]

    def unflat(flat):
        out, i = {}, 0
        for n, shape, k in shapes:
            out[n] = flat[i : i + k].reshape(shape)
            i += k
        return out

    return unflat, torch.cat([p.detach().reshape(-1) for _, p in named])
