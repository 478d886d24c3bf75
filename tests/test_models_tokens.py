"""Token files, the sequence models (TinyGPT, CharLSTM) and the character-LM examples."""

import gzip
import tracemalloc
from importlib import resources

import numpy as np
import pytest
import torch

from curvscope._errors import CheckpointError, DataError, OptionError
from curvscope._examples import EXAMPLES, encode_text, train_char_lm
from curvscope.io import build_arch, load_checkpoint, load_tokens, save_checkpoint
from curvscope.io._tokens import shipped_text
from curvscope.models import CharLSTM, TinyGPT

GPT = {
    "type": "tiny-gpt",
    "vocab_size": 11,
    "block_size": 12,
    "n_layer": 2,
    "n_head": 2,
    "n_embd": 8,
}
LSTM = {"type": "char-lstm", "vocab_size": 11, "n_embd": 6, "hidden": 7, "num_layers": 2}


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _ids(n, vocab=50, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, n)


# ------------------------------------------------------------------ token files
@pytest.mark.parametrize("kind", ["bin-uint16", "bin-int32", "npy-int64", "npy-uint8"])
def test_windows_are_slices_of_the_file(tmp_path, kind):
    ids = _ids(1000)
    if kind == "bin-uint16":
        path, dtype = tmp_path / "t.bin", None
        ids.astype(np.uint16).tofile(path)
    elif kind == "bin-int32":
        path, dtype = tmp_path / "t.bin", "int32"
        ids.astype(np.int32).tofile(path)
    else:
        path, dtype = tmp_path / "t.npy", None
        np.save(path, ids.astype(kind.split("-")[1]))
    t = 16
    w = load_tokens(path, block_size=t, dtype=dtype)
    assert len(w) == (1000 - 1) // t
    assert list(w.starts[:3]) == [0, t, 2 * t]
    assert w.vocab_size == w.num_classes == int(ids.max()) + 1
    assert w.sha256 and str(path) in w.source
    batches = w.batches(7)
    assert len(batches) == -(-len(w) // 7)
    xs, ys = zip(*batches, strict=True)
    x, y = torch.cat(xs), torch.cat(ys)
    assert x.dtype == y.dtype == torch.int64 and x.shape == (len(w), t)
    for k, s in enumerate(w.starts):
        assert np.array_equal(x[k].numpy(), ids[s : s + t])
        assert np.array_equal(y[k].numpy(), ids[s + 1 : s + t + 1])
    # Re-iterable: a second pass gives the same batches.
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(batches, w.batches(7), strict=True))
    x0, y0 = w.window(3)
    assert torch.equal(x0, x[3]) and torch.equal(y0, y[3])


def test_random_windows_are_seeded_distinct_and_sorted(tmp_path):
    path = tmp_path / "t.bin"
    ids = _ids(5000)
    ids.astype(np.uint16).tofile(path)
    a = load_tokens(path, block_size=32, samples=40, seed=3)
    b = load_tokens(path, block_size=32, samples=40, seed=3)
    c = load_tokens(path, block_size=32, samples=40, seed=4)
    assert np.array_equal(a.starts, b.starts) and not np.array_equal(a.starts, c.starts)
    assert len(a) == 40 and len(set(a.starts.tolist())) == 40
    assert np.all(np.diff(a.starts) > 0) and a.starts[-1] <= 5000 - 33
    assert a.starts.tolist() != list(range(0, 40 * 32, 32))  # any offset, not the grid
    x, y = next(iter(a.batches(40)))
    assert np.array_equal(y[5].numpy(), ids[a.starts[5] + 1 : a.starts[5] + 33])
    # Almost every start: the permutation branch; every start possible once.
    full = load_tokens(path, block_size=32, samples=5000 - 32, seed=0)
    assert full.starts.tolist() == list(range(5000 - 32))
    sub = a.subset(10, seed=1)
    assert np.array_equal(sub.starts, a.subset(10, seed=1).starts) and sub.subset_seed == 1
    assert set(sub.starts.tolist()) <= set(a.starts.tolist()) and np.all(np.diff(sub.starts) > 0)
    with pytest.raises(DataError, match="samples"):
        a.subset(41, seed=0)
    with pytest.raises(DataError, match="samples"):
        load_tokens(path, block_size=32, samples=5000, seed=0)


def test_a_large_file_is_memory_mapped_not_read(tmp_path):
    path = tmp_path / "big.bin"
    n = 25 * 1024 * 1024  # 50 MB of uint16
    with open(path, "wb") as fh:
        fh.truncate(2 * n)
    mm = np.memmap(path, dtype=np.uint16, mode="r+")
    mm[n - 1] = 77
    mm.flush()
    del mm
    tracemalloc.start()
    try:
        w = load_tokens(path, block_size=64)
        for i, (x, _) in enumerate(w.batches(32)):
            assert x.shape == (32, 64)
            if i == 3:
                break
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert isinstance(w.tokens, np.memmap)
    assert w.vocab_size == 78 and len(w) == (n - 1) // 64
    assert peak < 8 * 1024 * 1024, f"peak {peak / 2**20:.1f} MiB for a 50 MB file"


