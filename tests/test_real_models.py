"""Models as people ship them: scripted parts, extra forward arguments, several outputs, their
own losses and data sources, through the command line; every mistake one sentence, exit 1."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import curvscope as cs
from curvscope.cli import app
from curvscope.operators import EmpiricalFisherOperator, GGNOperator, HessianOperator

from .cases import CASES, build
from .truth import assert_close, dense_hessian

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


class TwoHeads(nn.Module):
    """Features, then two heads; forward(x, sr) returns a tuple (as audio models do)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 5), nn.Tanh())
        self.cls = nn.Linear(5, 3)
        self.aux = nn.Linear(5, 2)  # never used by the loss: zero rows of every matrix

    def forward(self, x, sr):
        h = self.body(x) * (sr / 16000.0)
        return self.cls(h), self.aux(h)


def _write(tmp_path, model):
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    (tmp_path / "net.py").write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(tmp_path)!r})\n"
        "from heads import TwoHeads\n"
        "def make():\n    return TwoHeads()\n"
    )
    import inspect

    (tmp_path / "heads.py").write_text(
        "import torch\nfrom torch import nn\n\n\n" + inspect.getsource(TwoHeads)
    )
    x = torch.randn(9, 4)
    y = torch.randint(0, 3, (9,))
    torch.save((x, y), tmp_path / "data.pt")


def test_extra_forward_arguments_and_several_outputs(tmp_path):
    torch.manual_seed(0)
    _write(tmp_path, TwoHeads())
    base = [
        tmp_path / "sd.pt",
        "--model",
        f"{tmp_path / 'net.py'}:make",
        "--data",
        tmp_path / "data.pt",
        "--loss",
        "cross_entropy",
    ]
    res = run("spectrum", *base, "--out", tmp_path / "o")
    assert res.exit_code == 1
    assert "forward also needs sr" in res.output and "--forward-kwargs" in res.output
    res = run("spectrum", *base, "--forward-kwargs", "sr=16000", "--out", tmp_path / "o")
    assert res.exit_code == 1 and "--output" in res.output and "tuple of 2" in res.output
    res = run(
        "spectrum",
        *base,
        "--forward-kwargs",
        "sr=16000",
        "--output",
        "0",
        "--top",
        "2",
        "--bottom",
        "1",
        "--dtype",
        "float64",
        "--out",
        tmp_path / "o",
    )
    assert res.exit_code == 0, res.output
    doc = json.loads((tmp_path / "o" / "spectrum.json").read_text())
    assert all(doc["results"]["spectra"][0]["converged"])


def test_unused_head_gives_zero_rows_not_a_traceback():
    torch.manual_seed(0)
    model = TwoHeads().double()
    x = torch.randn(7, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (7,))
    prob = cs.Problem(
        model,
        "cross_entropy",
        [(x[:3], y[:3]), (x[3:], y[3:])],
        forward_kwargs={"sr": 16000},
        output=0,
    )
    V = torch.randn(prob.num_params, 3, dtype=torch.float64)
    aux = prob.param_slices()["aux.weight"]
    for op in (HessianOperator(prob), GGNOperator(prob), EmpiricalFisherOperator(prob)):
        out = op @ V
        assert torch.isfinite(out).all()
        assert float(out[aux].abs().max()) == 0.0


