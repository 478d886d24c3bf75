"""``--dtype bfloat16``: products in bfloat16, bounds that hold for the exact products.

A bfloat16 model's products carry about 4e-3 relative round-off. The iteration runs on them;
the final residual check runs on a float32 copy of the same (bfloat16) weights, so every
printed bound must hold against the dense float64 Hessian of the bfloat16-rounded model on
the data as given. Truth: double backward in float64, never curvscope's own products.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import curvscope as cs
from curvscope.cli import app
from curvscope.models import TinyGPT

from .cases import CASES, build, concat
from .truth import full_loss_fn, hessian_by_double_backward, unflattener


def _rounded64(model: nn.Module) -> nn.Module:
    """The model whose exact Hessian a bfloat16 run's bounds are about."""
    return copy.deepcopy(model).to(torch.bfloat16).to(torch.float64).eval()


def _truth(model, fn, data):
    net = _rounded64(model)
    unflat, w = unflattener(net)
    x, y = concat(data)

    def f(flat):
        return fn(torch.func.functional_call(net, unflat(flat), (x,)), y)

    return torch.linalg.eigvalsh(hessian_by_double_backward(f, w))


def _check(problem, ev, top=3, bottom=1):
    assert problem.dtype == torch.bfloat16
    H = cs.hessian(problem)
    assert H.dtype == torch.float32  # vectors and the basis are float32
    norm = float(ev.abs().max())
    results = cs.lanczos(H, top=top, bottom=bottom, seed=0)
    for res in results if isinstance(results, list) else [results]:
        want = ev.flip(0)[:top] if res.which == "top" else ev[:bottom]
        err = (res.eigenvalues.double() - want).abs()
        bounds = torch.as_tensor(res.error_bounds, dtype=torch.float64)
        assert bool((err <= bounds).all()), (res.which, err, bounds)
        # bounds are bfloat16-sized at most, not vacuous
        assert float(bounds.max()) <= 0.05 * norm, (res.which, bounds, norm)


@pytest.mark.parametrize("case", CASES[:5], ids=[c["id"] for c in CASES[:5]])
def test_bfloat16_bounds_hold_against_float64_truth_of_the_rounded_model(case):
    model, loss, data, red = build(case)
    net = _rounded64(model)
    f, w = full_loss_fn(net, loss, data, red, [n for n, _ in net.named_parameters()])
    ev = torch.linalg.eigvalsh(hessian_by_double_backward(f, w))
    problem = cs.Problem(copy.deepcopy(model).to(torch.bfloat16), loss, data, reduction=red)
    _check(problem, ev)


def test_bfloat16_tiny_transformer():
    torch.manual_seed(0)
    model = TinyGPT(5, 6, 1, 2, 4).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 5, (6, 7), generator=g)
    data = [(ids[:4, :-1], ids[:4, 1:]), (ids[4:, :-1], ids[4:, 1:])]

    def fn(out, y):
        return nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))

    ev = _truth(model, fn, data)
    problem = cs.Problem(copy.deepcopy(model).to(torch.bfloat16), "cross_entropy", data)
    _check(problem, ev, top=2, bottom=0)


def run_cli(args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_cli_bfloat16_spectrum_and_refusal(tmp_path):
    ex = tmp_path / "ex"
    assert run_cli(["example", "digits-mlp", "--out", str(ex)]).exit_code == 0
    out = tmp_path / "s"
    r = run_cli(["spectrum", str(ex / "model.pt"), "--top", "2", "--bottom", "0",
                 "--dtype", "bfloat16", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "x 17226 float32" in r.output  # the basis is planned in float32
    doc = json.loads((out / "spectrum.json").read_text())
    assert any("float32 copy of the model" in n for n in doc["notes"]), doc["notes"]
    assert doc["settings"]["dtype"] == "bfloat16"
    top = next(r for r in doc["results"]["spectra"] if r["which"] == "top")
    assert all(top["converged"]), top
    # the float32 run's eigenvalues lie within the bfloat16 run's bounds, plus the float32
    # run's own, plus what rounding the weights to bfloat16 moves them (measured here: 1e-4)
    f32 = tmp_path / "f"
    r = run_cli(["spectrum", str(ex / "model.pt"), "--top", "2", "--bottom", "0",
                 "--out", str(f32)])
    ref = next(r for r in json.loads((f32 / "spectrum.json").read_text())["results"]["spectra"]
               if r["which"] == "top")
    for a, b, ea in zip(top["eigenvalues"], ref["eigenvalues"], top["error_bounds"], strict=True):
        assert abs(a - b) <= ea + 1e-3 * abs(b), (a, b, ea)
    refused = tmp_path / "d"
    r = run_cli(["density", str(ex / "model.pt"), "--dtype", "bfloat16", "--out", str(refused)])
    assert r.exit_code != 0
    assert "--dtype bfloat16 is for spectrum and track" in r.output
    assert "Traceback" not in r.output
    assert not refused.exists()
