import gzip
import importlib.util
import pickle
import struct
import sys

import numpy as np
import pytest
import torch
from torch import nn

from curvscope import CheckpointError, DataError, NonFiniteError
from curvscope.io import (
    build_arch,
    check_fits,
    load_checkpoint,
    load_dataset,
    save_checkpoint,
    save_safetensors,
)

ARCH = {"type": "mlp", "sizes": [4, 5, 3], "activation": "tanh", "bias": True}
META = {"data": "data.npz", "loss": "cross_entropy", "reduction": "mean"}


def make_model():
    torch.manual_seed(0)
    return build_arch(ARCH)


def builder():  # used as --model tests.test_io:builder
    return build_arch(ARCH)


def same_outputs(a, b):
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return torch.allclose(a.eval()(x), b.eval()(x))


def test_curvscope_checkpoint_round_trip_and_content_detection(tmp_path):
    model = make_model()
    path = save_checkpoint(tmp_path / "model.pt", model, ARCH, META)
    loaded = load_checkpoint(path)
    assert loaded.format == "curvscope/1" and loaded.meta["loss"] == "cross_entropy"
    assert same_outputs(model, loaded.model)
    renamed = tmp_path / "weights.bin"
    renamed.write_bytes(path.read_bytes())
    assert load_checkpoint(renamed).format == "curvscope/1"
    assert len(loaded.sha256) == 64


def test_safetensors_with_arch_metadata(tmp_path):
    model = make_model()
    path = save_safetensors(tmp_path / "model.safetensors", model, ARCH, META)
    loaded = load_checkpoint(path)
    assert loaded.format == "safetensors" and loaded.meta == META
    assert same_outputs(model, loaded.model)


def test_state_dict_with_model_callable_and_file(tmp_path):
    model = make_model()
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    loaded = load_checkpoint(tmp_path / "sd.pt", model="tests.test_io:builder")
    assert loaded.format == "state_dict" and same_outputs(model, loaded.model)
    script = tmp_path / "net.py"
    script.write_text(
        "from torch import nn\n"
        "def build():\n"
        "    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))\n"
    )
    loaded = load_checkpoint(tmp_path / "sd.pt", model=f"{script}:build")
    assert same_outputs(model, loaded.model)


def test_wrapped_state_dicts(tmp_path):
    model = make_model()
    torch.save({"model_state_dict": model.state_dict(), "epoch": 3}, tmp_path / "w.pt")
    loaded = load_checkpoint(tmp_path / "w.pt", model="tests.test_io:builder")
    assert same_outputs(model, loaded.model)
    assert loaded.notes == ["state dict found under the key 'model_state_dict'."]
    loaded = load_checkpoint(
        tmp_path / "w.pt", model="tests.test_io:builder", state_key="model_state_dict"
    )
    assert same_outputs(model, loaded.model) and loaded.notes == []
    with pytest.raises(CheckpointError, match="has no key 'nope' .*keys are 'model_state_dict'"):
        load_checkpoint(tmp_path / "w.pt", model="tests.test_io:builder", state_key="nope")
    torch.save({f"model.{k}": v for k, v in model.state_dict().items()}, tmp_path / "l.pt")
    with pytest.raises(CheckpointError, match="strip_prefix model.") as info:
        load_checkpoint(tmp_path / "l.pt", model="tests.test_io:builder")
    assert info.value.options == ["strip_prefix"]
    loaded = load_checkpoint(
        tmp_path / "l.pt", model="tests.test_io:builder", strip_prefix="model."
    )
    assert same_outputs(model, loaded.model)


def test_state_dict_under_any_single_wrapper_key(tmp_path):
    model = make_model()
    other = nn.Sequential(nn.Linear(4, 2))
    optim = {"state": {}, "param_groups": [{"lr": 0.1}]}
    torch.save({"model_state": model.state_dict(), "optim": optim, "epoch": 3}, tmp_path / "a.pt")
    loaded = load_checkpoint(tmp_path / "a.pt", model="tests.test_io:builder")
    assert same_outputs(model, loaded.model) and "'model_state'" in loaded.notes[0]
    # two dicts of tensors: the one that fits the model is chosen
    both = {"head": other.state_dict(), "net": model.state_dict(), "step": 7}
    torch.save(both, tmp_path / "b.pt")
    loaded = load_checkpoint(tmp_path / "b.pt", model="tests.test_io:builder")
    assert same_outputs(model, loaded.model) and "'net'" in loaded.notes[0]
    # two that fit (weights and their moving average): the user must choose
    torch.save({"net": model.state_dict(), "ema": model.state_dict()}, tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match="'net', 'ema' and 2 fit .*choose one with state_key"):
        load_checkpoint(tmp_path / "c.pt", model="tests.test_io:builder")
    loaded = load_checkpoint(tmp_path / "c.pt", model="tests.test_io:builder", state_key="ema")
    assert same_outputs(model, loaded.model)
    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "d.pt")
    with pytest.raises(CheckpointError, match="d.pt holds a dict with no tensors"):
        load_checkpoint(tmp_path / "d.pt")
    with pytest.raises(CheckpointError, match="d.pt holds no tensors .*'epoch', 'lr'.*state_key"):
        load_checkpoint(tmp_path / "d.pt", model="tests.test_io:builder")


