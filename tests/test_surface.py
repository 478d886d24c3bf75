"""Loss surfaces: grid values against direct float64 losses, directions, files, errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import curvscope as cs
from curvscope._errors import OptionError
from curvscope.diagnostics import filter_normalized_direction, surface
from curvscope.io import to_jsonable
from curvscope.linalg import eigsh
from curvscope.operators import HessianOperator
from curvscope.problem import Problem

from .cases import CASES, RTOL, build
from .truth import assert_close, dense_hessian, full_loss_fn

SURFACE_CASES = [
    c
    for c in CASES
    if c["id"] in ("mlp-ce-mean-unequal", "mlp-mse-sum-unequal", "cnn-bn-eval-ce-mean")
]


def _problem(case, **kw):
    model, loss, data, red = build(case)
    return Problem(model, loss, data, reduction=red, **kw), (model, loss, data, red)


@pytest.mark.parametrize("case", SURFACE_CASES, ids=lambda c: c["id"])
@pytest.mark.parametrize("kind", ["eigen", "random", "filter-normalized"])
def test_grid_values_match_direct_losses(case, kind):
    problem, (model, loss, data, red) = _problem(case, weight_decay=0.01)
    before = {n: p.detach().clone() for n, p in model.state_dict().items()}
    g = torch.Generator().manual_seed(3)
    res = surface(
        problem, dims=2, directions=kind, range_=(-0.5, 1.0), steps=(5, 4), seed=g, tol=1e-12
    )
    # rebuild the same directions to evaluate the definition directly
    g = torch.Generator().manual_seed(3)
    names = [n for n, _ in model.named_parameters()]
    model.eval()  # the definition in eval mode, as Problem analyses it (BatchNorm running stats)
    f, w = full_loss_fn(model, loss, data, red, names, weight_decay=0.01)
    if kind == "eigen":
        H = dense_hessian(model, loss, data, red, weight_decay=0.01)
        evals, evecs = torch.linalg.eigh(H)
        assert_close(res.eigenvalues, evals.flip(0)[:2], rtol=1e-10, what="eigenvalues")
        D = evecs.flip(1)[:, :2]
        idx = D.abs().argmax(dim=0)
        D = D * torch.sign(D[idx, torch.arange(2)])
    elif kind == "random":
        D = torch.randn(problem.num_params, 2, generator=g, dtype=torch.float64)
        D = D / torch.linalg.vector_norm(D, dim=0, keepdim=True)
    else:
        D = torch.stack([filter_normalized_direction(problem, seed=g) for _ in range(2)], 1)
    a_axis, b_axis = res.axes
    assert len(a_axis) == 5 and len(b_axis) == 4
    assert a_axis[0] == -0.5 and a_axis[-1] == 1.0
    for i, j in [(0, 0), (4, 3), (2, 1), (1, 2), (3, 0)]:
        want = f(w + a_axis[i] * D[:, 0] + b_axis[j] * D[:, 1])
        tol = 1e-9 if kind == "eigen" else RTOL
        assert_close(res.loss[i][j], want, rtol=tol, what=f"loss at ({i},{j})")
    # quadratic model: L + a g.d1 + b g.d2 + 1/2 (a^2 d1Hd1 + 2ab d1Hd2 + b^2 d2Hd2)
    H = dense_hessian(model, loss, data, red, weight_decay=0.01)
    grad = torch.func.grad(f)(w)
    for i, j in [(0, 0), (4, 3), (2, 1)]:
        c = torch.tensor([a_axis[i], b_axis[j]], dtype=torch.float64)
        want = f(w) + grad @ D @ c + 0.5 * c @ (D.T @ H @ D) @ c
        tol = 1e-9 if kind == "eigen" else RTOL
        assert_close(res.quadratic_model[i][j], want, rtol=tol, what="quadratic model")
    assert res.quadratic_model[0][0] != res.loss[0][0]
    # the model's weights are untouched
    for n, p in model.state_dict().items():
        assert torch.equal(p, before[n]), n


def test_one_dim_and_accuracy_and_precomputed_eigen():
    problem, (model, loss, data, red) = _problem(CASES[0])
    eig = eigsh(HessianOperator(problem), top=1, seed=torch.Generator().manual_seed(0))
    res = surface(problem, dims=1, eigen=eig[0], steps=7, range_=(-2, 2))
    assert res.dims == 1 and len(res.axes) == 1 and len(res.loss) == 7
    assert res.num_matvecs == 1  # only the quadratic model's product
    assert res.axes[0][3] == 0.0
    assert_close(res.loss[3], problem.loss(), what="centre loss")
    assert_close(res.quadratic_model[3], problem.loss(), what="centre of the quadratic model")
    v = eig[0].eigenvectors[:, 0]
    v = v * torch.sign(v[v.abs().argmax()])
    assert_close(res.loss[0], problem.loss(problem.param_vector() - 2 * v), what="loss at -2")
    assert res.accuracy[3] == pytest.approx(problem.accuracy())
    assert res.directions.converged == [True]
    doc = to_jsonable(res)
    assert doc["directions"]["kind"] == "eigen" and doc["eigenvalues"] == res.eigenvalues


def test_filter_normalisation_gives_each_filter_the_weight_filter_norm():
    problem, _ = _problem(CASES[4])  # CNN with BatchNorm
    d = filter_normalized_direction(problem, seed=torch.Generator().manual_seed(1))
    parts = problem.unflatten(d)
    for name, w in problem.params.items():
        dp = parts[name]
        if w.dim() <= 1:
            assert torch.count_nonzero(dp) == 0, f"{name} should be zero (ignore biasbn)"
            continue
        dn = torch.linalg.vector_norm(dp.reshape(w.shape[0], -1), dim=1)
        wn = torch.linalg.vector_norm(w.reshape(w.shape[0], -1), dim=1)
        assert_close(dn, wn, what=f"filter norms of {name}")
    res = surface(
        problem,
        dims=1,
        directions="filter-normalized",
        steps=3,
        seed=torch.Generator().manual_seed(1),
    )
    assert "ignore='biasbn'" in res.directions.bias_bn


def test_filter_normalised_refuses_only_biases():
    problem, _ = _problem(CASES[0], params="*.bias")
    with pytest.raises(OptionError, match="nothing to move"):
        surface(problem, dims=1, directions="filter-normalized", steps=3)


def _eigen_file(problem, tmp_path, *, sha="abc123", names=None, shapes=None, vectors=None):
    V = (
        vectors
        if vectors is not None
        else torch.linalg.qr(torch.randn(problem.num_params, 2, dtype=torch.float64))[0]
    )
    obj = {
        "format": "curvscope.eigenvectors/1",
        "model_sha256": sha,
        "param_names": names or list(problem.names),
        "param_shapes": shapes or [list(s) for s in problem.shapes],
        "entries": [
            {
                "matrix": "ggn",
                "block": "all",
                "which": "top",
                "eigenvalues": torch.tensor([9.0, 8.0]),
                "vectors": V.flip(1),
            },
            {
                "matrix": "hessian",
                "block": "all",
                "which": "top",
                "eigenvalues": torch.tensor([3.0, 2.0]),
                "vectors": V,
            },
        ],
    }
    path = tmp_path / "eig.pt"
    torch.save(obj, path)
    return path, V


def test_directions_from_eigenvector_file(tmp_path):
    problem, _ = _problem(CASES[0])
    path, V = _eigen_file(problem, tmp_path)
    res = cs.surface(problem, dims=2, directions=path, steps=3, model_sha256="abc123")
    assert res.directions.kind == "eigen" and res.eigenvalues == [3.0, 2.0]
    assert res.directions.matrix == "hessian"
    w = problem.param_vector()
    assert_close(res.loss[0][2], problem.loss(w - V[:, 0] + V[:, 1]), what="file direction")
    # .npy and .pt tensors
    np.save(tmp_path / "d.npy", V[:, 0].numpy())
    res = cs.surface(problem, dims=1, directions=str(tmp_path / "d.npy"), steps=3)
    assert res.directions.kind == "file"
    assert_close(res.loss[2], problem.loss(w + V[:, 0]), what="npy direction")
    torch.save(V, tmp_path / "d.pt")
    res = cs.surface(problem, dims=2, directions=tmp_path / "d.pt", steps=3)
    assert_close(res.loss[2][0], problem.loss(w + V[:, 0] - V[:, 1]), what="pt direction")


def test_direction_file_errors(tmp_path):
    problem, _ = _problem(CASES[0])
    path, _ = _eigen_file(problem, tmp_path)
    with pytest.raises(OptionError, match="computed for another model"):
        cs.surface(problem, dims=2, directions=path, steps=3, model_sha256="fff000")
    path, _ = _eigen_file(problem, tmp_path, names=["a.weight", *problem.names[1:]])
    with pytest.raises(OptionError, match="belongs to another model or parameter selection"):
        cs.surface(problem, dims=2, directions=path, steps=3)
    shapes = [list(s) for s in problem.shapes]
    shapes[0] = [7, 7]
    path, _ = _eigen_file(problem, tmp_path, shapes=shapes)
    with pytest.raises(OptionError, match=r"parameter 0.weight has shape \[7, 7\] there"):
        cs.surface(problem, dims=2, directions=path, steps=3)
    torch.save(torch.zeros(problem.num_params + 1), tmp_path / "big.pt")
    with pytest.raises(OptionError, match=f"does not fit the {problem.num_params} selected"):
        cs.surface(problem, dims=1, directions=tmp_path / "big.pt", steps=3)
    np.save(tmp_path / "one.npy", np.ones(problem.num_params))
    with pytest.raises(OptionError, match="^dims 2 needs 2 directions"):
        cs.surface(problem, dims=2, directions=str(tmp_path / "one.npy"), steps=3)
    with pytest.raises(OptionError, match="does not exist"):
        cs.surface(problem, dims=1, directions=str(tmp_path / "missing.pt"), steps=3)
    torch.save({"x": torch.ones(2)}, tmp_path / "dict.pt")
    with pytest.raises(OptionError, match="not a curvscope eigenvector file"):
        cs.surface(problem, dims=1, directions=tmp_path / "dict.pt", steps=3)
    # the diagnostic itself reads no file: the flat cs.surface (and the CLI) read them
    with pytest.raises(OptionError, match="takes the directions as a tensor"):
        surface(problem, dims=1, directions=tmp_path / "d.pt", steps=3)
    (tmp_path / "junk.pt").write_bytes(b"not a pickle")
    with pytest.raises(OptionError, match="neither an eigenvector file nor a tensor"):
        cs.surface(problem, dims=1, directions=tmp_path / "junk.pt", steps=3)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"dims": 3}, "^dims 3 is not supported"),
        ({"steps": 1}, "at least 2 points"),
        ({"range_": (1, -1)}, "LO < HI"),
        ({"directions": "sideways"}, "is not known"),
    ],
)
def test_option_errors(kw, match):
    from curvscope.cli._common import flag_name

    problem, _ = _problem(CASES[0])
    with pytest.raises(OptionError, match=match) as err:
        surface(problem, **{"dims": 1, "steps": 3, **kw})
    if "range_" in kw:
        assert err.value.render(flag_name).startswith("--range")


def test_non_finite_losses_are_nan_and_noted():
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x = torch.randn(6, 3, generator=g, dtype=torch.float64)
    y = torch.randn(6, 2, generator=g, dtype=torch.float64)
    # a huge step along a direction overflows the squared error to inf
    problem = Problem(model, "mse", [(x * 1e150, y)])
    d = torch.zeros(problem.num_params, dtype=torch.float64)
    d[-1] = 1.0  # last bias
    res = surface(problem, dims=1, directions=d, range_=(-1e160, 1e160), steps=5, quadratic=False)
    assert res.num_non_finite >= 2
    assert any(math.isnan(v) for v in res.loss)
    assert any("NaN or Inf" in n for n in res.notes)
    doc = to_jsonable(res)
    assert None in doc["loss"]


def test_loop_fallback_matches_vmap(monkeypatch):
    problem, _ = _problem(CASES[1])
    g = torch.Generator().manual_seed(0)
    res_v = surface(problem, dims=2, directions="random", steps=3, seed=g)
    from curvscope.diagnostics import _surface

    def boom(*a, **k):
        raise RuntimeError("vmap says no")

    monkeypatch.setattr(_surface, "_evaluate_vmap", boom)
    g = torch.Generator().manual_seed(0)
    res_l = surface(problem, dims=2, directions="random", steps=3, seed=g)
    assert res_l.evaluation == "loop" and res_v.evaluation == "vmap"
    assert any("one at a time" in n for n in res_l.notes)
    assert_close(res_l.loss, res_v.loss, what="loop vs vmap")
    assert res_l.accuracy == res_v.accuracy


def test_torchscript_model_is_evaluated_point_by_point():
    model, loss, data, red = build(CASES[0])
    eager = Problem(model, loss, data, reduction=red)
    scripted = Problem(torch.jit.script(model), loss, data, reduction=red)
    before = [p.detach().clone() for p in model.parameters()]
    d = torch.randn(
        eager.num_params, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64
    )
    res_s = surface(scripted, dims=2, directions=d, steps=3)
    res_e = surface(eager, dims=2, directions=d, steps=3)
    assert res_s.evaluation == "loop" and res_e.evaluation == "vmap"
    assert_close(res_s.loss, res_e.loss, what="scripted vs eager")
    assert_close(res_s.quadratic_model, res_e.quadratic_model, rtol=1e-10, what="quadratic")
    for p, b in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, b)
