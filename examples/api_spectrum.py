"""The Python API behind `curvscope spectrum`, on your own model and data.

Run:  python examples/api_spectrum.py
"""

import torch
from torch import nn

from curvscope import Problem
from curvscope.io import load_dataset
from curvscope.linalg import eigenpairs, hutchpp_trace
from curvscope.operators import GGNOperator, HessianOperator

# Any nn.Module and any list of (X, y) batches (a DataLoader works too, if it does not shuffle).
torch.manual_seed(0)
data = load_dataset("digits")
model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
opt = torch.optim.Adam(model.parameters(), lr=1e-2)
for _ in range(100):
    opt.zero_grad()
    nn.functional.cross_entropy(model(data.x), data.y).backward()
    opt.step()

problem = Problem(model, "cross_entropy", data.batches(500), reduction="mean")
H = HessianOperator(problem)
top, bottom = eigenpairs(H, top=3, bottom=1, tol=1e-4)
for lam, res, ok in zip(top.eigenvalues, top.residual_norms, top.converged, strict=True):
    print(f"lambda = {lam:.6f}  ||Hv - lambda v|| = {res:.1e}  converged = {bool(ok)}")
print(f"smallest: {float(bottom.eigenvalues[0]):.3e}  ({top.num_matvecs} products)")

# Blocks and other matrices are operators too.
G0 = GGNOperator(problem).block("0")
(g_top,) = eigenpairs(G0, top=1)
print(f"largest GGN eigenvalue of layer 0: {float(g_top.eigenvalues[0]):.6f}")
tr = hutchpp_trace(H, num_matvecs=60, seed=0)
print(f"trace(H) ~ {tr.estimate:.4f} +- {tr.stderr:.4f} (Hutch++)")
