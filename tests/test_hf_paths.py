"""Every data path the README documents, on five HuggingFace classes, against dense truth.

The classes a user brings (GPT2LMHeadModel, LlamaForCausalLM with grouped KV heads,
BertForMaskedLM, ViTForImageClassification, T5ForConditionalGeneration), tiny, trained a few
steps and saved with ``save_pretrained``, x the data paths (a token file with the default
loss, ``causal_lm`` and ``cross_entropy``; dict batches with right and left padding; ``--loss
model``; ``--loss FILE.py:FN``) x the Hessian and the GGN. Truth is the loss each model was
trained with, written out in ``tests/hf_truth.py`` (never taken from curvscope), its dense
Hessian by double backward and its GGN from Jacobians. Every path either gives the true loss,
products and eigenvalues (each printed bound holding), or is refused in one sentence.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import curvscope as cs
from curvscope.cli import app

from . import hf_models as hm
from . import hf_truth as ht
from .truth import assert_close

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()
warnings.filterwarnings("ignore", message=".*loss_type.*")

BLOCK = 6
WINDOWS = 5
EXACT = 1e-10
"""Relative tolerance where the model computes in float64 throughout (GPT2, BERT)."""
LOWERED = 1e-5
"""Where HF computes norms, rotary embeddings or softmax in float32 (Llama, ViT, T5)."""

LOSS_FILE = '''
import torch.nn.functional as F


def lm(out, target):
    """Next-token cross-entropy: (mean over the live targets, their number)."""
    lg, y = out[:, :-1], target[:, 1:]
    return F.cross_entropy(lg.reshape(-1, lg.shape[-1]), y.reshape(-1)), int((y != -100).sum())


def ce(out, target):
    """Cross-entropy over every live label: (mean, number of terms)."""
    flat = out.reshape(-1, out.shape[-1])
    return F.cross_entropy(flat, target.reshape(-1)), int((target != -100).sum())


def lm_sum(out, target):
    """The mistake the contract names: a sum beside the count."""
    lg, y = out[:, :-1], target[:, 1:]
    s = F.cross_entropy(lg.reshape(-1, lg.shape[-1]), y.reshape(-1), reduction="sum")
    return s, int((y != -100).sum())
'''


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    path = tmp_path_factory.mktemp("hfpaths")
    for kind in hm.KINDS:
        hm.build(kind, path / kind)
    g = np.random.default_rng(0)
    (path / "tokens.bin").write_bytes(g.integers(2, hm.VOCAB, 300).astype("<u2").tobytes())
    (path / "losses.py").write_text(LOSS_FILE)
    return path


def _tol(kind):
    return EXACT if kind in ("gpt2", "bert") else LOWERED


_TRUTH: dict = {}


def _truth(kind, model, key, batches):
    """(loss, w, dense Hessian, dense GGN) of the written-out loss, once per data."""
    if key not in _TRUTH:
        f, w, _ = ht.loss_fn(kind, model, batches)
        H = ht.dense_hessian(kind, model, batches)
        # the models that compute in float32 inside have float32-symmetric truth
        assert_close(H, H.T, rtol=1e-12 if kind in ("gpt2", "bert") else 1e-6,
                     what="symmetric truth")
        G = ht.dense_ggn(kind, model, batches)
        _TRUTH[key] = (float(f(w)), w, H, G)
    return _TRUTH[key]


def _token_windows(problem):
    """The windows the token source gave, as (x, y) pairs for the truth."""
    return [tuple(b) if isinstance(b, (tuple, list)) else (b["input_ids"], None)
            for b in problem.data]


def _check(problem, truth, rtol, matrices=("hessian", "ggn")):
    loss, w, H, G = truth
    assert_close(problem.param_vector(), w, rtol=0, what="weights")
    assert abs(float(problem.loss()) - loss) <= rtol * abs(loss), (float(problem.loss()), loss)
    V = torch.randn(w.numel(), 2, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    for name in matrices:
        dense = H if name == "hessian" else G
        op = cs.hessian(problem) if name == "hessian" else cs.ggn(problem)
        assert_close(op @ V, dense @ V, rtol=rtol, what=f"{name} @ V")
        ev = torch.linalg.eigvalsh(dense)
        res = cs.lanczos(op, top=2, bottom=1, tol=1e-6, seed=0)
        for r in res:
            want = ev.flip(0)[:2] if r.which == "top" else ev[:1]
            assert all(r.converged), (name, r.which, r.residual_norms)
            err = (r.eigenvalues - want).abs()
            # every printed bound holds, and the values are right to the model's precision
            assert bool((err <= torch.as_tensor(r.error_bounds) + 1e-12).all()), (
                name, r.which, err, r.error_bounds)
            # converged: within tol ||A|| (a null space's zeros included); the tolerance is
            # raised to the floor of float32 round-off where the model computes in float32
            assert r.tol == 1e-6 or rtol == LOWERED
            assert float(err.max()) <= r.tol * float(ev.abs().max()), (name, r.which, err)


def _load(root, kind, data, **kw):
    return cs.load(root / kind, data, dtype="float64", batch_size=2, **kw)


# ---------------------------------------------------------------- token files (causal LMs)
@pytest.mark.parametrize("kind", hm.CAUSAL)
@pytest.mark.parametrize("loss", [None, "causal_lm", "cross_entropy"])
def test_token_file_shifts_the_targets_once(root, kind, loss):
    prob = _load(root, kind, root / "tokens.bin", block_size=BLOCK, samples=WINDOWS, seed=1,
                 loss=loss)
    assert prob.loss_name == (loss or "causal_lm")
    assert prob.num_terms == WINDOWS * BLOCK  # T next tokens a window, not T - 1
    assert "t[i+1:i+T+1]" in prob.input_info["data"]["targets"]
    pairs = _token_windows(prob)
    for x, y in pairs:  # the targets are the inputs shifted exactly once
        assert torch.equal(x[:, 1:], y[:, :-1])
    truth = _truth(kind, prob.model, (kind, "tokens"), pairs)
    _check(prob, truth, _tol(kind))


@pytest.mark.parametrize("kind", hm.CAUSAL)
def test_token_file_with_the_models_own_loss(root, kind):
    prob = _load(root, kind, root / "tokens.bin", block_size=BLOCK, samples=WINDOWS, seed=1,
                 loss="model")
    assert prob.num_terms == WINDOWS * (BLOCK - 1)  # the model shifts its labels once
    batches = [dict(b) for b in prob.data]
    assert all(torch.equal(b["labels"], b["input_ids"]) for b in batches)
    truth = _truth(kind, prob.model, (kind, "tokens-own"), batches)
    # HF's own loss takes logits.float(): float32 round-off, and the document says so
    assert prob.input_info["precision"]["computes_in"] == "float32"
    _check(prob, truth, LOWERED, matrices=("hessian",))
    with pytest.raises(cs.UnsupportedModelError, match="inside the model"):
        cs.ggn(prob)


@pytest.mark.parametrize("kind", ["bert", "vit", "t5"])
def test_token_file_on_a_model_that_is_no_causal_lm_is_refused(root, kind):
    with pytest.raises(cs.CurvscopeError, match="not a causal language model"):
        _load(root, kind, root / "tokens.bin", block_size=BLOCK, loss="cross_entropy")


# ---------------------------------------------------------------- dict batches
def _dict_losses(kind):
    builtin = "causal_lm" if kind in hm.CAUSAL else None  # None: the default of the folder
    fn = "lm" if kind in hm.CAUSAL else "ce"
    return [builtin, "model", fn]


CASES = [(k, pad, loss) for k in hm.KINDS for pad in (("right",) if k == "vit" else
         ("right", "left")) for loss in _dict_losses(k)]


@pytest.mark.parametrize("kind,padding,loss", CASES,
                         ids=["-".join(map(str, c)) for c in CASES])
def test_dict_batches_against_dense_truth(root, kind, padding, loss):
    batches = hm.batches(kind, seed=7, padding=padding)
    spec = str(root / f"losses.py:{loss}") if loss in ("lm", "ce") else loss
    if kind == "llama" and padding == "left":
        # HF's eager attention gives NaN at rows whose keys are all padding: named, not run
        with pytest.raises(cs.NonFiniteError, match=r"NaN for batch 0.*pad on the right"):
            _load(root, kind, batches, loss=spec)
        return
    prob = _load(root, kind, batches, loss=spec)
    truth = _truth(kind, prob.model, (kind, padding), batches)
    live = sum(int((b["labels"][:, 1:] if kind in hm.CAUSAL else b["labels"]).ne(-100).sum())
               for b in batches)
    assert prob.num_terms == live  # loss terms counted from the labels, for every loss
    own = loss == "model"
    lowered = kind in ("llama", "vit", "t5") or (own and kind == "gpt2")
    assert (prob.input_info["precision"]["computes_in"] == "float32") == lowered
    _check(prob, truth, LOWERED if lowered else EXACT,
           matrices=("hessian",) if own else ("hessian", "ggn"))


@pytest.mark.parametrize("kind", hm.CAUSAL)
def test_unshifted_labels_under_cross_entropy_are_refused(root, kind):
    batches = hm.batches(kind, seed=7)
    with pytest.raises(cs.CurvscopeError, match="labels .* are the input ids.*causal_lm"):
        _load(root, kind, batches, loss="cross_entropy")
    pre = [((b["input_ids"][:, :-1],), b["input_ids"][:, 1:]) for b in batches]
    with pytest.raises(cs.CurvscopeError, match="already the next tokens"):
        _load(root, kind, [(x[0], y) for x, y in pre], loss="causal_lm")


def test_a_loss_function_returning_a_sum_is_named(root):
    batches = hm.batches("gpt2", seed=7, sizes=(4, 4))
    with pytest.raises(cs.CurvscopeError, match="looks like a sum"):
        _load(root, "gpt2", batches, loss=str(root / "losses.py:lm_sum"))
    # the same sum with --reduction sum is the documented other half of the contract
    prob = _load(root, "gpt2", batches, loss=str(root / "losses.py:lm_sum"), reduction="sum")
    lm = _load(root, "gpt2", batches, loss="causal_lm", reduction="sum")
    assert_close(prob.loss(), lm.loss(), what="sum loss")


def test_model_loss_with_sum_reduction_is_the_sum_over_terms(root):
    batches = hm.batches("bert", seed=7)
    own = _load(root, "bert", batches, loss="model", reduction="sum")
    ce = _load(root, "bert", batches, loss="cross_entropy", reduction="sum")
    assert_close(own.loss(), ce.loss(), rtol=EXACT, what="BERT sum loss")


# ---------------------------------------------------------------- token dtypes
def test_token_dtype_flag_and_wide_bin_files(root, tmp_path):
    ids = np.random.default_rng(1).integers(2, hm.VOCAB, 200)
    (tmp_path / "t32.bin").write_bytes(ids.astype("<i4").tobytes())
    with pytest.raises(cs.CurvscopeError, match="looks written as int32.*token_dtype int32"):
        cs.load(root / "gpt2", tmp_path / "t32.bin", block_size=BLOCK)
    a = cs.load(root / "gpt2", tmp_path / "t32.bin", block_size=BLOCK, token_dtype="int32")
    np.save(tmp_path / "t.npy", ids.astype(np.int64))
    b = cs.load(root / "gpt2", tmp_path / "t.npy", block_size=BLOCK)  # the header says
    assert "int32 tokens" in a.input_info["data"]["source"]
    assert "int64 tokens" in b.input_info["data"]["source"]
    assert_close(a.loss(), b.loss(), rtol=0, what="same ids, two dtypes")
    res = CliRunner().invoke(app, ["spectrum", str(root / "gpt2"), "--data",
                                   str(tmp_path / "t32.bin"), "--block-size", str(BLOCK),
                                   "--token-dtype", "int32", "--top", "1", "--bottom", "0",
                                   "--out", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    doc = json.loads((tmp_path / "o" / "spectrum.json").read_text())
    assert doc["settings"]["token_dtype"] == "int32"


# ---------------------------------------------------------------- the README's commands
def test_readme_token_file_command_on_a_gpt2_folder(root, tmp_path):
    """`curvscope spectrum ./my-gpt2/ --data tokens.bin --block-size T --samples N --loss
    causal_lm`, as the README shows it (sizes of the tiny model), against dense truth."""
    res = CliRunner().invoke(app, [
        "spectrum", str(root / "gpt2"), "--data", str(root / "tokens.bin"), "--block-size",
        str(BLOCK), "--samples", str(WINDOWS), "--seed", "1", "--loss", "causal_lm", "--dtype",
        "float64", "--batch-size", "2", "--top", "2", "--bottom", "1", "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    doc = json.loads((tmp_path / "spectrum.json").read_text())
    assert "t[i+1:i+T+1]" in doc["input"]["data"]["targets"]
    prob = _load(root, "gpt2", root / "tokens.bin", block_size=BLOCK, samples=WINDOWS, seed=1)
    _, _, H, _ = _truth("gpt2", prob.model, ("gpt2", "tokens"), _token_windows(prob))
    ev = torch.linalg.eigvalsh(H)
    for s in doc["results"]["spectra"]:
        want = ev.flip(0)[:2] if s["which"] == "top" else ev[:1]
        got = torch.tensor(s["eigenvalues"], dtype=torch.float64)
        assert all(s["converged"])
        assert bool(((got - want).abs() <= torch.tensor(s["error_bounds"]) + 1e-12).all())


# ---------------------------------------------------------------- surface on dict batches
@pytest.mark.parametrize("kind,loss", [("gpt2", "causal_lm"), ("bert", None), ("t5", None),
                                       ("vit", "model")])
def test_surface_on_dict_batches_against_the_written_out_loss(root, kind, loss):
    """The surface (and so the report) takes every batch structure; T5 with labels only."""
    batches = hm.batches(kind, seed=7)
    prob = _load(root, kind, batches, loss=loss)
    f, w, _ = ht.loss_fn(kind, prob.model, batches)
    d = torch.randn(w.numel(), dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    d = d / d.norm()
    res = cs.surface(prob, dims=1, directions=d, steps=3, range_=(-0.5, 0.5),
                     quadratic=False, seed=3)
    assert res.evaluation == "vmap" or res.notes
    for a, value in zip(res.axes[0], res.loss, strict=True):
        want = float(f(w + a * d))
        assert abs(value - want) <= _tol(kind) * abs(want), (a, value, want)
    assert all(np.isfinite(res.loss))


# ---------------------------------------------------------------- precision
def test_float32_inside_a_float64_run_is_named_and_never_fails_a_check(root, tmp_path):
    """Llama and T5 compute norms in float32 in a float64 run: the document says so, the
    Taylor and gradient tests are inconclusive at that floor at worst (never 'failed'), and
    the Lanczos bounds use float32's epsilon (checked against dense truth above)."""
    from curvscope.diagnostics import gradient_test, taylor_test
    from curvscope.diagnostics._derivatives import combine

    for kind in ("llama", "t5"):
        prob = _load(root, kind, hm.batches(kind, seed=7), loss=None)
        prec = prob.input_info["precision"]
        assert prec["computes_in"] == "float32" and prec["where"]
        assert any("computes in float32 inside this float64 run" in n for n in prob.notes)
        assert cs.hessian(prob).roundoff_eps == float(torch.finfo(torch.float32).eps)
        for test in (taylor_test, gradient_test):
            passed, reason = combine(test(prob, directions=2, seed=0))
            assert passed is not False, reason
    gpt = _load(root, "gpt2", hm.batches("gpt2", seed=7), loss="causal_lm")
    assert gpt.input_info["precision"]["computes_in"] == "float64"
    assert cs.hessian(gpt).roundoff_eps == float(torch.finfo(torch.float64).eps)


