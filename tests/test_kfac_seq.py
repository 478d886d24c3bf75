"""KFAC and EKFAC on sequence models against their dense definitions, written out here.

Per covered layer, every call ``k`` of it records its input (``a``) by a hook, and the
Jacobian ``J`` of the logits ``[N, T, V]`` w.r.t. the call's output comes from
``torch.autograd.functional.jacobian`` of the model with a perturbation added to that output.
With per-position output Fishers ``H_it = diag(p) - p p^T`` (live positions) and loss
gradients ``e_it``, ``c = 1 / terms`` (mean):

- exact:      G = c sum_i sum_(k,l) sum_t J_(ik,t,l)^T H_it J_(ik,t,l)
- empirical:  G = c sum_i sum_(k,l) g g^T, g = sum_t J_(ik,t,l)^T e_it / sqrt(T_i)
- A = sum_(i,k,l) a a^T / (locations over samples and calls), a = [input, 1]
  (Embedding: the diagonal of token counts)

and the block is kron(G, A) on the row-major ``[W | b]`` (Linear, HF Conv1D transposed) or
kron(diag(A), G) on an Embedding's ``[V, d]``. EKFAC: ``U diag(U^T B U) U^T`` in that
Kronecker eigenbasis with ``B`` the true block, from the parameter Jacobian of the logits.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from curvscope import Problem
from curvscope._errors import UnsupportedModelError
from curvscope.operators import EKFACOperator, KFACOperator

from .truth import assert_close

RTOL = 1e-12


class TinyLM(nn.Module):
    """Causal one-block transformer of Linear and Embedding layers; ``mlp`` is called twice
    (its weight shared by the two calls) and the position ids are ``[1, T]`` (broadcast)."""

    def __init__(self, vocab=5, d=4, T=4):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(T, d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.mlp = nn.Linear(d, d)
        self.head = nn.Linear(d, vocab)

    def forward(self, x):
        T = x.shape[1]
        h = self.tok(x) + self.pos(torch.arange(T).unsqueeze(0))
        q, k, v = self.q(h), self.k(h), self.v(h)
        s = q @ k.mT / math.sqrt(q.shape[-1])
        mask = torch.ones(T, T, dtype=torch.bool).triu(1)
        h = h + self.o(torch.softmax(s.masked_fill(mask, -torch.inf), -1) @ v)
        h = h + torch.tanh(self.mlp(torch.tanh(self.mlp(h))))
        return self.head(h)


def _tiny_lm():
    torch.manual_seed(0)
    model = TinyLM().double().eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 5, (5, 4), generator=g)
    y = torch.randint(0, 5, (5, 4), generator=g)
    y[1, 2] = y[3, 0] = -100
    return model, x, y, [(x[:2], y[:2]), (x[2:], y[2:])]


def _logits(out):
    return out if isinstance(out, torch.Tensor) else out.logits


def _calls(model, x, names):
    """Per layer, per call: (input, output shape), from a forward with hooks."""
    rec = {n: [] for n in names}
    hooks = [
        model.get_submodule(n).register_forward_hook(
            lambda m, i, o, n=n: rec[n].append((i[0].detach(), o.shape))
        )
        for n in names
    ]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return rec


def _output_jacobians(model, x, names, rec):
    """Per layer, per call: d logits [N, T, V] / d call output."""
    shapes = [(n, s) for n in names for _, s in rec[n]]

    def f(*deltas):
        queue = {n: [] for n in names}
        for (n, _), d in zip(shapes, deltas, strict=True):
            queue[n].append(d)
        hooks = [
            model.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: o + queue[n].pop(0))
            for n in names
        ]
        try:
            return _logits(model(x))
        finally:
            for h in hooks:
                h.remove()

    zeros = tuple(torch.zeros(s, dtype=torch.float64) for _, s in shapes)
    Js = torch.autograd.functional.jacobian(f, zeros)
    out, i = {}, 0
    for n in names:
        out[n] = list(Js[i : i + len(rec[n])])
        i += len(rec[n])
    return out


def _position_terms(logits, targets, causal):
    """Per-position output Fishers H [N, T, V, V] and loss gradients e [N, T, V] (0: no term)."""
    N, T, V = logits.shape
    if causal:  # position t predicts token t + 1; the last position has no term
        tgt = torch.cat([targets[:, 1:], torch.full((N, 1), -100)], 1)
    else:
        tgt = targets
    live = (tgt != -100).double()
    p = torch.softmax(logits.detach(), -1)
    H = (torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)) * live[..., None, None]
    e = (p - nn.functional.one_hot(tgt.clamp(min=0), V).double()) * live[..., None]
    return H, e, live.sum(1)


def _dense_factors(model, x, targets, names, fisher_type, causal=False):
    """Per layer (A, G) from the definitions in the module docstring."""
    rec = _calls(model, x, names)
    Js = _output_jacobians(model, x, names, rec)
    with torch.no_grad():
        logits = _logits(model(x))
    H, e, terms = _position_terms(logits, targets, causal)
    N = x.shape[0]
    c = 1.0 / float(terms.sum())
    factors = {}
    for n in names:
        module = model.get_submodule(n)
        G, A, locations = 0.0, 0.0, 0
        for (inp, _), J in zip(rec[n], Js[n], strict=True):
            for i in range(N):
                src = i if inp.shape[0] == N else 0  # a call on [1, ...] is shared by the batch
                Ji = J[i, :, :, src]  # [T, V, *call output without the batch]
                Ji = Ji.reshape(Ji.shape[0], Ji.shape[1], -1, Ji.shape[-1])  # [T, V, L, out]
                if fisher_type == "exact":
                    G = G + c * torch.einsum("tvlo,tvw,twlp->op", Ji, H[i], Ji)
                else:
                    g = torch.einsum("tvlo,tv->lo", Ji, e[i]) / terms[i].sqrt()
                    G = G + c * g.T @ g
                a = inp[src].reshape(Ji.shape[2], -1)
                locations += a.shape[0]
                if isinstance(module, nn.Embedding):
                    A = A + torch.bincount(a.reshape(-1), minlength=module.num_embeddings).double()
                else:
                    a = torch.cat([a, torch.ones_like(a[:, :1])], 1)
                    A = A + a.T @ a
        # contiguous: with opt_einsum installed (the peers bring it) torch.einsum returns G
        # with strides that torch.kron (2.13) cannot view
        factors[n] = (A / locations, G.contiguous())
    return factors


def _aug_order(module):
    """Flat (weight, bias) index -> row-major [W | b] index, for Linear and HF Conv1D."""
    w = module.weight
    if isinstance(module, nn.Linear):
        n_out, n_in = w.shape
        idx = [o * (n_in + 1) + j for o in range(n_out) for j in range(n_in)]
    else:  # Conv1D: weight stored [in, out]
        n_in, n_out = w.shape
        idx = [o * (n_in + 1) + j for j in range(n_in) for o in range(n_out)]
    return idx + [o * (n_in + 1) + n_in for o in range(n_out)]


def _kron_block(module, A, G):
    """The dense block and its Kronecker eigenbasis, both in the flat parameter layout."""
    qg = torch.linalg.eigh(G)[1].contiguous()
    if isinstance(module, nn.Embedding):  # [V, d] row-major: diag(A) kron G
        U = torch.kron(torch.eye(len(A), dtype=torch.float64), qg)
        return torch.kron(torch.diag(A), G), U
    idx = _aug_order(module)
    U = torch.kron(qg, torch.linalg.eigh(A)[1].contiguous())[idx]
    return torch.kron(G, A)[idx][:, idx], U


def _true_fisher(model, x, targets, names, fisher_type, causal=False):
    """The Fisher (or empirical Fisher) of the parameters ``names``, from their Jacobian."""
    params = dict(model.named_parameters())
    shapes = [params[n].shape for n in names]
    w = torch.cat([params[n].detach().reshape(-1) for n in names])

    def f(flat):
        ps, i = {}, 0
        for n, s in zip(names, shapes, strict=True):
            ps[n] = flat[i : i + s.numel()].reshape(s)
            i += s.numel()
        return _logits(torch.func.functional_call(model, ps, (x,)))

    J = torch.autograd.functional.jacobian(f, w)  # [N, T, V, P]
    with torch.no_grad():
        logits = _logits(model(x))
    H, e, terms = _position_terms(logits, targets, causal)
    c = 1.0 / float(terms.sum())
    if fisher_type == "exact":
        return c * torch.einsum("ntvp,ntvw,ntwq->pq", J, H, J)
    g = torch.einsum("ntvp,ntv->np", J, e) / terms.sqrt()[:, None]
    return c * g.T @ g


def _layers_of(problem):
    """Covered layer names in parameter order."""
    return list(dict.fromkeys(n.rpartition(".")[0] for n in problem.names))


def _truths(model, x, targets, problem, fisher_type, causal=False):
    names = _layers_of(problem)
    factors = _dense_factors(model, x, targets, names, fisher_type, causal)
    B = _true_fisher(model, x, targets, list(problem.names), fisher_type, causal)
    kfac, ekfac, start = [], [], 0
    for n in names:
        K, U = _kron_block(model.get_submodule(n), *factors[n])
        s = slice(start, start + K.shape[0])
        start = s.stop
        kfac.append(K)
        ekfac.append(U @ torch.diag(torch.diagonal(U.T @ B[s, s] @ U)) @ U.T)
    return torch.block_diag(*kfac), torch.block_diag(*ekfac)


@pytest.mark.parametrize("fisher_type", ["exact", "empirical"])
def test_kfac_and_ekfac_on_a_causal_transformer_match_their_definitions(fisher_type):
    model, x, y, data = _tiny_lm()
    problem = Problem(model, "cross_entropy", data)
    K = KFACOperator(problem, fisher_type=fisher_type)
    E = EKFACOperator(problem, fisher_type=fisher_type)
    assert K.shape[0] == problem.num_params and not K.notes  # every layer covered
    kfac, ekfac = _truths(model, x, y, problem, fisher_type)
    assert_close(K.dense(), kfac, rtol=RTOL, what=f"KFAC {fisher_type}")
    assert_close(E.dense(), ekfac, rtol=RTOL, what=f"EKFAC {fisher_type}")
    for op, truth in ((K, kfac), (E, ekfac)):
        for layer in ("tok", "mlp"):  # an Embedding; a Linear called twice
            s = problem.param_slices()
            names = problem.block_param_names(layer)
            sl = slice(s[names[0]].start, s[names[-1]].stop)
            want = torch.linalg.eigvalsh(truth[sl, sl]).flip(0)
            assert_close(op.eigenvalues()[layer], want, rtol=1e-10, what=f"{op.name} eig")
            assert_close(op.block(layer).dense(), truth[sl, sl], rtol=RTOL, what="block")
        V = torch.randn(problem.num_params, 2, dtype=torch.float64)
        inv = op.inverse(0.1)
        assert_close(op @ (inv @ V) + 0.1 * (inv @ V), V, rtol=1e-10, what="damped inverse")


def test_mc_kfac_on_sequences_converges_to_exact():
    model, x, y, data = _tiny_lm()
    problem = Problem(model, "cross_entropy", data, params="head.*,mlp.*,tok.*")
    exact = KFACOperator(problem).dense()
    errs = [
        float(
            torch.linalg.norm(KFACOperator(problem, fisher_type="mc", mc_samples=s).dense() - exact)
            / torch.linalg.norm(exact)
        )
        for s in (1, 300)
    ]
    assert errs[1] < errs[0] and errs[1] < 0.1


def test_mc_ekfac_on_sequences_converges_to_exact():
    """README: EKFAC from the Monte-Carlo Fisher too (``EKFACOperator(fisher_type="mc")``)."""
    model, x, y, data = _tiny_lm()
    problem = Problem(model, "cross_entropy", data, params="head.*,mlp.*,tok.*")
    exact = EKFACOperator(problem).dense()

    def error(samples):
        mc = EKFACOperator(problem, fisher_type="mc", mc_samples=samples).dense()
        return float(torch.linalg.norm(mc - exact) / torch.linalg.norm(exact))

    errs = [error(s) for s in (1, 300)]
    assert errs[1] < errs[0] and errs[1] < 0.1


def test_mse_on_sequence_outputs_uses_one_exact_column_per_entry():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double().eval()
    x = torch.randn(3, 5, 3, dtype=torch.float64)
    y = torch.randn(3, 5, 2, dtype=torch.float64)
    K = KFACOperator(Problem(model, "mse", [(x, y)]), fisher_type="exact")
    # G = c sum_(i,l) sum_t J_tl^T (2 I) J_tl, the Jacobians from the layer outputs by hand
    h = model[:2](x)
    z = model[0](x).requires_grad_(True)
    out = model[1:](z)
    c = 1.0 / y.numel()
    G0 = 0.0
    for t in range(out.numel()):
        (g,) = torch.autograd.grad(out.reshape(-1)[t], z, retain_graph=True)
        G0 = G0 + 2 * c * torch.einsum("nlo,nlp->op", g, g)
    a0 = torch.cat([x, torch.ones(3, 5, 1, dtype=torch.float64)], -1).reshape(15, 4)
    a1 = torch.cat([h, torch.ones(3, 5, 1, dtype=torch.float64)], -1).reshape(15, 5)
    G1 = 2 * c * 15 * torch.eye(2, dtype=torch.float64)
    want = torch.block_diag(
        torch.kron(G0, a0.T @ a0 / 15)[_aug_order(model[0])][:, _aug_order(model[0])],
        torch.kron(G1, a1.T @ a1 / 15)[_aug_order(model[2])][:, _aug_order(model[2])],
    )
    assert_close(K.dense(), want.detach(), rtol=RTOL, what="KFAC mse on [N, T, d]")


def test_refusals_name_the_layer():
    torch.manual_seed(0)

    class Flat(nn.Module):  # a Linear on [N*T, d]: its rows are no samples
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x):
            return self.lin(x.reshape(-1, 3)).reshape(x.shape[0], -1, 2)

    x = torch.randn(2, 4, 3, dtype=torch.float64)
    y = torch.randint(0, 2, (2, 4))
    with pytest.raises(UnsupportedModelError, match=r"layer 'lin' was called on inputs of shape"):
        KFACOperator(Problem(Flat().double().eval(), "cross_entropy", [(x, y)]))

    class Tied(nn.Module):  # an embedding tied to the output layer
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(5, 3)
            self.mid = nn.Linear(3, 3)
            self.out = nn.Linear(3, 5, bias=False)
            self.out.weight = self.emb.weight

        def forward(self, x):
            return self.out(torch.tanh(self.mid(self.emb(x))))

    x = torch.randint(0, 5, (2, 4))
    K = KFACOperator(Problem(Tied().double().eval(), "cross_entropy", [(x, x)]))
    assert any("emb (Embedding tied to out (Linear))" in n for n in K.notes)
    with pytest.raises(UnsupportedModelError, match=r"layer 'emb' \(Embedding tied to out"):
        K.block("emb")


def test_padding_idx_rows_get_no_curvature():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(4, 3, padding_idx=0), nn.Linear(3, 4)).double().eval()
    x = torch.tensor([[0, 1, 2], [3, 0, 1]])
    problem = Problem(model, "cross_entropy", [(x, x)], params="0.*")
    for op in (KFACOperator(problem), EKFACOperator(problem)):
        D = op.dense()
        assert float(D[:3].abs().max()) == 0.0 and float(D[:, :3].abs().max()) == 0.0
        assert float(D[3:].abs().max()) > 0


def test_gpt2_conv1d_and_position_embedding_match_their_definitions():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(
        vocab_size=10,
        n_positions=8,
        n_embd=4,
        n_layer=1,
        n_head=2,
        bos_token_id=0,
        eos_token_id=0,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x = torch.randint(0, 10, (3, 5), generator=torch.Generator().manual_seed(1))
    problem = Problem(model, "causal_lm", [(x[:2], x[:2]), (x[2:], x[2:])])
    K = KFACOperator(problem)
    E = EKFACOperator(problem)
    assert any("transformer.wte (Embedding tied to lm_head (Linear))" in n for n in K.notes)
    assert any("transformer.h.0.ln_1 (LayerNorm)" in n for n in K.notes)
    covered = _layers_of(K.problem)
    assert "transformer.wpe" in covered and "transformer.h.0.attn.c_attn" in covered
    assert len(covered) == 5  # wpe and the four Conv1D projections
    kfac, ekfac = _truths(model, x, x, K.problem, "exact", causal=True)
    assert_close(K.dense(), kfac, rtol=RTOL, what="KFAC GPT2")
    assert_close(E.dense(), ekfac, rtol=RTOL, what="EKFAC GPT2")
    s = K.problem.param_slices()["transformer.h.0.attn.c_attn.weight"]
    got = K.block("transformer.h.0.attn.c_attn.weight").dense()
    assert_close(got, kfac[s, s], rtol=RTOL, what="Conv1D weight-only block")
