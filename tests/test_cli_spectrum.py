"""End-to-end command-line tests: the spectrum command, the example command, bad input."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from curvscope import __version__
from curvscope.cli import app
from curvscope.io import build_arch, load_checkpoint, load_eigenvectors, save_checkpoint

from .truth import dense_hessian

runner = CliRunner()
ARCH = {"type": "mlp", "sizes": [4, 6, 3], "activation": "tanh", "bias": True}


@pytest.fixture
def tiny(tmp_path):
    """A tiny curvscope checkpoint with its data beside it."""
    torch.manual_seed(0)
    model = build_arch(ARCH)
    g = np.random.default_rng(0)
    np.savez(
        tmp_path / "data.npz",
        x=g.normal(size=(23, 4)).astype(np.float32),
        y=g.integers(0, 3, size=23),
    )
    meta = {"data": "data.npz", "loss": "cross_entropy", "reduction": "mean"}
    save_checkpoint(tmp_path / "model.pt", model, ARCH, meta)
    return tmp_path


def run(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result


def test_version_and_module_entry():
    result = run("--version")
    assert result.exit_code == 0 and __version__ in result.output


def test_spectrum_end_to_end_against_dense_float64(tiny):
    out = tiny / "res"
    result = run(
        "spectrum",
        tiny / "model.pt",
        "--dtype",
        "float64",
        "--tol",
        "1e-10",
        "--top",
        "3",
        "--bottom",
        "2",
        "--out",
        out,
        "--batch-size",
        "10",
        "--save-eigenvectors",
    )
    assert result.exit_code == 0, result.output
    doc = json.loads((out / "spectrum.json").read_text())
    assert doc["schema"] == "curvscope.result/1" and doc["command"] == "spectrum"
    assert doc["input"]["data"]["num_samples"] == 23
    assert doc["input"]["model"]["num_params"] == 4 * 6 + 6 + 6 * 3 + 3
    top, bottom = doc["results"]["spectra"]
    loaded = load_checkpoint(tiny / "model.pt").model.double()
    with np.load(tiny / "data.npz") as f:
        x, y = torch.from_numpy(f["x"]).double(), torch.from_numpy(f["y"]).long()
    ev = np.linalg.eigvalsh(dense_hessian(loaded, "cross_entropy", [(x, y)], "mean").numpy())
    scale = np.abs(ev).max()
    assert np.allclose(top["eigenvalues"], ev[::-1][:3], atol=1e-8 * scale)
    assert np.allclose(bottom["eigenvalues"], ev[:2], atol=1e-8 * scale)
    assert all(top["converged"]) and max(top["residual_norms"]) <= 1e-10 * scale * 1.01
    vecs = load_eigenvectors(out / "eigenvectors.pt")
    assert vecs["entries"][0]["vectors"].shape == (len(ev), 3)
    assert "residual" in result.output and "spectrum.json" in result.output
    # at 1e-10 the residuals are below a float64 product's round-off too, where measured (the
    # Lanczos relation's, verified by two random combinations, carry the check's margin)
    floored = any(b > r for b, r in zip(top["error_bounds"], top["residual_norms"], strict=True))
    assert floored == ("round-off of one product" in " ".join(result.output.split()))
    assert floored or top["residual_check"] == "relation"
    assert "--dtype float64 lowers" not in " ".join(result.output.split())


def test_the_footer_says_when_round_off_sets_the_bounds(tiny):
    """In float32 at a tolerance below a product's round-off, the bounds are the floor, not
    min(r, r^2/gap): the footer says so (seen on a 1.4M-parameter LSTM: residual 3e-6, bound
    1.1e-3)."""
    out = tiny / "f32"
    result = run("spectrum", tiny / "model.pt", "--tol", "1e-7", "--top", "2", "--bottom", "0",
                 "--out", out)
    assert result.exit_code in (0, 3), result.output
    (top,) = json.loads((out / "spectrum.json").read_text())["results"]["spectra"]
    assert any(b > r for b, r in zip(top["error_bounds"], top["residual_norms"], strict=True))
    assert "round-off of one product" in " ".join(result.output.split())
    assert "--dtype float64 lowers it" in " ".join(result.output.split())


def test_example_then_spectrum_with_no_other_flag(tmp_path):
    result = run("example", "sinus-mlp", "--out", tmp_path / "ex")
    assert result.exit_code == 0, result.output
    result = run(
        "spectrum",
        tmp_path / "ex" / "model.pt",
        "--out",
        tmp_path / "o",
        "--top",
        "2",
        "--bottom",
        "1",
        "--dtype",
        "float64",
        "--tol",
        "1e-10",
    )
    assert result.exit_code == 0, result.output
    doc = json.loads((tmp_path / "o" / "spectrum.json").read_text())
    assert doc["input"]["loss"] == "mse"
    loaded = load_checkpoint(tmp_path / "ex" / "model.pt").model.double()
    with np.load(tmp_path / "ex" / "data.npz") as f:
        x, y = torch.from_numpy(f["x"]).double(), torch.from_numpy(f["y"]).double()
    ev = np.linalg.eigvalsh(dense_hessian(loaded, "mse", [(x, y)], "mean").numpy())
    top, bottom = doc["results"]["spectra"]
    scale = np.abs(ev).max()
    assert np.allclose(top["eigenvalues"], ev[::-1][:2], atol=1e-8 * scale)
    assert np.allclose(bottom["eigenvalues"], ev[:1], atol=1e-8 * scale)


def test_strict_exit_code_on_non_convergence(tiny):
    result = run(
        "spectrum",
        tiny / "model.pt",
        "--max-matvecs",
        "9",
        "--tol",
        "1e-14",
        "--top",
        "3",
        "--bottom",
        "1",
        "--strict",
        "--out",
        tiny / "o",
    )
    assert result.exit_code == 3, result.output
    assert "did not reach" in result.output


def _one_sentence_error(result, pattern):
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    text = " ".join(result.output.split())
    assert "error:" in text
    import re

    assert re.search(pattern, text), text


def test_bad_input_gives_one_sentence_and_exit_1(tiny):
    model = tiny / "model.pt"
    out = tiny / "o"
    _one_sentence_error(run("spectrum", tiny / "nope.pt"), r"nope.pt does not exist")
    (tiny / "junk.pt").write_bytes(b"junk")
    _one_sentence_error(run("spectrum", tiny / "junk.pt"), r"not a checkpoint curvscope can read")
    torch.save(build_arch(ARCH), tiny / "whole.pt")
    _one_sentence_error(
        run("spectrum", tiny / "whole.pt", "--data", tiny / "data.npz"),
        r"arbitrary code.*--trust-checkpoint",
    )
    torch.save(build_arch(ARCH).state_dict(), tiny / "sd.pt")
    _one_sentence_error(run("spectrum", tiny / "sd.pt"), r"plain state dict.*--model")
    _one_sentence_error(
        run(
            "spectrum",
            tiny / "sd.pt",
            "--model",
            "tests.test_io:builder",
            "--data",
            tiny / "data.npz",
        ),
        r"does not fit the model: shape mismatch",
    )
    np.savez(tiny / "wide.npz", x=np.zeros((5, 7), np.float32), y=np.zeros(5, np.int64))
    _one_sentence_error(
        run("spectrum", model, "--data", tiny / "wide.npz"),
        r"do not fit the model's forward.*--input-shape",
    )
    np.savez(tiny / "lab.npz", x=np.zeros((5, 4), np.float32), y=np.array([0, 1, 2, 7, 1]))
    _one_sentence_error(
        run("spectrum", model, "--data", tiny / "lab.npz"),
        r"range over 0..7 but the model has 3 outputs",
    )
    np.savez(tiny / "nan.npz", x=np.full((5, 4), np.nan, np.float32), y=np.zeros(5, np.int64))
    _one_sentence_error(run("spectrum", model, "--data", tiny / "nan.npz"), r"NaN or Inf")
    nanmodel = build_arch(ARCH)
    with torch.no_grad():
        nanmodel[2].bias[1] = float("inf")
    save_checkpoint(tiny / "nanw.pt", nanmodel, ARCH, {"data": "data.npz", "loss": "cross_entropy"})
    _one_sentence_error(run("spectrum", tiny / "nanw.pt"), r"parameter 2.bias holds NaN or Inf")
    _one_sentence_error(
        run("spectrum", model, "--top", "0", "--bottom", "0", "--out", out),
        r"at least one eigenvalue",
    )
    _one_sentence_error(run("spectrum", model, "--top", "60", "--out", out), r"only 51 rows")
    _one_sentence_error(
        run("spectrum", model, "--method", "qr", "--out", out), r"--method 'qr' is not known"
    )
    _one_sentence_error(
        run("spectrum", model, "--matrix", "hessian,fishr", "--out", out),
        r"--matrix 'fishr' is not known; choose from hessian, ggn",
    )
    _one_sentence_error(
        run("spectrum", model, "--dtype", "float16", "--out", out),
        r"--dtype 'float16' is not supported",
    )
    _one_sentence_error(
        run("spectrum", model, "--params", "fc*", "--out", out), r"matches no parameter"
    )
    if not torch.cuda.is_available():
        _one_sentence_error(
            run("spectrum", model, "--device", "cuda", "--out", out), r"no CUDA device"
        )
    assert not out.exists() or not (out / "spectrum.json").exists()


def test_usage_errors_exit_2(tiny):
    result = run("spectrum", tiny / "model.pt", "--top", "many")
    assert result.exit_code == 2
    result = run("spectrum", tiny / "model.pt", "--no-such-flag")
    assert result.exit_code == 2


def test_unknown_example_name(tmp_path):
    _one_sentence_error(
        run("example", "imagenet-resnet", "--out", tmp_path),
        r"example 'imagenet-resnet' is not known; choose one of digits-mlp",
    )
