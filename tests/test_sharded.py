"""Sharded mode (docs/sharded.md): FSDP2 shards over 2 gloo processes against 1 process.

The top eigenvalues of the Hessian, by Lanczos on the sharded operator (every vector a
shard, inner products all-reduced, products by finite differences of sharded gradients),
must equal those of one unsharded process (double backward) to 1e-8 relative in float64,
on an MLP with cross-entropy, an MLP with MSE, a CNN with BatchNorm in eval mode (ReLU and
max pooling: kinks) and a tiny transformer; so must the nodes and weights of stochastic
Lanczos quadrature and the iterates of conjugate gradients on the sharded operator. Also: the
GGN and other matrices are refused in one sentence, and the unsharded Lanczos path does not
change.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import curvscope as cs
from curvscope._errors import OptionError
from curvscope.linalg import as_operator, eigsh
from curvscope.operators import hvp_record

from .ranks import run_cli, run_ranks, write_tiny

ROOT = Path(__file__).resolve().parent.parent
WORKER = ROOT / "tests" / "shard_worker.py"
CASES = "mlp-ce-mean-unequal,mlp-mse-sum-unequal,cnn-bn-eval-ce-mean,tiny-gpt"
RTOL = 1e-8  # the bar; seen: 6e-13, 2e-13, 6e-12, 4e-12

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="torch.distributed is not available"
)


@pytest.fixture(autouse=True, scope="module")
def _private_group():
    """``shard=True`` in one process starts a private gloo group of one: end it after."""
    import torch.distributed as dist

    was = dist.is_initialized()
    yield
    if not was and dist.is_initialized():
        dist.destroy_process_group()


def _run(tmp: Path, world: int, out: Path) -> None:
    run_ranks(WORKER, world, "-" if world == 1 else str(tmp / f"store-{world}"), out, CASES)


def test_two_sharded_processes_give_the_one_process_eigenvalues(tmp_path):
    _run(tmp_path, 1, tmp_path / "one.pt")
    _run(tmp_path, 2, tmp_path / "two.pt")
    one = torch.load(tmp_path / "one.pt", weights_only=True)
    two = torch.load(tmp_path / "two.pt", weights_only=True)
    assert one.keys() == two.keys() and len(one) == 4
    for case, ref in one.items():
        got = two[case]
        want = ref["eigenvalues"]
        assert want.shape == got["eigenvalues"].shape == (3,), case
        err = float(((got["eigenvalues"] - want).abs() / want.abs()).max())
        assert err <= RTOL, f"{case}: eigenvalues differ by {err:.2e} relative"
        # SLQ (density): the same Lanczos nodes and weights from the same probes
        for key in ("slq_nodes", "slq_weights"):
            scale = float(ref[key].abs().max())
            err = float((got[key] - ref[key]).abs().max()) / scale
            assert err <= RTOL, f"{case} {key}: relative difference {err:.2e}"
        # CG: four steps on this rank's rows give the rows of one process's iterate
        want_x = ref["cg_x"][got["rows"].long()]
        err = float((got["cg_x"] - want_x).abs().max()) / float(ref["cg_x"].abs().max())
        assert err <= RTOL, f"{case} cg: relative difference {err:.2e}"
        # the loss through the FSDP module is the unsharded loss
        assert float((got["loss"] - ref["loss"]).abs()) <= 1e-12 * float(ref["loss"].abs())
        # rank 0 holds a shard: about half the vector (dim-0 chunks of ceil(rows / 2))
        n_local, n = float(got["n_local"]), float(got["n_global"])
        assert n / 2 <= n_local < n, case
        # the step and the error estimates are recorded
        assert 0 < float(got["step"]) < 1e-2 and float(got["two_point_error"]) < 1e-2


def _problem(shard: bool):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(5, 3, generator=g), torch.randint(0, 2, (5,), generator=g))
            for _ in range(2)]
    prob = cs.Problem(model.double(), "cross_entropy",
                      [(x.double(), y) for x, y in data], shard=shard)
    prob.original = model
    return prob


def test_one_process_sharded_matches_double_backward():
    # shard=True in one process: a private gloo group of one; products by finite differences
    sharded, plain = _problem(True), _problem(False)
    op = cs.hessian(sharded)
    assert type(op).__name__ == "ShardedHessianOperator" and op.shape == (26, 26)
    (a,) = eigsh(op, top=2, tol=1e-11, seed=0)
    (b,) = eigsh(cs.hessian(plain), top=2, tol=1e-11, seed=0)
    assert torch.allclose(a.eigenvalues, b.eigenvalues, rtol=1e-9, atol=0)
    assert hvp_record(sharded)["stencil"] == "central-4-point"
    # the caller's module is not sharded; the problem's copy is
    assert all(type(p) is torch.nn.Parameter for p in sharded.original.parameters())
    assert all(type(p).__name__ == "DTensor" for p in sharded.model.parameters())


def test_algorithms_with_local_inner_products_refuse_the_sharded_operator():
    from curvscope.linalg import hutchinson_trace, minres, power_iteration

    op = cs.hessian(_problem(True))
    b = torch.ones(op.shape[0], dtype=torch.float64)
    for call in (lambda: power_iteration(op, 1), lambda: hutchinson_trace(op, num_matvecs=2),
                 lambda: minres(op, b), lambda: op + op, lambda: 2.0 * op):
        with pytest.raises(OptionError, match="shard"):
            call()


@pytest.mark.parametrize("maker", [cs.ggn, cs.fisher, cs.empirical_fisher, cs.kfac])
def test_other_matrices_are_refused_in_one_sentence(maker):
    prob = _problem(True)
    with pytest.raises(OptionError) as info:
        maker(prob)
    text = str(info.value)
    assert "shard" in text and text.count(". ") == 0 and text.endswith(".")


def test_problem_views_are_refused():
    prob = _problem(True)
    for call in (lambda: prob.loss_and_grad(), lambda: prob.select("0.*"),
                 lambda: prob.subsample(3), lambda: cs.hessian(prob, hvp="double-backward")):
        with pytest.raises(OptionError, match="shard"):
            call()


def test_unsharded_lanczos_is_unchanged():
    # the inner-product helper is the identity path for operators without reduce_inner:
    # the same numbers, bit for bit, as plain products would give
    from curvscope.linalg._inner import Inner

    g = torch.Generator().manual_seed(0)
    M = torch.randn(40, 40, generator=g, dtype=torch.float64)
    A = M + M.T
    inner = Inner(as_operator(A))
    w = torch.randn(40, generator=g, dtype=torch.float64)
    Q = torch.linalg.qr(torch.randn(40, 5, generator=g, dtype=torch.float64))[0]
    assert not inner.sharded and inner.size == 40
    assert torch.equal(inner.dots(Q, w), Q.T @ w)
    assert torch.equal(inner.norm(w), torch.linalg.vector_norm(w))
    assert torch.equal(inner.col_norms(Q), torch.linalg.vector_norm(Q, dim=0))
    r, _ = eigsh(A, top=3, bottom=1, tol=1e-12, seed=0)
    want = torch.linalg.eigvalsh(A)
    assert torch.allclose(r.eigenvalues, want.flip(0)[:3], rtol=1e-10)


@pytest.fixture
def tiny(tmp_path):
    return write_tiny(tmp_path)


_cli = run_cli


def test_torchrun_spectrum_with_shard_matches_one_process(tiny):
    import json

    common = ["spectrum", "model.pt", "--dtype", "float64", "--batch-size", "5", "--top", "3",
              "--bottom", "1", "--tol", "1e-10"]
    one = _cli(tiny, 1, *common, "--out", "one")
    assert one.returncode == 0, one.stdout + one.stderr
    two = _cli(tiny, 2, *common, "--shard", "--out", "two")
    assert two.returncode == 0, two.stdout + two.stderr
    a = json.loads((tiny / "one" / "spectrum.json").read_text())
    b = json.loads((tiny / "two" / "spectrum.json").read_text())
    va = [v for s in a["results"]["spectra"] for v in s["eigenvalues"]]
    vb = [v for s in b["results"]["spectra"] for v in s["eigenvalues"]]
    assert len(va) == len(vb) == 4
    for x, y in zip(va, vb, strict=True):
        assert abs(x - y) <= RTOL * abs(x)
    assert b["settings"]["shard"] is True and b["settings"]["world_size"] == 2
    assert b["hvp"]["stencil"] == "central-4-point" and b["hvp"]["step"] > 0
    assert b["input"]["sharded"]["world_size"] == 2


@pytest.mark.parametrize(
    "args",
    [
        ["density", "model.pt", "--shard"],
        ["spectrum", "model.pt", "--matrix", "ggn", "--shard"],
        ["spectrum", "model.pt", "--per-layer", "--shard"],
    ],
)
def test_cli_refuses_what_shard_cannot_do(tiny, args):
    res = _cli(tiny, 1, *args, "--out", "out")
    assert res.returncode == 1, res.stdout + res.stderr
    assert "Traceback" not in res.stderr
    assert "--shard" in res.stderr
    line = res.stderr.strip().splitlines()
    assert len(line) == 1 and line[0].startswith("error:"), res.stderr


def test_a_sharded_load_lets_the_unsharded_module_go(tmp_path):
    """cs.load(shard=True) reads the whole module, shards a copy and must not keep the
    original: its record kept it, a full parameter copy on every rank (the memory sharding
    is for). After the load no plain Parameter of the checkpoint's shapes is alive."""
    import gc

    import numpy as np

    from curvscope.io import build_arch, save_checkpoint

    arch = {"type": "mlp", "sizes": [7, 13, 5], "activation": "tanh", "bias": True}
    g = np.random.default_rng(0)
    np.savez(tmp_path / "data.npz", x=g.normal(size=(9, 7)).astype(np.float32),
             y=g.integers(0, 5, size=9))
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "m.pt", build_arch(arch), arch,
                    {"data": "data.npz", "loss": "cross_entropy", "reduction": "mean"})
    prob = cs.load(str(tmp_path / "m.pt"), shard=True)
    gc.collect()
    shapes = {(13, 7), (5, 13)}
    alive = [o for o in gc.get_objects()
             if type(o) is torch.nn.Parameter and tuple(o.shape) in shapes]
    assert prob.loaded.model is None and prob.loaded.sha256
    assert alive == []
    assert all(type(p).__name__ == "DTensor" for p in prob.model.parameters())
    # the positions of the local rows are built when asked for, not kept beside the shard
    assert prob.sharding.local_rows.tolist() == list(range(prob.num_params))