def test_cli_says_what_the_model_computes_in(root, tmp_path):
    """The table's notes name the float32 operations of a float64 run on Llama."""
    torch.save(hm.batches("llama", seed=7), root / "llama_batches.pt")
    (root / "llama_data.py").write_text(
        "from pathlib import Path\nimport torch\n\n\ndef batches():\n"
        "    return torch.load(Path(__file__).parent / 'llama_batches.pt')\n"
    )
    res = CliRunner().invoke(app, [
        "spectrum", str(root / "llama"), "--data", f"{root / 'llama_data.py'}:batches",
        "--dtype", "float64", "--top", "1", "--bottom", "0", "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert "computes in float32 inside this float64 run" in text
    doc = json.loads((tmp_path / "spectrum.json").read_text())
    assert doc["input"]["precision"]["computes_in"] == "float32"
    assert any("float32" in n for n in doc["notes"])


def test_a_bfloat16_checkpoint_is_analysed_in_float32_from_its_stored_values(root, tmp_path):
    """HuggingFace LLMs ship bf16 weights: the run casts them exactly and says so."""
    model = transformers.GPT2LMHeadModel.from_pretrained(root / "gpt2").to(torch.bfloat16)
    model.save_pretrained(tmp_path / "bf16")
    batches = hm.batches("gpt2", seed=7)
    prob = cs.load(tmp_path / "bf16", batches, loss="causal_lm")
    assert prob.dtype == torch.float32
    assert any("stores bfloat16 weights" in n for n in prob.notes)
    stored = {n: p.float() for n, p in model.named_parameters()}
    for name, value in prob.params.items():
        assert torch.equal(value, stored[name]), name  # bf16 -> float32 is exact


def test_a_nan_product_names_its_batch_and_parameters():
    """A product that turns NaN on one batch is named as such (batch, parameters)."""
    torch.manual_seed(0)

    class Sqrt(torch.nn.Module):  # sqrt'' is infinite at 0: the second derivative blows up
        def forward(self, x):
            return torch.sqrt(x)

    net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU(), Sqrt(),
                              torch.nn.Linear(3, 2)).double()
    with torch.no_grad():
        net[0].weight.zero_()
        net[0].bias.copy_(torch.tensor([0.0, 1.0, 2.0]))  # unit 0 sits at sqrt(0)
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(4, 2, generator=g, dtype=torch.float64),
             torch.randint(0, 2, (4,), generator=g)) for _ in range(2)]
    prob = cs.Problem(net, "cross_entropy", data)
    with pytest.raises(cs.NonFiniteError, match=r"product is NaN or Inf for batch 0, in 0\."):
        cs.hessian(prob) @ torch.ones(prob.num_params, dtype=torch.float64)
