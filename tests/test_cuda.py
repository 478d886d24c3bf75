"""CUDA: every matrix and the command line on a GPU give the CPU's float64 numbers.

Skipped where no CUDA device is present (this project's CI); run on a GPU machine with
``python -m pytest tests/test_cuda.py``.
"""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from curvscope import Problem
from curvscope.cli import app
from curvscope.linalg import eigsh
from curvscope.operators import graph_account

from . import cases
from .test_cli_spectrum import tiny  # noqa: F401  (fixture)

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine"),
    pytest.mark.cuda,
]

MATRICES = ["hessian", "ggn", "fisher", "fisher-mc", "empirical-fisher", "kfac", "ekfac",
            "pch-abs"]


def _problem(device: str) -> Problem:
    model, loss, data, reduction = cases.build(cases.CASES[0])
    model = model.to(device)
    return Problem(model, loss, data, reduction=reduction)


@pytest.mark.parametrize("name", MATRICES)
def test_every_matrix_on_cuda_matches_cpu(name):
    cpu, gpu = _problem("cpu"), _problem("cuda")
    V = torch.randn(cpu.num_params, 3, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(0))
    want = cases.operators(cpu, name, seed=1)[name] @ V
    op = cases.operators(gpu, name, seed=1)[name]
    assert op.device.type == "cuda"
    got = op @ V.cuda()
    assert got.device.type == "cuda"
    scale = float(want.abs().max())
    assert scale > 0 and float((got.cpu() - want).abs().max()) <= 1e-10 * scale


def test_basis_in_host_memory_gives_the_same_pairs():
    H = cases.operators(_problem("cuda"), "hessian")["hessian"]
    (a,) = eigsh(H, top=3, tol=1e-10)
    (b,) = eigsh(H, top=3, tol=1e-10, basis_device="cpu")
    assert torch.allclose(a.eigenvalues, b.eigenvalues, rtol=1e-10, atol=0)


def test_cli_on_cuda_matches_cpu_and_records_device_memory(tiny):  # noqa: F811
    runner = CliRunner()
    docs = {}
    for device in ("cpu", "cuda"):
        res = runner.invoke(app, ["spectrum", str(tiny / "model.pt"), "--dtype", "float64",
                                  "--tol", "1e-10", "--device", device, "--out",
                                  str(tiny / device)])
        assert res.exit_code == 0, res.output
        docs[device] = json.loads((tiny / device / "spectrum.json").read_text())
    a = [v for s in docs["cpu"]["results"]["spectra"] for v in s["eigenvalues"]]
    b = [v for s in docs["cuda"]["results"]["spectra"] for v in s["eigenvalues"]]
    scale = max(abs(v) for v in a)
    assert max(abs(x - y) for x, y in zip(a, b, strict=True)) <= 1e-10 * scale
    mem = docs["cuda"]["memory"]
    assert mem["device"].startswith("cuda") and 0 < mem["peak_bytes"]


def test_hessian_products_over_kept_graphs_on_cuda():
    cpu, gpu = _problem("cpu"), _problem("cuda")
    V = torch.randn(cpu.num_params, 2, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(3))
    want = cases.operators(cpu, "hessian")["hessian"] @ V
    H = cases.operators(gpu, "hessian")["hessian"]
    first, second = H @ V.cuda(), H @ V.cuda()  # the second runs over the kept graphs
    assert H.info["kept_graphs"]["bytes"] > 0 and graph_account(gpu).held > 0
    scale = float(want.abs().max())
    for got in (first, second):
        assert float((got.cpu() - want).abs().max()) <= 1e-10 * scale
