"""curvscope's KFAC against curvlinops' KFACLinearOperator (issue 4 item 1), densely.

Tiny models, float64, unequal batches (3 and 4), both reductions, exact (type-2) and empirical
Fisher, weight and bias together (curvlinops' separate_weight_and_bias=False is curvscope's
augmented-input convention), Conv2d with the expand approximation. Prints the largest entry of
|K_curvlinops - K_curvscope| relative to the largest entry of K.

Usage:  python benchmarks/kfac_vs_curvlinops.py [--quick]   (needs benchmarks/install-peers.sh)
Without curvlinops it prints a skip line, builds curvscope's side alone (so that still runs)
and exits 0. The models are tiny: --quick is accepted and changes nothing (seconds).
"""

import argparse

import torch
from torch import nn

from curvscope import Problem
from curvscope.operators import KFACOperator


def models():
    yield "mlp 4-5-3 tanh", nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)), (4,)
    yield (
        "cnn conv3x3-relu-linear",
        nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3)),
        (1, 6, 6),
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the same run (it is seconds already)")
    ap.parse_args()
    try:
        from curvlinops import KFACLinearOperator
    except ImportError as exc:
        print(f"skip curvlinops: not installed ({exc}); see benchmarks/install-peers.sh")
        KFACLinearOperator = None
    print("| model | reduction | Fisher | max abs diff / max abs entry |")
    print("|---|---|---|---:|")
    for name, model, shape in models():
        torch.manual_seed(0)
        model = model.double()
        x = torch.randn(7, *shape, dtype=torch.float64)
        y = torch.randint(0, 3, (7,))
        data = [(x[:3], y[:3]), (x[3:], y[3:])]
        params = list(model.parameters())
        n = sum(p.numel() for p in params)
        eye = torch.eye(n, dtype=torch.float64)
        for reduction in ("mean", "sum"):
            for ours, theirs in (("exact", "type-2"), ("empirical", "empirical")):
                problem = Problem(model, "cross_entropy", data, reduction=reduction)
                dense_ours = KFACOperator(problem, fisher_type=ours).dense()
                if KFACLinearOperator is None:
                    print(f"| {name} | {reduction} | {ours} | - (curvlinops not installed) |")
                    continue
                K = KFACLinearOperator(
                    model,
                    nn.CrossEntropyLoss(reduction=reduction),
                    params,
                    data,
                    fisher_type=theirs,
                    separate_weight_and_bias=False,
                    check_deterministic=False,
                )
                dense_theirs = torch.stack([K @ eye[:, i] for i in range(n)], 1)
                rel = float((dense_theirs - dense_ours).abs().max() / dense_ours.abs().max())
                print(f"| {name} | {reduction} | {ours} | {rel:.1e} |")


if __name__ == "__main__":
    main()