def _bad_files(tmp_path):
    f = {}
    f["missing"] = (tmp_path / "nope.bin", {}, "does not exist")
    (tmp_path / "empty.bin").write_bytes(b"")
    f["empty"] = (tmp_path / "empty.bin", {}, "empty")
    np.save(tmp_path / "empty.npy", np.zeros(0, np.int32))
    f["empty npy"] = (tmp_path / "empty.npy", {}, "empty")
    (tmp_path / "odd.bin").write_bytes(b"\x01\x00\x02")
    f["odd size"] = (tmp_path / "odd.bin", {}, "whole number of uint16")
    np.arange(10, dtype=np.uint16).tofile(tmp_path / "short.bin")
    f["too short"] = (tmp_path / "short.bin", {}, "fewer than the 17")
    np.save(tmp_path / "neg.npy", np.array([3, -1] * 20, dtype=np.int32))
    f["negative"] = (tmp_path / "neg.npy", {}, "negative ids")
    np.array([3, -2] * 20, dtype=np.int32).tofile(tmp_path / "neg.bin")
    f["negative bin"] = (tmp_path / "neg.bin", {"dtype": "int32"}, "negative ids")
    np.save(tmp_path / "float.npy", np.linspace(0, 1, 100))
    f["float npy"] = (tmp_path / "float.npy", {}, "not integer token ids")
    np.save(tmp_path / "grid.npy", np.zeros((10, 10), np.int64))
    f["2-D npy"] = (tmp_path / "grid.npy", {}, "one flat")
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    f["object npy"] = (tmp_path / "obj.npy", {}, "not a readable .npy")
    np.save(tmp_path / "i16.npy", np.arange(40, dtype=np.int16))
    f["npy dtype mismatch"] = (tmp_path / "i16.npy", {"dtype": "uint16"}, "leave it out")
    (tmp_path / "t.txt").write_text("hello")
    f["not a token file"] = (tmp_path / "t.txt", {}, "not a token file")
    f["folder"] = (tmp_path, {}, "is a folder")
    return f


def test_bad_token_files_are_refused_naming_the_file(tmp_path):
    for what, (path, kwargs, text) in _bad_files(tmp_path).items():
        with pytest.raises(DataError) as err:
            load_tokens(path, block_size=16, **kwargs)
        msg = str(err.value)
        assert text in msg and path.name in msg, (what, msg)
        assert "--" not in msg, (what, msg)  # library messages never write CLI flags


def test_bad_token_options(tmp_path):
    np.arange(100, dtype=np.uint16).tofile(tmp_path / "t.bin")
    with pytest.raises(OptionError, match="dtype"):
        load_tokens(tmp_path / "t.bin", block_size=8, dtype="float32")
    with pytest.raises(OptionError, match="block_size"):
        load_tokens(tmp_path / "t.bin", block_size=0)
    with pytest.raises(OptionError, match="batch_size"):
        load_tokens(tmp_path / "t.bin", block_size=8).batches(0)
    rel = load_tokens("t.bin", block_size=8, base_dir=tmp_path)
    assert rel.path == tmp_path / "t.bin"


# ------------------------------------------------------------------ models
def test_tiny_gpt_is_causal():
    torch.manual_seed(0)
    model = build_arch(GPT).eval()
    ids = torch.randint(11, (2, 12))
    base = model(ids)
    assert base.shape == (2, 12, 11)
    for t in (0, 5, 11):
        changed = ids.clone()
        changed[:, t] = (changed[:, t] + 1) % 11
        out = model(changed)
        assert torch.equal(out[:, :t], base[:, :t])
        assert not torch.allclose(out[:, t], base[:, t])
    assert torch.equal(model(ids[0]), base[0])  # unbatched input
    with pytest.raises(DataError, match="block_size"):
        model(torch.zeros(1, 13, dtype=torch.long))