def test_load_strict_false_ignores_extra_entries_but_not_missing_ones(tmp_path):
    model = make_model()
    state = dict(model.state_dict(), **{"aux.weight": torch.ones(2), "aux.bias": torch.ones(2)})
    torch.save(state, tmp_path / "extra.pt")
    with pytest.raises(CheckpointError, match=r"unexpected keys \['aux.bias', 'aux.weight'\]"):
        load_checkpoint(tmp_path / "extra.pt", model="tests.test_io:builder")
    loaded = load_checkpoint(
        tmp_path / "extra.pt", model="tests.test_io:builder", load_strict=False
    )
    assert same_outputs(model, loaded.model)
    assert loaded.notes == ["ignored 2 entries that are not in the model: aux.bias, aux.weight."]
    # the same in a curvscope checkpoint and under a wrapper key
    save_checkpoint(tmp_path / "m.pt", model, ARCH, META)
    doc = torch.load(tmp_path / "m.pt", weights_only=True)
    doc["state_dict"]["aux.weight"] = torch.ones(2)
    torch.save(doc, tmp_path / "m2.pt")
    with pytest.raises(CheckpointError, match="aux.weight.*load_strict=False") as refused:
        load_checkpoint(tmp_path / "m2.pt")
    from curvscope.cli._common import flag_name

    # the command line names its flag, a boolean that is turned off
    assert refused.value.render(flag_name).endswith("pass --no-load-strict.")
    assert "aux.weight" in load_checkpoint(tmp_path / "m2.pt", load_strict=False).notes[0]
    torch.save({"model": state, "epoch": 1}, tmp_path / "w.pt")
    loaded = load_checkpoint(tmp_path / "w.pt", model="tests.test_io:builder", load_strict=False)
    assert same_outputs(model, loaded.model) and len(loaded.notes) == 2
    partial = {k: v for k, v in state.items() if k != "2.bias"}
    torch.save(partial, tmp_path / "partial.pt")
    with pytest.raises(CheckpointError, match=r"missing keys \['2.bias'\]"):
        load_checkpoint(tmp_path / "partial.pt", model="tests.test_io:builder", load_strict=False)


def test_torchscript_and_trusted_pickle(tmp_path):
    model = make_model()
    torch.jit.save(torch.jit.script(model), tmp_path / "ts.pt")
    loaded = load_checkpoint(tmp_path / "ts.pt")
    assert loaded.format == "torchscript" and any("double backward" in n for n in loaded.notes)
    torch.save(model, tmp_path / "whole.pt")
    with pytest.raises(CheckpointError, match="arbitrary code.*trust_checkpoint"):
        load_checkpoint(tmp_path / "whole.pt")
    loaded = load_checkpoint(tmp_path / "whole.pt", trust_checkpoint=True)
    assert loaded.format == "pickle" and same_outputs(model, loaded.model)


def test_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"hello, not a checkpoint")
    with pytest.raises(CheckpointError, match="not a checkpoint curvscope can read"):
        load_checkpoint(tmp_path / "junk.pt")
    model = make_model()
    path = save_checkpoint(tmp_path / "m.pt", model, ARCH, META)
    (tmp_path / "cut.pt").write_bytes(path.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="corrupt or not a checkpoint"):
        load_checkpoint(tmp_path / "cut.pt")
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    with pytest.raises(CheckpointError, match="plain state dict; pass builder MODULE:CALLABLE"):
        load_checkpoint(tmp_path / "sd.pt")
    other = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3), nn.Linear(3, 2))
    torch.save(other.state_dict(), tmp_path / "big.pt")
    with pytest.raises(CheckpointError, match=r"unexpected keys \['3.bias', '3.weight'\]"):
        load_checkpoint(tmp_path / "big.pt", model="tests.test_io:builder")
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    save_checkpoint(tmp_path / "nan.pt", model, ARCH, META)
    with pytest.raises(NonFiniteError, match="parameter 0.weight holds NaN"):
        load_checkpoint(tmp_path / "nan.pt")
    bad = dict(ARCH, type="transformer")
    save_checkpoint(tmp_path / "arch.pt", make_model(), bad, META)
    with pytest.raises(CheckpointError, match="arch type 'transformer' is not known"):
        load_checkpoint(tmp_path / "arch.pt")
    seq = {"type": "sequential", "layers": [{"type": "Eval", "args": {}}]}
    with pytest.raises(CheckpointError, match="not in the allow-list"):
        build_arch(seq)


