import pytest
import torch

from curvscope import OptionError, Problem
from curvscope.diagnostics import spectrum
from curvscope.io import to_jsonable
from curvscope.operators import make_operator

from .cases import CASES, build, operators
from .truth import dense_hessian

TOL = 1e-10


def _problem(case=CASES[0]):
    model, loss, data, reduction = build(case)
    return model, loss, data, reduction, Problem(model, loss, data, reduction=reduction)


def test_per_layer_and_per_param_blocks_match_dense_blocks():
    model, loss, data, reduction, problem = _problem()
    truth = dense_hessian(model, loss, data, reduction)
    slices = problem.param_slices()
    res = spectrum(operators(problem), blocks="per-layer", top=2, bottom=1, tol=TOL)
    assert [e.block for e in res.spectra] == ["0", "0", "2", "2"]
    for e in res.spectra:
        names = problem.module_blocks()[e.block]
        lo, hi = slices[names[0]].start, slices[names[-1]].stop
        ev = torch.linalg.eigvalsh(truth[lo:hi, lo:hi])
        expected = ev.flip(0)[:2] if e.which == "top" else ev[:1]
        scale = float(ev.abs().max())
        assert torch.allclose(
            torch.tensor(e.eigenvalues, dtype=torch.float64), expected, atol=1e-8 * scale
        )
        assert all(e.converged)
    res = spectrum(operators(problem), blocks="per-param", top=1, bottom=0, tol=TOL)
    assert [e.block for e in res.spectra] == problem.names


@pytest.mark.parametrize("matrix", ["ggn", "empirical-fisher", "kfac"])
def test_other_matrices_match_their_dense_eigenvalues(matrix):
    _, _, _, _, problem = _problem()
    dense = make_operator(matrix, problem).dense()
    ev = torch.linalg.eigvalsh(dense)
    res = spectrum(operators(problem, matrix), top=3, bottom=0, tol=TOL)
    (entry,) = res.spectra
    assert entry.matrix == matrix
    assert torch.allclose(
        torch.tensor(entry.eigenvalues, dtype=torch.float64),
        ev.flip(0)[:3],
        atol=1e-8 * float(ev.abs().max()),
    )


def test_power_method_records_shift_and_repeats_spread():
    model, loss, data, reduction, problem = _problem(CASES[0])
    ev = torch.linalg.eigvalsh(dense_hessian(model, loss, data, reduction))
    res = spectrum(operators(problem), top=1, bottom=1, method="power", tol=1e-6, max_iter=5000)
    top, bottom = res.spectra
    assert top.method == "power" and top.shift is not None
    scale = float(ev.abs().max())
    # residual <= 1e-6 ||A|| bounds the eigenvalue error by residual^2 / gap and by residual
    assert top.eigenvalues[0] == pytest.approx(float(ev[-1]), abs=1e-5 * scale)
    assert bottom.eigenvalues[0] == pytest.approx(float(ev[0]), abs=1e-5 * scale)
    assert all(top.converged) and all(bottom.converged)
    res = spectrum(operators(problem), top=2, bottom=0, repeats=3, samples=5, tol=1e-8)
    spread = res.spectra[0].spread
    assert spread["repeats"] == 3 and spread["samples"] == 5
    assert len(spread["mean"]) == 2
    assert all(
        lo <= m <= hi
        for lo, m, hi in zip(spread["min"], spread["mean"], spread["max"], strict=True)
    )
    doc = to_jsonable(res.to_results())
    assert doc["spectra"][0]["spread"]["repeats"] == 3


def test_eigenvectors_are_canonically_signed_unit_vectors():
    _, _, _, _, problem = _problem()
    res = spectrum(operators(problem), top=3, bottom=1, tol=TOL)
    for vecs in res.eigenvectors:
        norms = torch.linalg.vector_norm(vecs, dim=0)
        assert torch.allclose(norms, torch.ones_like(norms), atol=1e-12)
        idx = vecs.abs().argmax(0)
        assert (vecs[idx, torch.arange(vecs.shape[1])] > 0).all()


def test_bad_requests_name_the_argument_and_the_cli_its_flag():
    from curvscope.cli._common import flag_name

    _, _, _, _, problem = _problem()
    with pytest.raises(OptionError, match="at least one eigenvalue"):
        spectrum(operators(problem), top=0, bottom=0)
    with pytest.raises(OptionError, match="^method 'qr' is not known") as err:
        spectrum(operators(problem), method="qr")
    assert err.value.render(flag_name).startswith("--method 'qr' is not known")
    with pytest.raises(OptionError, match="matrices 'hess' is not known") as err:
        spectrum(operators(problem, "hess"))
    assert err.value.render(flag_name).startswith("--matrix 'hess'")
    with pytest.raises(OptionError, match="only 18 rows"):
        spectrum(operators(problem), blocks=["2"], top=19, bottom=0)
    with pytest.raises(OptionError, match="repeats needs samples N") as err:
        spectrum(operators(problem), repeats=2)
    assert "--repeats needs --samples N" in err.value.render(flag_name)


@pytest.mark.parametrize("method", ["power", "lanczos"])
def test_products_with_repeats_are_counted_as_done(method):
    # every product, on the full data and on the subsets, is counted once (issue 10 item 7:
    # power iteration with repeats counted them wrongly)
    _, _, _, _, problem = _problem(CASES[0])
    ops = operators(problem)
    before = problem.work_done
    res = spectrum(ops, top=1, bottom=1, method=method,
                   repeats=2, samples=5, tol=1e-6, max_iter=400)
    done = problem.work_done - before
    assert res.num_matvecs == done > 0
