"""The Python API behind `curvscope spectrum`, on your own model and data.

The same flat API as the package docstring and the README: ``cs.Problem`` (or ``cs.load``),
``cs.hessian``/``cs.ggn``, ``cs.lanczos`` (the one eigensolver: thick-restart Lanczos with
residuals and error bounds), ``cs.hutchpp``.

Run:  python examples/api_spectrum.py
"""

import torch
from torch import nn

import curvscope as cs
from curvscope.io import load_dataset

# Any nn.Module and any list of (X, y) batches (a DataLoader works too, if it does not shuffle).
torch.manual_seed(0)
data = load_dataset("digits")
model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
opt = torch.optim.Adam(model.parameters(), lr=1e-2)
for _ in range(100):
    opt.zero_grad()
    nn.functional.cross_entropy(model(data.x), data.y).backward()
    opt.step()

problem = cs.Problem(model, "cross_entropy", data.batches(500), reduction="mean")
H = cs.hessian(problem)
top, bottom = cs.lanczos(H, top=3, bottom=1, tol=1e-4)
for lam, res, bound, ok in zip(
    top.eigenvalues, top.residual_norms, top.error_bounds, top.converged, strict=True
):
    print(f"lambda = {lam:.6f}  ||Hv - lambda v|| = {res:.1e}  error <= {bound:.1e}  "
          f"converged = {bool(ok)}")
print(f"smallest: {float(bottom.eigenvalues[0]):.3e}  ({top.num_matvecs} products)")

# Blocks and other matrices are operators too.
g_top = cs.lanczos(cs.ggn(problem).block("0"), top=1)
print(f"largest GGN eigenvalue of layer 0: {float(g_top.eigenvalues[0]):.6f}")
tr = cs.hutchpp(H, num_matvecs=60, seed=0)
print(f"trace(H) ~ {tr.estimate:.4f} +- {tr.stderr:.4f} (Hutch++)")
