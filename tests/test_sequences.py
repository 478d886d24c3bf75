"""Sequence models against dense float64 truth: a tiny transformer with dict batches, attention
masks, padding and ignored targets, and a tiny LSTM with tuple batches of unequal sizes.

Truth is the definition: every sequence unpadded, one at a time, its token losses summed and
divided by the number of tokens that are loss terms in the whole data set.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from curvscope.cli import app
from curvscope.io import save_checkpoint
from curvscope.models import CharLSTM, TinyGPT
from curvscope.operators import (
    EmpiricalFisherOperator,
    FisherOperator,
    GGNOperator,
    HessianOperator,
)
from curvscope.problem import Problem

from .truth import assert_close, hessian_by_double_backward

IGNORE = -100
ARCH = {
    "type": "tiny-gpt",
    "vocab_size": 5,
    "block_size": 6,
    "n_layer": 1,
    "n_head": 2,
    "n_embd": 4,
}


def _gpt():
    torch.manual_seed(0)
    model = TinyGPT(5, 6, 1, 2, 4).double()
    with torch.no_grad():  # GPT-2 init is tiny (std 0.02): spread the weights out
        for p in model.parameters():
            # float32-representable, so a checkpoint (stored in float32) holds these exactly
            p.copy_((p + 0.3 * torch.randn_like(p)).float().double())
    return model


def _sequences():
    g = torch.Generator().manual_seed(1)
    lengths = [6, 4, 3, 5, 2]
    seqs = [torch.randint(0, 5, (n,), generator=g) for n in lengths]
    labels = [s.clone() for s in seqs]
    labels[1][2] = IGNORE  # an ignored target inside a real sequence
    return seqs, labels


def _pad(seqs, labels, left: bool):
    T = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), T, dtype=torch.long)
    lab = torch.full((len(seqs), T), IGNORE, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, (s, y) in enumerate(zip(seqs, labels, strict=True)):
        sl = slice(T - len(s), T) if left else slice(0, len(s))
        ids[i, sl], lab[i, sl], mask[i, sl] = s, y, 1
        # labels are taken as given (HuggingFace's rule): a sequence's first token is no
        # target of the unpadded truth, so its label says so (after left padding a pad
        # position would otherwise predict it)
        lab[i, sl.start] = IGNORE
    return {"input_ids": ids, "attention_mask": mask, "labels": lab}


def _gpt_batches():
    seqs, labels = _sequences()
    # unequal batches: two right-padded sequences, then three left-padded ones
    return [_pad(seqs[:2], labels[:2], left=False), _pad(seqs[2:], labels[2:], left=True)]


def _flat(model):
    names = [n for n, _ in model.named_parameters()]
    params = dict(model.named_parameters())
    shapes = [params[n].shape for n in names]
    w = torch.cat([params[n].detach().reshape(-1) for n in names])

    def unflat(flat):
        out, i = {}, 0
        for n, s in zip(names, shapes, strict=True):
            k = int(torch.Size(s).numel())
            out[n] = flat[i : i + k].reshape(s)
            i += k
        return out

    return unflat, w


def _gpt_truth(model):
    """Loss, per-sequence token logits and targets, all unpadded, from the definition."""
    seqs, labels = _sequences()
    unflat, w = _flat(model)
    terms = sum(int((y[1:] != IGNORE).sum()) for y in labels)

    def per_seq(flat):
        out = []
        for s, y in zip(seqs, labels, strict=True):
            logits = torch.func.functional_call(model, unflat(flat), (s[None],))[0]
            out.append((logits[:-1], y[1:]))
        return out

    def loss(flat):
        return (
            sum(
                F.cross_entropy(lg, y, ignore_index=IGNORE, reduction="sum")
                for lg, y in per_seq(flat)
            )
            / terms
        )

    return loss, per_seq, w, terms


def _dense_ggn(logits_of, targets, w, terms):
    """(1/T) sum over terms J^T (diag p - p p^T) J, Jacobians by jacrev."""
    G = torch.zeros(w.numel(), w.numel(), dtype=torch.float64)
    for i, y in enumerate(targets):
        J = torch.func.jacrev(lambda f, i=i: logits_of(f)[i])(w)  # [L, V, P]
        lg = logits_of(w)[i].detach()
        p = torch.softmax(lg, -1)
        for t in range(lg.shape[0]):
            if int(y[t]) == IGNORE:
                continue
            Hout = torch.diag(p[t]) - torch.outer(p[t], p[t])
            G += J[t].T @ Hout @ J[t]
    return G / terms


@pytest.fixture(scope="module")
def gpt():
    model = _gpt()
    problem = Problem(model, "causal_lm", _gpt_batches(), reduction="mean")
    loss, per_seq, w, terms = _gpt_truth(model)
    H = hessian_by_double_backward(loss, w)
    # the double-backward truth agrees with central differences of the gradient
    v = torch.randn(w.numel(), dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    g = torch.func.grad(loss)
    fd = (g(w + 1e-5 * v) - g(w - 1e-5 * v)) / 2e-5
    assert float(torch.linalg.vector_norm(H @ v - fd) / torch.linalg.vector_norm(fd)) < 1e-8
    targets = [y for _, y in per_seq(w)]
    G = _dense_ggn(lambda f: [lg for lg, _ in per_seq(f)], targets, w, terms)
    return problem, loss, per_seq, w, terms, H, G


def test_padded_dict_batches_give_the_unpadded_loss(gpt):
    problem, loss, _, w, terms, _, _ = gpt
    assert problem.num_terms == terms
    assert problem.batch_terms == [7, 7]  # 5 + 2 (one ignored) and 2 + 4 + 1
    assert_close(problem.loss(), loss(w), what="loss")
    value, grad = problem.loss_and_grad()
    assert_close(grad, torch.func.grad(loss)(w), what="gradient")


def test_transformer_hessian_ggn_fisher_products(gpt):
    problem, _, _, _, _, H, G = gpt
    V = torch.randn(
        problem.num_params, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2)
    )
    assert_close(HessianOperator(problem) @ V, H @ V, what="Hessian @ V")
    assert_close(
        HessianOperator(problem, mode="forward-over-reverse") @ V,
        H @ V,
        what="jvp-of-grad Hessian @ V",
    )
    assert_close(GGNOperator(problem) @ V, G @ V, what="GGN @ V")
    assert_close(GGNOperator(problem) @ V[:, 0], G @ V[:, 0], what="GGN @ v")
    # softmax cross-entropy: the exact Fisher is the GGN
    assert_close(FisherOperator(problem) @ V, G @ V, what="Fisher @ V")


def test_transformer_empirical_fisher_weighs_each_sequence_by_its_terms(gpt):
    problem, _, per_seq, w, terms, _, _ = gpt
    ef = torch.zeros(w.numel(), w.numel(), dtype=torch.float64)
    for i in range(5):

        def mean_i(f, i=i):
            lg, y = per_seq(f)[i]
            return F.cross_entropy(lg, y, ignore_index=IGNORE)

        n_i = int((per_seq(w)[i][1] != IGNORE).sum())
        g = torch.func.grad(mean_i)(w)
        ef += (n_i / terms) * torch.outer(g, g)
    V = torch.randn(problem.num_params, 2, dtype=torch.float64)
    assert_close(EmpiricalFisherOperator(problem) @ V, ef @ V, what="empirical Fisher @ V")


def test_finite_difference_hvp_is_within_its_recorded_error(gpt):
    problem, _, _, _, _, H, _ = gpt
    op = HessianOperator(problem, mode="finite-difference")
    v = torch.randn(
        problem.num_params, dtype=torch.float64, generator=torch.Generator().manual_seed(3)
    )
    got = op @ v
    info = op.info
    assert info["hvp"] == "finite-difference" and info["step"] > 0
    bound = 10 * (info["truncation_estimate"] + info["roundoff_estimate"])
    err = float(torch.linalg.vector_norm(got - H @ v) / torch.linalg.vector_norm(H @ v))
    assert err <= bound, (err, info)
    assert err < 1e-6  # float64 central differences


def test_lanczos_through_the_cli_in_float64(gpt, tmp_path):
    problem, _, _, _, _, H, _ = gpt
    model = _gpt()
    save_checkpoint(tmp_path / "model.pt", model, ARCH, {"loss": "causal_lm"})
    batches = _gpt_batches()
    torch.save(batches, tmp_path / "batches.pt")
    (tmp_path / "source.py").write_text(
        "import torch\n"
        "def make():\n"
        f"    return torch.load({str(tmp_path / 'batches.pt')!r}, weights_only=True)\n"
    )
    res = CliRunner().invoke(
        app,
        [
            "spectrum",
            str(tmp_path / "model.pt"),
            "--data",
            f"{tmp_path / 'source.py'}:make",
            "--dtype",
            "float64",
            "--tol",
            "1e-10",
            "--top",
            "3",
            "--bottom",
            "2",
            "--out",
            str(tmp_path / "o"),
        ],
    )
    assert res.exit_code == 0, res.output
    doc = json.loads((tmp_path / "o" / "spectrum.json").read_text())
    lam = torch.linalg.eigvalsh(H)
    top, bottom = doc["results"]["spectra"]
    scale = float(lam.abs().max())
    assert scale > 0
    assert_close(top["eigenvalues"], lam.flip(0)[:3], rtol=1e-8, what="top")
    assert_close(bottom["eigenvalues"], lam[:2], rtol=1e-8, what="bottom")
    assert doc["input"]["data"]["num_terms"] == 14
    assert doc["input"]["files"]  # the data source's file is hashed


# ------------------------------------------------------------------------------- LSTM
def _lstm_case():
    torch.manual_seed(3)
    model = CharLSTM(5, 3, 4, 1).double()
    g = torch.Generator().manual_seed(4)
    x = torch.randint(0, 5, (7, 4), generator=g)
    y = torch.randint(0, 5, (7, 4), generator=g)
    y[2, 1] = IGNORE
    y[5, 3] = IGNORE
    batches = [(x[:3], y[:3]), (x[3:], y[3:])]
    return model, x, y, batches


def _lstm_truth(model, x, y):
    """``(loss, logits, w, terms)`` of the LSTM case from the definition: the mean over the
    positions that are not ignored, on all sequences at once."""
    unflat, w = _flat(model)
    terms = int((y != IGNORE).sum())

    def logits(flat):
        return torch.func.functional_call(model, unflat(flat), (x,))

    def loss(flat):
        out = logits(flat)
        return (
            F.cross_entropy(out.reshape(-1, 5), y.reshape(-1), ignore_index=IGNORE, reduction="sum")
            / terms
        )

    return loss, logits, w, terms


def test_lstm_hessian_and_ggn_against_dense_truth():
    model, x, y, batches = _lstm_case()
    problem = Problem(model, "cross_entropy", batches, reduction="mean")
    loss, logits, w, terms = _lstm_truth(model, x, y)
    assert problem.num_terms == terms

    H = hessian_by_double_backward(loss, w)
    J = torch.func.jacrev(logits)(w).reshape(-1, w.numel())  # [7*4*5, P]
    p = torch.softmax(logits(w).detach().reshape(-1, 5), -1)
    keep = (y.reshape(-1) != IGNORE).double()
    blocks = [torch.diag(pi) - torch.outer(pi, pi) for pi in p]
    Hout = torch.block_diag(*[b * k for b, k in zip(blocks, keep, strict=True)])
    G = J.T @ Hout @ J / terms
    V = torch.randn(problem.num_params, 2, dtype=torch.float64)
    assert_close(HessianOperator(problem) @ V, H @ V, what="LSTM Hessian @ V")
    ggn = GGNOperator(problem)
    assert_close(ggn @ V, G @ V, what="LSTM GGN @ V")
    assert_close(problem.loss(), loss(w), what="LSTM loss")


def test_large_outputs_are_taken_in_slices_of_samples(gpt, monkeypatch):
    """Above ``max_output_entries`` a batch's GGN and Fisher products are summed over slices of
    samples (the memory of a 50k-vocabulary product): the same matrix, to round-off."""
    problem, _, _, _, _, _, G = gpt
    V = torch.randn(
        problem.num_params, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(5)
    )
    seen = []
    real = GGNOperator._product

    def spy(self, batch, V, c):
        seen.append(batch.size)
        return real(self, batch, V, c)

    monkeypatch.setattr(GGNOperator, "_product", spy)
    # one sample's logits (6 positions x 5 classes) times 2 columns: slices of one sample
    monkeypatch.setattr(GGNOperator, "max_output_entries", 60)
    assert_close(GGNOperator(problem) @ V, G @ V, what="sliced GGN @ V")
    assert seen == [1] * 5  # batches of 2 and 3 sequences, cut into single samples
    seen.clear()
    assert_close(FisherOperator(problem) @ V[:, 0], G @ V[:, 0], what="sliced Fisher @ v")
    assert seen == [2, 2, 1]  # one column: two samples per slice
    model, x, y, batches = _lstm_case()
    lstm = Problem(model, "cross_entropy", batches, reduction="mean")
    W = torch.randn(lstm.num_params, 2, dtype=torch.float64)
    whole = GGNOperator(lstm)
    whole.slice_outputs = False
    seen.clear()
    assert_close(GGNOperator(lstm) @ W, whole @ W, what="sliced LSTM GGN @ V")
    assert seen[:4] == [1, 1, 1, 1] and len(seen) > 2


class _Centred(torch.nn.Module):
    """Outputs minus their batch mean: samples interact along dim 0."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 4).double()

    def forward(self, x):
        out = self.lin(x)
        return out - out.mean(0, keepdim=True)


def test_samples_that_interact_are_never_sliced(monkeypatch):
    torch.manual_seed(0)
    x = torch.randn(6, 3, dtype=torch.float64)
    y = torch.randint(0, 4, (6,))
    problem = Problem(_Centred(), "cross_entropy", [(x, y)])
    monkeypatch.setattr(GGNOperator, "max_output_entries", 1)
    sliced = GGNOperator(problem)
    whole = GGNOperator(problem)
    whole.slice_outputs = False
    V = torch.randn(problem.num_params, 2, dtype=torch.float64)
    assert_close(sliced @ V, whole @ V, what="GGN of a batch-coupled model")
    assert sliced._entries_per_sample == 0


def test_empirical_fisher_by_a_per_sample_loop_matches_vmap_on_dict_batches(gpt):
    # the loop is the fallback when torch.func cannot transform the model
    problem = gpt[0]
    V = torch.randn(problem.num_params, 2, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(5))
    looped = EmpiricalFisherOperator(problem)
    looped._one_by_one = True
    assert_close(looped @ V, EmpiricalFisherOperator(problem) @ V, rtol=1e-12,
                 what="looped empirical Fisher @ V")