def _write_idx(path, array, dtype_code):
    header = struct.pack(">BBBB", 0, 0, dtype_code, array.ndim)
    header += b"".join(struct.pack(">I", d) for d in array.shape)
    data = header + array.astype(">u1" if dtype_code == 8 else ">f4").tobytes()
    if path.suffix == ".gz":
        data = gzip.compress(data)
    path.write_bytes(data)


def test_every_data_format_loads_the_same_arrays(tmp_path):
    g = np.random.default_rng(0)
    x = g.integers(0, 255, size=(10, 2, 3)).astype(np.uint8)
    y = g.integers(0, 4, size=10).astype(np.uint8)
    xf = x.reshape(10, -1).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=xf, y=y)
    np.savez(tmp_path / "k.npz", inputs_=xf, lab=y)
    torch.save((torch.from_numpy(xf), torch.from_numpy(y)), tmp_path / "d.pt")
    with open(tmp_path / "d.csv", "w") as fh:
        fh.write(",".join([f"p{i}" for i in range(6)] + ["label"]) + "\n")
        for row, lab in zip(xf, y, strict=True):
            fh.write(",".join(str(v) for v in row) + f",{lab}\n")
    idx = tmp_path / "idx"
    idx.mkdir()
    _write_idx(idx / "train-images-idx3-ubyte.gz", x, 8)
    _write_idx(idx / "train-labels-idx1-ubyte.gz", y, 8)
    _write_idx(idx / "t10k-images-idx3-ubyte", x[:4], 8)
    _write_idx(idx / "t10k-labels-idx1-ubyte", y[:4], 8)
    loads = [
        load_dataset(tmp_path / "d.npz"),
        load_dataset(tmp_path / "k.npz", x_key="inputs_", y_key="lab"),
        load_dataset(tmp_path / "d.pt"),
        load_dataset(tmp_path / "d.csv", label_column="label"),
        load_dataset(idx, input_shape="6"),
        load_dataset(idx / "train-images-idx3-ubyte.gz", input_shape="6"),
    ]
    for ds in loads:
        assert torch.allclose(ds.x, torch.from_numpy(xf)), ds.source
        assert torch.equal(ds.y, torch.from_numpy(y).long()), ds.source
    test = load_dataset(idx, split="test", input_shape="1,2,3", scale=255)
    assert test.x.shape == (4, 1, 2, 3) and float(test.x.max()) <= 1.0
    norm = load_dataset(tmp_path / "d.npz", normalize="10,2")
    assert torch.allclose(norm.x, (torch.from_numpy(xf) - 10) / 2)
    with pytest.raises(DataError, match="name the inputs and labels with x_key"):
        load_dataset(tmp_path / "k.npz")
    with pytest.raises(DataError, match="label_column 'nope' is not a column"):
        load_dataset(tmp_path / "d.csv", label_column="nope")
    with pytest.raises(DataError, match="input_shape 5 has 5 values but each sample"):
        load_dataset(tmp_path / "d.npz", input_shape="5")


def test_builtins_and_data_errors(tmp_path):
    digits = load_dataset("digits")
    assert digits.x.shape == (1797, 64) and digits.num_classes == 10
    assert 0.0 <= float(digits.x.min()) and float(digits.x.max()) <= 1.0
    assert load_dataset("sinus").x.shape[1] == 1
    assert set(load_dataset("blobs2d").y.tolist()) == {0, 1}
    sub = digits.subset(100, seed=3)
    assert len(sub) == 100 and torch.equal(sub.x, digits.subset(100, seed=3).x)
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(tmp_path / "none.npz")
    with pytest.raises(DataError, match="never downloads"):
        load_dataset("mnist")
    model = make_model()
    x = torch.randn(5, 7)
    from curvscope.io import Dataset

    with pytest.raises(DataError, match=r"samples of shape \(7,\).*input_shape"):
        check_fits(model, Dataset(x, torch.zeros(5, dtype=torch.long), "t", ""), "cross_entropy")
    with pytest.raises(DataError, match=r"range over 0..5 but the model has 3 outputs"):
        labels = torch.tensor([0, 1, 2, 0, 5])
        check_fits(model, Dataset(torch.randn(5, 4), labels, "t", ""), "cross_entropy")
    bad = torch.randn(5, 4)
    bad[1, 1] = float("nan")
    with pytest.raises(NonFiniteError, match="hold NaN or Inf"):
        check_fits(model, Dataset(bad, torch.zeros(5, dtype=torch.long), "t", ""), "cross_entropy")


