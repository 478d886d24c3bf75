"""One rank of the sharded-mode tests: ``python tests/shard_worker.py RANK WORLD STORE OUT CASES``.

``WORLD=1`` with ``STORE=-`` computes the reference in one process without sharding (exact
Hessian products by double backward); ``WORLD>1`` joins a gloo group through a file store
(no network), builds each case with ``shard=True`` (FSDP2) and takes the same top
eigenvalues by Lanczos on the sharded operator. Rank 0 saves ``{case: {key: tensor}}``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import curvscope as cs  # noqa: E402
from curvscope.linalg import cg, eigsh, slq  # noqa: E402
from curvscope.models import TinyGPT  # noqa: E402
from curvscope.operators import hvp_record  # noqa: E402
from tests import cases  # noqa: E402

TOP = 3
TOL = 1e-11


def _gpt():
    torch.manual_seed(0)
    model = TinyGPT(5, 6, 1, 2, 4).double()
    with torch.no_grad():  # GPT-2 init is tiny (std 0.02): spread the weights out
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    g = torch.Generator().manual_seed(1)
    data = [
        (ids, ids.clone())
        for ids in (torch.randint(0, 5, (2, 6), generator=g) for _ in range(3))
    ]
    return model, "causal_lm", data, "mean"


def build(name: str):
    if name == "tiny-gpt":
        return _gpt()
    by_id = {c["id"]: c for c in cases.CASES}
    return cases.build(by_id[name])


def measure(name: str, group, shard: bool) -> dict:
    model, loss, data, reduction = build(name)
    prob = cs.Problem(model, loss, data, reduction=reduction, weight_decay=1e-3, group=group,
                      shard=shard)
    op = cs.hessian(prob)
    (res,) = eigsh(op, top=TOP, tol=TOL, seed=0)
    quad = slq(op, num_probes=2, num_steps=6, seed=0)
    rhs = torch.randn(prob.num_params, generator=torch.Generator().manual_seed(7),
                      dtype=torch.float64)
    if shard:  # this rank's rows of the right-hand side
        rhs = rhs[op.local_rows]
    sol = cg(op, rhs, max_iter=4, tol=1e-14, negative_curvature="continue")
    out = {
        "eigenvalues": res.eigenvalues.to(torch.float64),
        "slq_nodes": quad.nodes.to(torch.float64).reshape(-1),
        "slq_weights": quad.weights.to(torch.float64).reshape(-1),
        "cg_x": sol.x.to(torch.float64),
        "loss": prob.loss().to(torch.float64).reshape(1),
    }
    if shard:
        info = hvp_record(prob)
        out["two_point_error"] = torch.tensor([info["two_point_error"]], dtype=torch.float64)
        out["step"] = torch.tensor([info["step"]], dtype=torch.float64)
        out["n_local"] = torch.tensor([float(op.shape[0])], dtype=torch.float64)
        out["n_global"] = torch.tensor([float(prob.num_params)], dtype=torch.float64)
        out["rows"] = op.local_rows.to(torch.float64)
    return out


def main() -> None:
    rank, world, store, path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    torch.set_num_threads(1)
    group = None
    shard = store != "-"
    if shard:
        import torch.distributed as dist

        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                                world_size=world)
        group = cs.Group(rank, world)
    results = {name: measure(name, group, shard) for name in sys.argv[5].split(",")}
    if rank == 0:
        torch.save(results, path)
    if shard:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
