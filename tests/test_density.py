"""density(): SLQ densities and traces of a tiny model's Hessian against dense float64 truth."""

import math

import pytest
import torch

from curvscope import OptionError, Problem
from curvscope.diagnostics import density

from .cases import CASES, build, operators
from .truth import dense_hessian

CASE = CASES[0]  # mlp-ce-mean-unequal: 43 parameters, batches of 3 and 4
REL = 1e-12


@pytest.fixture(scope="module")
def setup():
    model, loss, data, reduction = build(CASE)
    H = dense_hessian(model, loss, data, reduction)
    problem = Problem(model, loss, data, reduction=reduction)
    return problem, H


def test_density_full_krylov_recovers_dense_eigenvalues_and_traces(setup):
    problem, H = setup
    P = H.shape[0]
    lam = torch.linalg.eigvalsh(H)
    scale = float(lam.abs().max())
    res = density(operators(problem), num_probes=3, num_steps=P, trace_probes=30, seed=0)
    (d,) = res.densities
    assert d.matrix == "hessian" and d.block == "all" and d.dim == P
    assert d.num_probes == 3 and d.lanczos_steps == P
    nodes = torch.tensor(d.nodes, dtype=torch.float64)
    weights = torch.tensor(d.weights, dtype=torch.float64)
    # Full Krylov space per probe: every node carrying weight is an eigenvalue of H.
    live = nodes[weights > 1e-10]
    dist = torch.min((live[:, None] - lam[None, :]).abs(), dim=1).values
    assert float(dist.max()) < 1e-8 * scale
    # ...and the extreme eigenvalues are found.
    assert float(nodes.max()) == pytest.approx(float(lam.max()), rel=1e-8)
    assert float(nodes.min()) == pytest.approx(float(lam.min()), abs=1e-8 * scale)
    grid = torch.tensor(d.grid, dtype=torch.float64)
    rho = torch.tensor(d.density, dtype=torch.float64)
    assert float(torch.trapezoid(rho, grid)) == pytest.approx(1.0, abs=1e-12)
    # Traces: the exact one to round-off, the stochastic ones within their standard errors.
    by = {t.estimator: t for t in res.traces}
    assert set(by) == {"hutchinson", "hutchpp", "exact"}
    truth = float(torch.trace(H))
    assert by["exact"].estimate == pytest.approx(truth, rel=REL)
    assert by["exact"].num_matvecs == P and by["exact"].stderr == 0.0
    for name in ("hutchinson", "hutchpp"):
        assert abs(by[name].estimate - truth) <= 4 * by[name].stderr + 1e-10 * abs(truth)
        assert by[name].num_matvecs == 30
    assert abs(d.slq_trace - truth) <= 4 * d.slq_trace_stderr
    assert res.num_matvecs == d.num_matvecs + 30 + 30 + P


def test_density_per_layer_block_traces_match_dense_slices(setup):
    problem, H = setup
    res = density(operators(problem), blocks="per-layer", num_probes=2, num_steps=8, trace_probes=0)
    slices = problem.param_slices()
    blocks = problem.module_blocks()
    assert [d.block for d in res.densities] == list(blocks)
    assert all(t.estimator == "exact" for t in res.traces)
    for t in res.traces:
        names = blocks[t.block]
        idx = torch.cat([torch.arange(H.shape[0])[slices[n]] for n in names])
        assert t.estimate == pytest.approx(float(torch.trace(H[idx][:, idx])), rel=REL)
    assert sum(t.estimate for t in res.traces) == pytest.approx(float(torch.trace(H)), rel=REL)


def test_density_is_reproducible_and_skips_exact_trace_above_limit(setup):
    problem, _ = setup
    a = density(
        operators(problem), num_probes=2, num_steps=5, trace_probes=6, exact_trace_max=10, seed=3
    )
    b = density(
        operators(problem), num_probes=2, num_steps=5, trace_probes=6, exact_trace_max=10, seed=3
    )
    assert a.densities[0].nodes == b.densities[0].nodes
    assert [t.estimate for t in a.traces] == [t.estimate for t in b.traces]
    assert {t.estimator for t in a.traces} == {"hutchinson", "hutchpp"}
    assert any("exact traces skipped" in n for n in a.notes)
    doc = a.to_results()
    assert set(doc) == {"densities", "traces"}
    d = a.densities[0]
    assert len(d.grid) == len(d.density) == 1000
    assert math.isfinite(d.sigma) and d.sigma > 0


def test_density_failure_paths(setup):
    problem, _ = setup
    from curvscope.cli._common import flag_name

    with pytest.raises(OptionError, match="num_probes must be at least 1") as err:
        density(operators(problem), num_probes=0)
    assert err.value.render(flag_name).startswith("--probes must be at least 1")
    with pytest.raises(OptionError, match="num_steps must be at least 1") as err:
        density(operators(problem), num_steps=0)
    assert err.value.render(flag_name).startswith("--lanczos-steps must be at least 1")
    with pytest.raises(OptionError, match="trace_probes must be 0"):
        density(operators(problem), trace_probes=2)
    with pytest.raises(OptionError, match="block 'nope' does not exist; valid blocks: all, 0, 2"):
        density(operators(problem), blocks=["nope"])


def test_density_of_ggn_is_psd_and_traces_agree_with_its_dense_matrix(setup):
    problem, H = setup
    from curvscope.operators import make_operator

    G = make_operator("ggn", problem).dense()
    res = density(operators(problem, "hessian", "ggn"), num_probes=2, num_steps=H.shape[0])
    assert [d.matrix for d in res.densities] == ["hessian", "ggn"]
    ggn = res.densities[1]
    scale = float(torch.linalg.eigvalsh(G).abs().max())
    nodes = torch.tensor(ggn.nodes)[torch.tensor(ggn.weights) > 1e-10]
    assert float(nodes.min()) >= -1e-10 * scale
    exact = {t.matrix: t.estimate for t in res.traces if t.estimator == "exact"}
    assert exact["ggn"] == pytest.approx(float(torch.trace(G)), rel=REL)
    assert exact["hessian"] == pytest.approx(float(torch.trace(H)), rel=REL)