def test_scripted_submodule_is_detected_and_matrices_still_work():
    model, loss, data, red = build(CASES[0])
    truth = dense_hessian(model, loss, data, red)

    class Wrapper(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = torch.jit.script(inner)

        def forward(self, x):
            return self.inner(x)

    prob = cs.Problem(Wrapper(model), loss, data, reduction=red)
    assert prob.scripted
    V = torch.randn(prob.num_params, 2, dtype=torch.float64)
    assert_close(cs.hessian(prob) @ V, truth @ V, what="scripted-inside Hessian")
    assert torch.isfinite(cs.ggn(prob) @ V).all()
    with pytest.raises(cs.UnsupportedModelError, match="TorchScript"):
        cs.empirical_fisher(prob)


def test_builder_wraps_a_torchscript_file(tmp_path):
    torch.manual_seed(0)
    _write(tmp_path, TwoHeads())
    model = TwoHeads()
    torch.jit.save(torch.jit.script(model), tmp_path / "ts.pt")
    (tmp_path / "wrap.py").write_text(
        "import torch\n"
        "class Head(torch.nn.Module):\n"
        "    def __init__(self, inner):\n"
        "        super().__init__()\n"
        "        self.inner = inner\n"
        "    def forward(self, x):\n"
        "        return self.inner(x, torch.tensor(16000.0))[0]\n"
        "def wrap(module):\n    return Head(module)\n"
    )
    res = run(
        "spectrum",
        tmp_path / "ts.pt",
        "--model",
        f"{tmp_path / 'wrap.py'}:wrap",
        "--data",
        tmp_path / "data.pt",
        "--loss",
        "cross_entropy",
        "--top",
        "1",
        "--bottom",
        "0",
        "--out",
        tmp_path / "o",
    )
    assert res.exit_code == 0, res.output
    doc = json.loads((tmp_path / "o" / "spectrum.json").read_text())
    assert doc["input"]["model"]["format"] == "torchscript+builder"
    assert str(tmp_path / "wrap.py") in doc["input"]["files"]


def test_user_loss_and_data_source_files(tmp_path):
    model, loss, data, red = build(CASES[0])
    model = model.float()
    arch = {"type": "mlp", "sizes": [4, 5, 3], "activation": "tanh", "bias": True}
    cs_io = __import__("curvscope.io", fromlist=["save_checkpoint"])
    cs_io.save_checkpoint(tmp_path / "m.pt", model, arch, {"loss": "cross_entropy"})
    x, y = torch.randn(10, 4), torch.randint(0, 3, (10,))
    torch.save((x, y), tmp_path / "d.pt")
    (tmp_path / "src.py").write_text(
        "import torch\n"
        "from torch.utils.data import TensorDataset\n"
        f"def data():\n    return TensorDataset(*torch.load({str(tmp_path / 'd.pt')!r}))\n"
        "def noisy():\n"
        "    class N:\n"
        "        def __iter__(self):\n"
        f"            x, y = torch.load({str(tmp_path / 'd.pt')!r})\n"
        "            yield x + torch.randn_like(x), y\n"
        "    return N()\n"
    )
    (tmp_path / "losses.py").write_text(
        "import torch.nn.functional as F\n"
        "def ce(out, y):\n    return F.cross_entropy(out, y)\n"
        "def counted(out, y):\n    return F.cross_entropy(out, y, reduction='sum'), len(y)\n"
        "def broken(out, y):\n    raise ValueError('shapes disagree')\n"
        "def vector(out, y):\n    return F.cross_entropy(out, y, reduction='none')\n"
    )
    src = f"{tmp_path / 'src.py'}:data"
    common = ["--data", src, "--top", "1", "--bottom", "0", "--dtype", "float64"]
    docs = {}
    for name in ("ce", "counted"):
        res = run(
            "spectrum",
            tmp_path / "m.pt",
            *common,
            "--loss",
            f"{tmp_path / 'losses.py'}:{name}",
            "--reduction",
            "mean" if name == "ce" else "sum",
            "--out",
            tmp_path / name,
        )
        assert res.exit_code == 0, res.output
        docs[name] = json.loads((tmp_path / name / "spectrum.json").read_text())
    res = run("spectrum", tmp_path / "m.pt", *common, "--out", tmp_path / "builtin")
    assert res.exit_code == 0, res.output
    builtin = json.loads((tmp_path / "builtin" / "spectrum.json").read_text())
    lam = builtin["results"]["spectra"][0]["eigenvalues"][0]
    assert docs["ce"]["results"]["spectra"][0]["eigenvalues"][0] == pytest.approx(lam, rel=1e-9)
    # sum reduction over 10 samples: ten times the mean's eigenvalue
    assert docs["counted"]["results"]["spectra"][0]["eigenvalues"][0] == pytest.approx(
        10 * lam, rel=1e-9
    )
    for name, text in (
        ("broken", "raised ValueError: shapes disagree"),
        ("vector", "must return a scalar"),
    ):
        res = run(
            "spectrum",
            tmp_path / "m.pt",
            *common,
            "--loss",
            f"{tmp_path / 'losses.py'}:{name}",
            "--out",
            tmp_path / name,
        )
        assert res.exit_code == 1 and text in res.output, res.output
        assert "Traceback" not in res.output
    res = run(
        "spectrum",
        tmp_path / "m.pt",
        "--data",
        f"{tmp_path / 'src.py'}:noisy",
        "--out",
        tmp_path / "n",
    )
    assert res.exit_code == 1 and "differ between two passes" in res.output


def test_token_id_past_the_vocabulary(tmp_path):
    from curvscope.io import save_checkpoint
    from curvscope.models import TinyGPT

    arch = {
        "type": "tiny-gpt",
        "vocab_size": 5,
        "block_size": 6,
        "n_layer": 1,
        "n_head": 2,
        "n_embd": 4,
    }
    save_checkpoint(tmp_path / "m.pt", TinyGPT(5, 6, 1, 2, 4), arch, {"loss": "cross_entropy"})
    import numpy as np

    (tmp_path / "t.bin").write_bytes(
        np.array([1, 2, 3, 4, 7, 1, 2, 3, 0, 1, 2, 3, 4, 1], dtype="<u2").tobytes()
    )
    res = run(
        "spectrum",
        tmp_path / "m.pt",
        "--data",
        tmp_path / "t.bin",
        "--block-size",
        "6",
        "--out",
        tmp_path / "o",
    )
    assert res.exit_code == 1, res.output
    assert "past the model's vocabulary of 5" in res.output or "0..4" in res.output


def test_cli_on_a_once_differentiable_function_falls_back_skips_and_says_so(tmp_path):
    import numpy as np

    from .once_net import build

    model_file = f"{Path(__file__).parent / 'once_net.py'}:build"

    torch.manual_seed(0)
    net = build()
    torch.save(net.state_dict(), tmp_path / "w.pt")
    g = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=g.normal(size=(30, 4)).astype("float32"),
             y=g.integers(0, 3, size=30))
    base = [tmp_path / "w.pt", "--model", model_file, "--data",
            tmp_path / "d.npz", "--loss", "cross_entropy", "--dtype", "float64", "--top", "1",
            "--bottom", "0"]
    res = run("spectrum", *base, "--matrix", "hessian,ggn", "--out", tmp_path / "o")
    assert res.exit_code == 0, res.output
    assert "fell back to finite differences" in res.output
    assert "skipped ggn" in res.output and "OnceTanh" in res.output
    doc = json.loads((tmp_path / "o" / "spectrum.json").read_text())
    assert doc["hvp"]["hvp"] == "finite-difference" and "OnceTanh" in doc["hvp"]["fallback_reason"]
    assert [s["matrix"] for s in doc["results"]["spectra"]] == ["hessian"]
    assert any(n.startswith("skipped ggn:") for n in doc["notes"])
    # the truth: the same network with torch's tanh, in float64
    ref = net.twin().double()
    x = torch.from_numpy(np.load(tmp_path / "d.npz")["x"]).double()
    y = torch.from_numpy(np.load(tmp_path / "d.npz")["y"])
    top = float(torch.linalg.eigvalsh(dense_hessian(ref, "cross_entropy", [(x, y)], "mean"))[-1])
    got = doc["results"]["spectra"][0]["eigenvalues"][0]
    assert abs(got - top) <= 1e-6 * abs(top)
    for extra, text in ((["--matrix", "ggn"], "the ggn matrix needs J v"),
                        (["--hvp", "double-backward"], "--hvp double-backward: an operation")):
        res = run("spectrum", *base, *extra, "--out", tmp_path / "x")
        assert res.exit_code == 1 and text in res.output and "Traceback" not in res.output
        assert not (tmp_path / "x" / "spectrum.json").exists()
