"""The class / cross-class decomposition of the GGN (Papyan 2019, 2020) against dense truth.

The truth is built here from per-sample Jacobians by torch.autograd, never by curvscope.
"""

import pytest
import torch
from torch import nn

from curvscope import Problem
from curvscope.operators import GGNOperator, class_structure

from .truth import assert_close


def _tiny(seed=0, classes=4, n=40, reduction="mean"):
    """A 6-8-C tanh MLP (92 parameters for C = 4) on n samples in two batches, float64."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, classes)).double()
    x = torch.randn(n, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, classes, (n,), generator=g)
    y[:classes] = torch.arange(classes)  # every class present
    return model, [(x[:25], y[:25]), (x[25:], y[25:])], reduction


def _hand(model, data, reduction):
    """G_class, G_cross, G_within and the GGN from per-sample Jacobians, summed by hand."""
    x = torch.cat([b[0] for b in data])
    y = torch.cat([b[1] for b in data])
    params = list(model.parameters())
    n = x.shape[0]
    out = model(x)
    C = out.shape[1]
    s = 1.0 / n if reduction == "mean" else 1.0
    q = []  # q[i][c'] = sqrt(p_ic') J_i^T (p_i - e_c')
    ggn = 0
    for i in range(n):
        rows = []
        for c in range(C):
            gs = torch.autograd.grad(out[i, c], params, retain_graph=True)
            rows.append(torch.cat([t.reshape(-1) for t in gs]))
        J = torch.stack(rows)  # [C, P]
        p = torch.softmax(out[i].detach(), 0)
        H = torch.diag(p) - torch.outer(p, p)
        ggn = ggn + s * J.T @ H @ J
        q.append(
            torch.stack(
                [p[c].sqrt() * J.T @ (p - torch.eye(C, dtype=p.dtype)[c]) for c in range(C)]
            )
        )
    q = torch.stack(q)  # [n, C, P]
    P = q.shape[-1]
    # Papyan's split (his released code's G0, G1, G2), written out here
    G_self = torch.zeros(P, P, dtype=torch.float64)
    G_class = torch.zeros_like(G_self)
    G_cross = torch.zeros_like(G_self)
    G_within = torch.zeros_like(G_self)
    for c in range(C):
        members = q[y == c]  # [N_c, C, P]
        Nc = members.shape[0]
        mus = [members[:, c2].mean(0) for c2 in range(C)]
        delta = sum(mus[c2] for c2 in range(C) if c2 != c) / (C - 1)
        G_class += s * Nc * (C - 1) * torch.outer(delta, delta)
        for c2 in range(C):
            if c2 == c:
                G_self += s * Nc * torch.outer(mus[c2], mus[c2])
            else:
                dev = mus[c2] - delta
                G_cross += s * Nc * torch.outer(dev, dev)
            d = members[:, c2] - mus[c2]
            G_within += s * d.T @ d
    G_class_all = (G_class, G_self)
    return G_class_all, G_cross, G_within, ggn.detach()


@pytest.mark.parametrize("classes,reduction", [(4, "mean"), (3, "sum")])
def test_class_and_cross_parts_match_per_sample_jacobians(classes, reduction):
    model, data, reduction = _tiny(classes=classes, reduction=reduction)
    (G_class, G_self), G_cross, G_within, ggn = _hand(model, data, reduction)
    # the decomposition is exact: self + class + cross + within is the GGN, summed by hand
    assert_close(G_self + G_class + G_cross + G_within, ggn, what="Papyan's split vs GGN")
    problem = Problem(model, "cross_entropy", data, reduction=reduction)
    st = class_structure(problem)
    assert st.num_classes == classes
    assert_close(GGNOperator(problem).dense(), ggn, what="curvscope GGN vs hand GGN")
    assert_close(st.class_part.dense(), G_class, what="G_class (Papyan's G1)")
    assert_close(st.cross_part.dense(), G_cross, what="G_cross (Papyan's G2)")
    assert_close(st.self_part.dense(), G_self, what="G_self (Papyan's G0)")
    assert_close(st.within_part.dense(), G_within, what="G_within")
    assert_close(
        st.self_part.dense() + st.class_part.dense() + st.cross_part.dense()
        + st.within_part.dense(),
        ggn,
        what="sum of curvscope parts vs GGN",
    )
    # ranks C and C(C-2) (the cross deviations of each class sum to zero); exact eigenpairs
    # from the small Gram matrices
    for op, dense, rank in (
        (st.class_part, G_class, classes),
        (st.cross_part, G_cross, classes * (classes - 2)),
    ):
        vals, vecs = op.eigh()
        assert vals.shape[0] == rank
        truth = torch.linalg.eigvalsh(dense).flip(0)[:rank]
        assert_close(vals, truth, rtol=1e-10, what="low-rank eigenvalues")
        assert_close(dense @ vecs, vecs * vals, rtol=1e-10, what="low-rank eigenvectors")
    assert_close(st.weights.sum(), 1.0 if reduction == "mean" else 40.0, what="weights")


def test_weight_decay_lands_in_the_within_part():
    model, data, _ = _tiny()
    _, _, G_within, ggn = _hand(model, data, "mean")
    problem = Problem(model, "cross_entropy", data, weight_decay=0.01)
    st = class_structure(problem)
    eye = torch.eye(ggn.shape[0], dtype=torch.float64)
    assert_close(st.within_part.dense(), G_within + 0.01 * eye, what="within with decay")


def test_losses_without_classes_are_refused():
    from curvscope import UnsupportedModelError

    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x = torch.randn(10, 3, generator=g, dtype=torch.float64)
    y = torch.randn(10, 2, generator=g, dtype=torch.float64)
    with pytest.raises(UnsupportedModelError, match="mse loss has no classes"):
        class_structure(Problem(model, "mse", [(x, y)]))


ARCH = {"type": "mlp", "sizes": [5, 8, 4], "activation": "tanh", "bias": True}  # 84 params


def _checkpoint(tmp_path, loss="cross_entropy"):
    import numpy as np

    from curvscope.io import build_arch, save_checkpoint

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 5)).astype(np.float32)
    if loss == "mse":
        arch = {**ARCH, "sizes": [5, 8, 2]}
        y = rng.normal(size=(30, 2)).astype(np.float32)
    else:
        arch = ARCH
        y = np.arange(30) % 4
    np.savez(tmp_path / "data.npz", x=x, y=y)
    meta = {"data": "data.npz", "loss": loss, "reduction": "mean"}
    save_checkpoint(tmp_path / "model.pt", build_arch(arch), arch, meta)
    return tmp_path / "model.pt"


def test_cli_classes_end_to_end_against_hand_truth(tmp_path):
    import json

    import numpy as np
    from typer.testing import CliRunner

    from curvscope.cli import app
    from curvscope.io import load_checkpoint

    path = _checkpoint(tmp_path)
    res = CliRunner().invoke(
        app,
        [
            "classes",
            str(path),
            "--dtype",
            "float64",
            "--tol",
            "1e-10",
            "--batch-size",
            "16",
            "--out",
            str(tmp_path / "out"),
        ],
    )
    assert res.exit_code == 0, res.output
    assert "class means" in res.output and "Principal angles" in res.output
    doc = json.loads((tmp_path / "out" / "classes.json").read_text())
    assert doc["command"] == "classes" and doc["schema"] == "curvscope.result/1"
    r = doc["results"]["classes"]
    assert r["num_classes"] == 4 and r["class_counts"] == [8, 8, 7, 7]
    model = load_checkpoint(path).model.double()
    with np.load(tmp_path / "data.npz") as f:
        x, y = torch.from_numpy(f["x"]).double(), torch.from_numpy(f["y"]).long()
    (G_class, _), G_cross, _, ggn = _hand(model, [(x, y)], "mean")
    scale = float(torch.linalg.eigvalsh(ggn).abs().max())
    assert_close(
        r["class_eigenvalues"],
        torch.linalg.eigvalsh(G_class).flip(0)[:4],
        rtol=1e-9,
        what="class eigenvalues",
    )
    assert_close(
        r["cross_eigenvalues"],
        torch.linalg.eigvalsh(G_cross).flip(0)[:8],  # rank C(C-2)
        rtol=1e-9,
        what="cross eigenvalues",
    )
    evals, evecs = torch.linalg.eigh(ggn)
    assert np.allclose(r["ggn"]["eigenvalues"], evals.flip(0)[:16], atol=1e-8 * scale)
    assert r["class_trace"] == pytest.approx(float(torch.trace(G_class)), rel=1e-9)
    # principal angles between range(G_class) and the GGN's top-4 eigenvectors, densely
    U = torch.linalg.eigh(G_class)[1][:, -4:]
    cos = torch.linalg.svdvals(U.T @ evecs[:, -4:])
    (cls,) = [a for a in r["angles"] if a["part"] == "class"]
    assert cls["ggn_pairs"] == [1, 4] and cls["dimension"] == 4
    assert np.allclose(cls["cosines"], cos, atol=max(cls["error_bound"], 1e-7))
    assert cls["error_bound"] < 1e-6
    assert {a["part"] for a in r["angles"]} == {"class", "cross", "means"}


def test_cli_classes_refuses_mse_in_one_sentence(tmp_path):
    from typer.testing import CliRunner

    from curvscope.cli import app

    path = _checkpoint(tmp_path, loss="mse")
    res = CliRunner().invoke(app, ["classes", str(path), "--out", str(tmp_path / "out")])
    assert res.exit_code == 1
    assert "mse loss has no classes" in res.output
    assert "Traceback" not in res.output


def _run_classes(tmp_path, out, *extra):
    from typer.testing import CliRunner

    from curvscope.cli import app

    path = tmp_path / "model.pt" if (tmp_path / "model.pt").is_file() else _checkpoint(tmp_path)
    return CliRunner().invoke(
        app,
        ["classes", str(path), "--dtype", "float64", "--tol", "1e-10", "--batch-size", "16",
         "--out", str(out), *extra],
    )


def test_classes_figure_and_report_from_its_folder(tmp_path):
    """`classes` writes classes.png beside its document; `report --from` renders the section."""
    from typer.testing import CliRunner

    from curvscope.cli import app

    out = tmp_path / "out"
    res = _run_classes(tmp_path, out)
    assert res.exit_code == 0, res.output
    assert (out / "classes.png").is_file() and "classes.png" in res.output
    res = CliRunner().invoke(app, ["report", "--from", str(out)])
    assert res.exit_code == 0, res.output
    html = (out / "report.html").read_text()
    assert 'id="classes"' in html and "Principal angles" in html
    assert "class means G_class" in html  # the plotly chart's trace
    assert (out / "figures" / "classes.png").is_file()
    assert 'id="skipped"' not in html  # a classes folder is no report with parts missing
    import json

    doc = json.loads((out / "classes.json").read_text())
    r = doc["results"]["classes"]
    assert f"{r['ggn']['eigenvalues'][0]:.6g}" in html
    assert f"{r['class_eigenvalues'][0]:.6g}" in html


def test_ctrl_c_during_classes_keeps_parts_ritz_values_and_figure(tmp_path, monkeypatch):
    import json

    import curvscope.linalg._restarted as restarted

    real, calls = restarted.orthogonalise, []

    def stop_at_eight(*args, **kwargs):  # Ctrl-C during the GGN's eighth Lanczos step
        calls.append(1)
        if len(calls) == 8:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(restarted, "orthogonalise", stop_at_eight)
    out = tmp_path / "out"
    res = _run_classes(tmp_path, out)
    assert res.exit_code == 130, res.output
    doc = json.loads((out / "classes.json").read_text())
    assert doc["complete"] is False and doc["run"]["state"] in ("running", "interrupted")
    r = doc["results"]["classes"]
    assert len(r["class_eigenvalues"]) == 4 and r["cross_eigenvalues"]  # the parts: exact
    g = r["ggn"]
    assert 0 < len(g["eigenvalues"]) <= 16 and not any(g["converged"])
    assert g["error_bounds"] is None
    assert all(a["error_bound"] == 1.0 for a in r["angles"])
    assert "interrupted (Ctrl-C) during the GGN's Lanczos" in " ".join(doc["notes"])
    assert (out / "classes.png").is_file()
    assert "Principal angles" in res.output  # the partial tables were printed
    marker = json.loads((out / ".curvscope-run.json").read_text())
    assert marker["state"] == "interrupted"
