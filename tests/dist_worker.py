"""One rank of the data-parallel tests: ``python tests/dist_worker.py RANK WORLD STORE OUT``.

Joins a gloo group through a file store (no network), builds each case of
:data:`MEASURES` on its share of the batches and saves every number to ``OUT`` (rank 0).
``WORLD=1`` with no store computes the same numbers in one process, the reference.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import curvscope as cs  # noqa: E402
from curvscope.diagnostics import density, spectrum, surface  # noqa: E402
from curvscope.linalg import hutchinson_trace  # noqa: E402
from tests import cases  # noqa: E402

F64 = torch.float64
MATRICES = ["hessian", "ggn", "fisher", "fisher-mc", "empirical-fisher", "kfac", "kfac-mc", "ekfac"]


def _case(name: str):
    by_id = {c["id"]: c for c in cases.CASES}
    if name == "mlp-ce-mean-5batches":
        case = dict(by_id["mlp-ce-mean-unequal"])
        case["make"] = lambda g: cases._make_mlp_ce(g, sizes=(3, 4, 2, 5, 1))
        return case
    return by_id[name]


def measure(name: str, group) -> dict:
    model, loss, data, reduction = cases.build(_case(name))
    prob = cs.Problem(model, loss, data, reduction=reduction, weight_decay=1e-3, group=group)
    out: dict = {}
    value, grad = prob.loss_and_grad()
    out["loss"], out["grad"] = value, grad
    V = torch.randn(prob.num_params, 3, generator=torch.Generator().manual_seed(1),
                    dtype=torch.float64)
    names = [n for n in MATRICES if not (n == "ekfac" and name.startswith("cnn"))]
    if name.startswith("mlp") and "mse" not in name:
        names += ["pch-abs", "pch-clip-persample"]
    ops = cases.operators(prob, *names, seed=3)
    for n, op in ops.items():
        out[f"{n} @ V"] = op @ V[: op.shape[1]]  # KFAC covers the layers it knows
    res = spectrum({"hessian": ops["hessian"]}, top=2, bottom=1, tol=1e-10, seed=0)
    out["eigenvalues"] = torch.tensor([v for e in res.spectra for v in e.eigenvalues], dtype=F64)
    tr = hutchinson_trace(ops["ggn"], num_matvecs=20, seed=2)
    out["trace"] = torch.tensor([tr.estimate], dtype=F64)
    dens = density({"hessian": ops["hessian"]}, num_probes=2, num_steps=6, seed=0)
    out["density"] = torch.tensor(dens.densities[0].nodes, dtype=F64)
    surf = surface(prob, dims=2, directions="random", steps=5, seed=0)
    out["surface"] = torch.tensor(surf.loss, dtype=F64)
    acc = prob.accuracy()
    if acc is not None:  # classification only
        out["accuracy"] = torch.tensor([acc], dtype=F64)
    return out


def main() -> None:
    rank, world, store, path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    torch.set_num_threads(1)
    group = None
    if world > 1:
        import torch.distributed as dist

        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                                world_size=world)
        group = cs.Group(rank, world)
    results = {name: measure(name, group) for name in sys.argv[5].split(",")}
    if rank == 0:
        torch.save(results, path)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