def test_pickle_payload_is_not_executed_without_trust(tmp_path):
    class Evil:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))

    (tmp_path / "evil.pt").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "evil.pt")
    assert not (tmp_path / "pwned").exists()


def test_known_tracebacks_are_data_errors(tmp_path):
    """Issue 14: inputs that used to reach a traceback get one sentence naming the file."""
    model = make_model()
    np.savez(tmp_path / "empty.npz", x=np.zeros((0, 4), np.float32), y=np.zeros(0, np.int64))
    with pytest.raises(DataError, match="empty.npz holds no samples"):
        load_dataset(tmp_path / "empty.npz")
    from curvscope.io import Dataset

    empty = Dataset(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), "e.npz", "")
    with pytest.raises(DataError, match="e.npz holds no samples"):  # min() of no labels
        check_fits(model, empty, "cross_entropy")
    (tmp_path / "hdr.csv").write_text("a,b,c,d,label\n")
    with pytest.raises(DataError, match="hdr.csv has a header but no rows"):  # IndexError
        load_dataset(tmp_path / "hdr.csv")
    np.savez(tmp_path / "full.npz", x=np.zeros((10, 4), np.float32), y=np.zeros(10, np.int64))
    data = (tmp_path / "full.npz").read_bytes()
    (tmp_path / "half.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="half.npz is not a readable .npz file"):  # BadZipFile
        load_dataset(tmp_path / "half.npz")


def test_dataset_records_every_file_it_read(tmp_path):
    from curvscope.io import file_sha256

    x = np.arange(24, dtype=np.uint8).reshape(6, 2, 2)
    y = np.arange(6, dtype=np.uint8) % 3
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", x, 8)
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", y, 8)
    pair = [tmp_path / "train-images-idx3-ubyte.gz", tmp_path / "train-labels-idx1-ubyte.gz"]
    expected = {str(p): file_sha256(p) for p in pair}
    assert load_dataset(pair[0]).files == expected
    assert load_dataset(tmp_path).files == expected
    np.savez(tmp_path / "d.npz", x=x.reshape(6, 4), y=y)
    ds = load_dataset(tmp_path / "d.npz")
    assert ds.files == {str(tmp_path / "d.npz"): ds.sha256}
    assert ds.subset(3, seed=0).files == ds.files
    assert load_dataset("sinus").files == {}


@pytest.mark.parametrize(
    ("arrays", "match"),
    [
        ({"x": np.array([["a"] * 4] * 3), "y": np.arange(3)}, "inputs of .*strings or objects"),
        ({"x": np.ones((3, 4), complex), "y": np.arange(3)}, "inputs of .* complex numbers"),
        ({"x": np.ones((3, 4)), "y": np.arange(2)}, "3 inputs but 2 labels"),
        ({"x": np.ones((2, 4)), "y": np.int64(1)}, "labels of .* one number"),
        ({"x": np.float32(3), "y": np.arange(1)}, "holds no samples"),
    ],
)
def test_malformed_arrays_are_data_errors(tmp_path, arrays, match):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DataError, match=match) as info:
        load_dataset(tmp_path / "bad.npz")
    assert "bad.npz" in str(info.value) and info.value.path == str(tmp_path / "bad.npz")


def test_damaged_idx_headers_are_data_errors(tmp_path):
    y = np.arange(3, dtype=np.uint8)
    _write_idx(tmp_path / "a-labels-idx1-ubyte", y, 8)
    images = tmp_path / "a-images-idx3-ubyte"
    for raw, match in [
        (b"\x00\x00\x08\x04" + b"\xff" * 16, r"header gives shape \(4294967295, "),  # no alloc
        (b"\x00\x00\x08\xff", "truncated inside its IDX header"),
        (b"\x01\x02\x08\x01", "bad magic number"),
        (b"", "bad magic number"),
    ]:
        images.write_bytes(raw)
        with pytest.raises(DataError, match=match):
            load_dataset(images)
    _write_idx(tmp_path / "b-labels-idx1-ubyte.gz", y, 8)
    (tmp_path / "b-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x01\x03")[:-6])
    with pytest.raises(DataError, match="b-images-idx3-ubyte.gz cannot be read"):  # EOFError
        load_dataset(tmp_path / "b-images-idx3-ubyte.gz")


