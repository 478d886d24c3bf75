"""The loss each tiny HuggingFace model was trained with, written out, and its dense truth.

Never taken from curvscope: next-token cross-entropy over non-ignored targets for causal
LMs, masked-token cross-entropy for the masked LM, target-token cross-entropy for the
seq2seq model, sample cross-entropy for the image classifier; means over all terms of all
batches. Dense Hessians by double backward, the GGN from per-batch Jacobians and the
softmax output Hessian written out here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .hf_models import CAUSAL
from .truth import hessian_by_double_backward, unflattener


def _logits_and_targets(kind, model, params, batch):
    if isinstance(batch, (tuple, list)):  # a token file's window pair: next tokens given
        x, y = batch
        return torch.func.functional_call(model, params, (), {"input_ids": x}).logits, y
    b = dict(batch)
    labels = b.pop("labels")
    if kind == "t5":
        out = torch.func.functional_call(model, params, (), {**b, "labels": labels})
    else:
        out = torch.func.functional_call(model, params, (), b)
    logits = out.logits
    if kind in CAUSAL:
        return logits[:, :-1], labels[:, 1:]
    return logits, labels


def loss_fn(kind, model, batches):
    """``f(flat w)``: the training loss over all batches, and ``w``."""
    unflat, w = unflattener(model)

    def f(flat):
        ps = unflat(flat)
        total, terms = 0.0, 0
        for b in batches:
            logits, y = _logits_and_targets(kind, model, ps, b)
            total = total + F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum",
                ignore_index=-100)
            terms += int((y != -100).sum())
        return total / terms

    return f, w, unflat


def dense_hessian(kind, model, batches):
    f, w, _ = loss_fn(kind, model, batches)
    return hessian_by_double_backward(f, w)


def dense_ggn(kind, model, batches):
    """sum_b J_b^T H_b J_b / terms, H_b = diag(p) - p p^T at each non-ignored position."""
    _, w, unflat = loss_fn(kind, model, batches)
    terms = 0
    G = torch.zeros(w.numel(), w.numel(), dtype=w.dtype)
    for b in batches:
        def logits_of(flat, b=b):
            lg, _ = _logits_and_targets(kind, model, unflat(flat), b)
            return lg.reshape(-1, lg.shape[-1])

        _, y = _logits_and_targets(kind, model, unflat(w), b)
        y = y.reshape(-1)
        keep = y != -100
        terms += int(keep.sum())
        J = torch.autograd.functional.jacobian(logits_of, w)  # [R, C, P]
        z = logits_of(w).detach()
        p = torch.softmax(z, -1) * keep[:, None]
        Hout = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
        G += torch.einsum("rcp,rcd,rdq->pq", J, Hout, J)
    return G / terms