@pytest.mark.parametrize("side", ["right", "left"])
def test_attention_mask_masks_padding(side):
    torch.manual_seed(1)
    model = build_arch(GPT).eval().double()
    seqs = [torch.randint(11, (n,)) for n in (5, 12, 9)]
    t = 12
    ids = torch.full((3, t), 7, dtype=torch.long)  # padding with a real id, which must not leak
    mask = torch.zeros(3, t, dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(0, len(s)) if side == "right" else slice(t - len(s), t)
        ids[i, sl], mask[i, sl] = s, 1
    out = model(ids, attention_mask=mask)
    assert torch.isfinite(out).all()
    for i, s in enumerate(seqs):
        alone = model(s[None])[0]
        got = out[i, mask[i].bool()]
        torch.testing.assert_close(got, alone, rtol=1e-12, atol=1e-12)
    # Without the mask, left padding changes the real positions' logits.
    if side == "left":
        assert not torch.allclose(model(ids)[0, -5:], model(seqs[0][None])[0])


def _loss(model, x, y):
    logits = model(x)
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


@pytest.mark.parametrize("arch", [GPT, LSTM], ids=["tiny-gpt", "char-lstm"])
def test_double_backward_hvp_matches_gradient_differences(arch):
    torch.manual_seed(2)
    model = build_arch(arch).double()
    x, y = torch.randint(11, (3, 10)), torch.randint(11, (3, 10))
    params = list(model.parameters())
    v = [torch.randn_like(p) for p in params]
    scale = torch.cat([d.reshape(-1) for d in v]).norm()
    v = [d / scale for d in v]  # a unit step: the central difference's O(eps^2) stays tiny

    def grad():
        return torch.autograd.grad(_loss(model, x, y), params, create_graph=True)

    g = grad()
    hv = torch.autograd.grad(g, params, grad_outputs=v)
    hv = torch.cat([h.reshape(-1) for h in hv])
    eps = 1e-5
    diffs = []
    for sign in (1, -1):
        with torch.no_grad():
            for p, d in zip(params, v, strict=True):
                p.add_(sign * eps * d)
        diffs.append(torch.cat([q.detach().reshape(-1) for q in grad()]))
        with torch.no_grad():
            for p, d in zip(params, v, strict=True):
                p.sub_(sign * eps * d)
    fd = (diffs[0] - diffs[1]) / (2 * eps)
    assert hv.norm() > 0
    assert (hv - fd).norm() <= 1e-6 * float(hv.norm())


@pytest.mark.parametrize("arch", [GPT, LSTM], ids=["tiny-gpt", "char-lstm"])
def test_checkpoint_round_trip(tmp_path, arch):
    torch.manual_seed(3)
    model = build_arch(arch).eval()
    assert isinstance(model, TinyGPT if arch["type"] == "tiny-gpt" else CharLSTM)
    meta = {
        "data": {"kind": "tokens", "path": "t.bin", "dtype": "uint16", "block_size": 12},
        "loss": "cross_entropy",
        "reduction": "mean",
        "vocab": "abcdefghijk",
    }
    save_checkpoint(tmp_path / "m.pt", model, arch, meta)
    loaded = load_checkpoint(tmp_path / "m.pt")
    assert loaded.arch == arch and loaded.meta == meta
    ids = torch.randint(11, (2, 12))
    with torch.no_grad():
        assert torch.equal(loaded.model.eval()(ids), model(ids))


@pytest.mark.parametrize(
    ("arch", "text"),
    [
        ({**GPT, "n_head": 3}, "not divisible by n_head"),
        ({**GPT, "n_layer": 0}, "n_layer = 0"),
        ({**GPT, "n_embd": 8.0}, "positive integer"),
        ({k: v for k, v in GPT.items() if k != "block_size"}, "lacks 'block_size'"),
        ({**LSTM, "hidden": -1}, "hidden = -1"),
        ({**LSTM, "num_layers": True}, "positive integer"),
        ({"type": "gpt-5"}, "is not known"),
    ],
)
def test_bad_sequence_archs(arch, text):
    with pytest.raises(CheckpointError, match=text):
        build_arch(arch)


# ------------------------------------------------------------------ text and examples
def test_shipped_text_and_its_source_note():
    text = shipped_text()
    assert 300_000 < len(text) < 1_000_000 and text.isascii()
    assert text.startswith("Genesis\n\nIn the beginning God created the heaven and the earth.")
    note = resources.files("curvscope.io").joinpath("data/TEXT-SOURCE.txt").read_text()
    assert "bible-kjv-text 4.38" in note and "public domain" in note
    raw = resources.files("curvscope.io").joinpath("data/kjv.txt.gz").read_bytes()
    assert gzip.decompress(raw).decode("ascii") == text


def test_encode_text():
    vocab, ids = encode_text("hello world\n")
    assert vocab == "\n dehlorw" and ids.dtype == np.uint16
    assert "".join(vocab[i] for i in ids) == "hello world\n"


def test_train_char_lm_is_deterministic_and_learns(tmp_path):
    vocab, ids = encode_text(shipped_text()[:20000])
    arch = {**GPT, "vocab_size": len(vocab), "block_size": 16}
    kw = {"steps": 30, "batch_size": 8, "lr": 1e-2, "block_size": 16, "seed": 5}
    model, losses = train_char_lm(arch, ids, **kw)
    again, losses2 = train_char_lm(arch, ids, **kw)
    assert losses == losses2 and not model.training
    assert all(
        torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters(), strict=True)
    )
    assert np.mean(losses[-5:]) < losses[0] - 0.5
    lstm, lstm_losses = train_char_lm({**LSTM, "vocab_size": len(vocab)}, ids, **kw)
    assert np.mean(lstm_losses[-5:]) < lstm_losses[0] - 0.5
    assert {"tiny-gpt", "lstm"} <= set(EXAMPLES)