def test_preprocessing_arguments_are_checked(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.ones((2, 4), np.float32), y=np.arange(2))
    for kwargs, match in [
        ({"input_shape": "nan"}, "input_shape 'nan' .* finite"),
        ({"input_shape": "-1,-4"}, "input_shape '-1,-4' .* positive whole numbers"),
        ({"scale": float("nan")}, "scale nan .* finite number other than 0"),
        ({"scale": 0}, "scale 0 .* other than 0"),
        ({"normalize": "0,nan"}, "normalize '0,nan' .* finite"),
        ({"normalize": "0,-1"}, "normalize standard deviations .* positive"),
    ]:
        with pytest.raises(DataError, match=match):
            load_dataset(tmp_path / "d.npz", **kwargs)


MYMODELS = """
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x)
"""


def test_trusted_pickle_imports_its_class_from_beside_the_checkpoint(tmp_path, monkeypatch):
    """Issue 14 item 6: a model pickled by a script whose class lives in mymodels.py."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "mymodels.py").write_text(MYMODELS)
    spec = importlib.util.spec_from_file_location("mymodels", run / "mymodels.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["mymodels"] = module  # as the training script had it while pickling
    try:
        spec.loader.exec_module(module)
        torch.manual_seed(0)
        net = module.Net()
        torch.save(net, run / "whole.pt")
    finally:
        del sys.modules["mymodels"]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    path_before = list(sys.path)
    try:
        loaded = load_checkpoint(run / "whole.pt", trust_checkpoint=True)
        assert loaded.format == "pickle" and type(loaded.model).__module__ == "mymodels"
        assert same_outputs(net, loaded.model)
        assert sys.path == path_before
    finally:
        sys.modules.pop("mymodels", None)
    (run / "mymodels.py").unlink()
    importlib.invalidate_caches()
    try:
        with pytest.raises(CheckpointError, match="needs the module 'mymodels'") as info:
            load_checkpoint(run / "whole.pt", trust_checkpoint=True)
    finally:
        sys.modules.pop("mymodels", None)
    message = str(info.value)
    assert "whole.pt" in message and "\n" not in message
    assert "builder MODULE:CALLABLE" in message and "mymodels.py to PYTHONPATH" in message
    assert sys.path == path_before


def test_loaded_model_records_every_file_it_read(tmp_path):
    from curvscope.io import file_sha256

    model = make_model()
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    script = tmp_path / "net.py"
    script.write_text("from tests.test_io import builder as build\n")
    loaded = load_checkpoint(tmp_path / "sd.pt", model=f"{script}:build")
    assert loaded.files == {
        str(tmp_path / "sd.pt"): loaded.sha256,
        str(script): file_sha256(script),
    }
    path = save_checkpoint(tmp_path / "m.pt", model, ARCH, META)
    assert load_checkpoint(path).files == {str(path): file_sha256(path)}
    via_module = load_checkpoint(tmp_path / "sd.pt", model="tests.test_io:builder")
    assert any(p.endswith("test_io.py") for p in via_module.files)


def test_damaged_trusted_pickles_are_refused_before_unpickling(tmp_path):
    """The full unpickler would allocate for a damaged memo index; fuzzing found 5-30 s stalls."""
    import zipfile

    torch.save(make_model(), tmp_path / "whole.pt")
    data = bytearray((tmp_path / "whole.pt").read_bytes())
    with zipfile.ZipFile(tmp_path / "whole.pt") as zf:
        info = next(i for i in zf.infolist() if i.filename.endswith("data.pkl"))
    start = info.header_offset + 30 + len(info.filename) + len(info.extra)
    at = data.index(b"Linear", start)  # a class name inside data.pkl: torch never checks CRCs
    data[at + 5] ^= 1
    (tmp_path / "flipped.pt").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="flipped.pt is corrupt: .*Bad CRC-32"):
        load_checkpoint(tmp_path / "flipped.pt", trust_checkpoint=True)
    # a legacy-format pickle whose memo index is far beyond any a pickler writes
    memo = b"\x80\x02cbuiltins\nprint\nr" + struct.pack("<I", 10**6) + b"."
    (tmp_path / "memo.pt").write_bytes(memo)
    with pytest.raises(CheckpointError, match="memo.pt is corrupt: .*memo index 1000000"):
        load_checkpoint(tmp_path / "memo.pt", trust_checkpoint=True)
    with pytest.raises(CheckpointError, match="memo.pt is a pickled object .it needs print"):
        load_checkpoint(tmp_path / "memo.pt")
