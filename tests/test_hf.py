"""HuggingFace model folders as checkpoints (the optional [hf] extra), offline, tiny models."""

from __future__ import annotations

import builtins
import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import curvscope as cs
from curvscope._errors import CheckpointError
from curvscope.cli import app

from .truth import assert_close, hessian_by_double_backward

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf") / "gpt2"
    cfg = transformers.GPT2Config(
        vocab_size=10,
        n_positions=8,
        n_embd=4,
        n_layer=1,
        n_head=2,
        bos_token_id=0,
        eos_token_id=0,
        resid_pdrop=0.1,
        embd_pdrop=0.1,
        attn_pdrop=0.1,
    )
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    model.save_pretrained(path)
    g = np.random.default_rng(0)
    (path.parent / "tokens.bin").write_bytes(g.integers(0, 10, size=200).astype("<u2").tobytes())
    return path


def test_folder_loads_with_eager_attention_and_records_its_files(folder):
    prob = cs.load(
        folder, folder.parent / "tokens.bin", block_size=6, samples=8, seed=1, dtype="float64"
    )
    assert prob.loss_name == "causal_lm"  # from the architecture
    assert prob.model.config._attn_implementation == "eager"
    info = prob.input_info
    assert info["model"]["format"] == "huggingface"
    assert any(k.endswith("config.json") for k in info["files"])
    assert any(k.endswith("model.safetensors") for k in info["files"])
    assert any("eager" in n for n in prob.notes)
    # dropout is off in the analysis: two passes agree exactly
    assert float(prob.loss()) == float(prob.loss())


def test_hessian_of_a_hf_model_against_dense_truth(folder):
    prob = cs.load(
        folder,
        folder.parent / "tokens.bin",
        block_size=6,
        samples=4,
        seed=2,
        dtype="float64",
        batch_size=3,
    )
    batches = list(prob.data)
    model = prob.model
    names = list(prob.names)
    shapes = [p.shape for p in prob.params.values()]

    def f(flat):
        ps, i = {}, 0
        for n, s in zip(names, shapes, strict=True):
            k = int(torch.Size(s).numel())
            ps[n] = flat[i : i + k].reshape(s)
            i += k
        total, terms = 0.0, 0
        for x, y in batches:
            out = torch.func.functional_call(model, ps, (x,)).logits
            total = total + torch.nn.functional.cross_entropy(
                out.reshape(-1, out.shape[-1]), y.reshape(-1), reduction="sum"
            )
            terms += y.numel()
        return total / terms

    prob_ce = cs.load(
        folder,
        folder.parent / "tokens.bin",
        block_size=6,
        samples=4,
        seed=2,
        dtype="float64",
        batch_size=3,
        loss="cross_entropy",
    )
    w = prob_ce.param_vector()
    with torch.no_grad():
        model.eval()
    H = hessian_by_double_backward(f, w)
    V = torch.randn(w.numel(), 2, dtype=torch.float64)
    assert_close(cs.hessian(prob_ce) @ V, H @ V, what="HF Hessian @ V")
    top = cs.lanczos(cs.hessian(prob_ce), top=2, tol=1e-10)
    assert_close(top.eigenvalues, torch.linalg.eigvalsh(H).flip(0)[:2], rtol=1e-8)


def test_model_own_loss_counts_shifted_tokens(folder):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 10, (3, 6), generator=g)
    batches = [{"input_ids": ids[:2], "labels": ids[:2]}, {"input_ids": ids[2:], "labels": ids[2:]}]
    own = cs.load(folder, batches, loss="model", dtype="float64")
    lm = cs.load(folder, batches, loss="causal_lm", dtype="float64")
    assert own.num_terms == lm.num_terms == 15
    # HuggingFace computes its own loss in float32 (logits.float()), even in a float64 run
    assert_close(own.loss(), lm.loss(), rtol=1e-6, what="own vs causal_lm loss")
    assert any("float32" in n for n in own.notes)
    with pytest.raises(cs.UnsupportedModelError, match="inside the model") as err:
        cs.ggn(own)
    assert "--" not in str(err.value)


def test_cli_spectrum_on_a_folder(folder, tmp_path):
    res = CliRunner().invoke(
        app,
        [
            "spectrum",
            str(folder),
            "--data",
            str(folder.parent / "tokens.bin"),
            "--block-size",
            "6",
            "--samples",
            "6",
            "--top",
            "2",
            "--bottom",
            "1",
            "--dtype",
            "float64",
            "--out",
            str(tmp_path),
        ],
    )
    assert res.exit_code == 0, res.output
    doc = json.loads((tmp_path / "spectrum.json").read_text())
    assert doc["input"]["model"]["format"] == "huggingface"
    assert all(doc["results"]["spectra"][0]["converged"])


def test_folder_without_weights_and_missing_extra_are_one_sentence(folder, tmp_path, monkeypatch):
    empty = tmp_path / "noweights"
    empty.mkdir()
    (empty / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(CheckpointError, match="has a config.json but no weights"):
        cs.load(empty, folder.parent / "tokens.bin", block_size=6)
    real_import = builtins.__import__

    def no_transformers(name, *args, **kwargs):
        if name == "transformers":
            raise ImportError("no transformers")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_transformers)
    with pytest.raises(CheckpointError, match=r'pip install "curvscope\[hf\]"'):
        cs.load(folder, folder.parent / "tokens.bin", block_size=6)
