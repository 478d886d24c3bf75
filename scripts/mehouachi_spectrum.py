"""Reproduce the Mehouachi & Kasmi Hessian-spectrum claim (eqs. 60-62) numerically.

Setting (paper Sec. 5.1): one pattern p through an MLP whose every layer, the output included,
is x(k) = F(W(k) x(k-1) + beta(k)) with F a strictly monotone piecewise-linear activation
(leaky ReLU, slope 0.3), and the regularised cost (43)

    J = 1/2 ||d - x(n)||^2 + sum_{k<n} lambda_k / 2 ||x(k)||^2 .

The paper claims the Hessian's eigenvalues are (62): family 1, {lambda_k F'(a(k))_i^2} for every
unit of every layer (lambda_n = 1), and family 2, {-||F'(a(k)) * b(k)||^2 / lambda_{k-1}} for
k = 2..n with multiplicity n_{k-1} (b the adjoints of eq. 19), the rest zero. We build the
dense Hessian of J in float64 with torch.func and compare eigenvalues and inertia.
shared/papers/FINDINGS.md section 3 found the eigenvalues wrong (the congruence in eq. 59 is
not orthogonal, so only the inertia survives, by Sylvester's law); this script shows whichever
outcome the numbers give.

Run:  python scripts/mehouachi_spectrum.py   (writes reports/mehouachi/README.md and results.json)
``--out DIR`` writes there instead; ``--quick``: the same (it takes a second) into ``--out`` or a
temporary folder, never into the repository.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

SLOPE = 0.3
LAMBDA = 0.1
OUT = Path(__file__).resolve().parents[1] / "reports" / "mehouachi"
MODELS = [[3, 2], [3, 4, 2], [2, 3, 2], [3, 3, 3, 2]]


def leaky(a):
    return torch.where(a > 0, a, SLOPE * a)


def dleaky(a):
    return torch.where(a > 0, torch.ones_like(a), torch.full_like(a, SLOPE))


def unpack(theta, sizes):
    out, i = [], 0
    for n_in, n_out in zip(sizes[:-1], sizes[1:], strict=True):
        w = theta[i : i + n_in * n_out].reshape(n_out, n_in)
        i += n_in * n_out
        b = theta[i : i + n_out]
        i += n_out
        out.append((w, b))
    return out


def cost(theta, sizes, x0, d, lambdas):
    x = x0
    total = 0.0
    layers = unpack(theta, sizes)
    for k, (w, b) in enumerate(layers):
        x = leaky(w @ x + b)
        if k < len(layers) - 1:
            total = total + 0.5 * lambdas[k] * (x @ x)
    return total + 0.5 * ((d - x) @ (d - x))


def claimed(theta, sizes, x0, d, lambdas):
    layers = unpack(theta, sizes)
    xs, as_ = [x0], []
    for w, b in layers:
        a = w @ xs[-1] + b
        as_.append(a)
        xs.append(leaky(a))
    n = len(layers)
    lam = list(lambdas) + [1.0]  # lambda_n = 1 (the data term)
    bs = [None] * n
    bs[-1] = d - xs[-1]
    for k in range(n - 1, 0, -1):  # eq. 19: b(k-1) = W(k)^T F'(a(k)) b(k) - lambda x(k-1)
        w, _ = layers[k]
        bs[k - 1] = w.T @ (dleaky(as_[k]) * bs[k]) - lam[k - 1] * xs[k]
    fam1 = [float(lam[k] * v**2) for k in range(n) for v in dleaky(as_[k])]
    fam2 = []
    for k in range(1, n):
        value = -float(((dleaky(as_[k]) * bs[k]) ** 2).sum()) / lam[k - 1]
        fam2 += [value] * sizes[k]  # multiplicity n_{k-1} (units of layer k-1's output)
    total = sum(sizes[i] * sizes[i + 1] + sizes[i + 1] for i in range(len(sizes) - 1))
    vals = fam1 + fam2
    vals += [0.0] * (total - len(vals))
    return torch.tensor(sorted(vals), dtype=torch.float64), fam1, fam2


def inertia(vals, tol):
    return (int((vals > tol).sum()), int((vals < -tol).sum()), int((vals.abs() <= tol).sum()))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help=f"default {OUT}")
    ap.add_argument("--quick", action="store_true", help="write to a temporary folder")
    args = ap.parse_args()
    out = args.out or (Path(tempfile.mkdtemp()) if args.quick else OUT)
    torch.manual_seed(0)
    rows = []
    for sizes in MODELS:
        total = sum(sizes[i] * sizes[i + 1] + sizes[i + 1] for i in range(len(sizes) - 1))
        theta = torch.randn(total, dtype=torch.float64)
        x0 = torch.randn(sizes[0], dtype=torch.float64)
        d = torch.randn(sizes[-1], dtype=torch.float64)
        lambdas = [LAMBDA] * (len(sizes) - 2)
        H = torch.func.hessian(cost)(theta, sizes, x0, d, lambdas)
        true = torch.linalg.eigvalsh(H)
        claim, fam1, fam2 = claimed(theta, sizes, x0, d, lambdas)
        tol = 1e-10 * float(true.abs().max())
        predicted_inertia = (
            sum(sizes[1:]),
            sum(sizes[1:-1]),
            total - sum(sizes[1:]) - sum(sizes[1:-1]),
        )
        rows.append(
            {
                "sizes": sizes,
                "params": total,
                "lambda_hidden": LAMBDA,
                "true_eigenvalues": true.tolist(),
                "claimed_eigenvalues": claim.tolist(),
                "max_abs_sorted_difference": float((true - claim).abs().max()),
                "true_inertia": inertia(true, tol),
                "claimed_inertia": inertia(claim, tol),
                "predicted_inertia": predicted_inertia,
                "input_norm_squared": float(x0 @ x0),
            }
        )
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    lines = [
        "# Mehouachi & Kasmi: the claimed Hessian spectrum (eqs. 60-62), measured",
        "",
        "Generated by `python scripts/mehouachi_spectrum.py`: one pattern through leaky-ReLU "
        f"(slope {SLOPE}) MLPs with every layer activated, cost (43) with lambda_k = {LAMBDA}, "
        "dense float64 Hessian (torch.func) against the eigenvalues of eq. 62 (family 1: "
        "lambda_k F'(a_k)_i^2; family 2: -||F'(a_k) b_k||^2 / lambda_{k-1}, multiplicity "
        "n_{k-1}; the rest zero). Inertia = (positive, negative, zero), zero meaning "
        "|eigenvalue| <= 1e-10 max|eigenvalue|.",
        "",
        "| sizes | params | max abs diff (sorted) | inertia true | inertia claimed | "
        "inertia predicted (sum n_k, sum n_{k-1}, rest) |",
        "|---|---:|---:|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {'-'.join(map(str, r['sizes']))} | {r['params']} | "
            f"{r['max_abs_sorted_difference']:.3g} | {tuple(r['true_inertia'])} | "
            f"{tuple(r['claimed_inertia'])} | {tuple(r['predicted_inertia'])} |"
        )
    lines += ["", "Non-zero eigenvalues, true against claimed:", ""]
    for r in rows:
        t = [
            v
            for v in r["true_eigenvalues"]
            if abs(v) > 1e-10 * max(map(abs, r["true_eigenvalues"]))
        ]
        c = [v for v in r["claimed_eigenvalues"] if v != 0.0]
        lines.append(
            f"- {'-'.join(map(str, r['sizes']))}: true {[round(v, 4) for v in t]}; "
            f"claimed {[round(v, 4) for v in c]} (|x_0|^2 = {r['input_norm_squared']:.3g})"
        )
    ok_inertia = all(tuple(r["true_inertia"]) == tuple(r["predicted_inertia"]) for r in rows)
    ok_values = all(r["max_abs_sorted_difference"] < 1e-8 for r in rows)
    lines += [
        "",
        f"Verdict from these numbers: eigenvalues {'match' if ok_values else 'do NOT match'} the "
        f"claim; inertia {'matches' if ok_inertia else 'does NOT match'} the prediction.",
        "",
    ]
    (out / "README.md").write_text("\n".join(lines))
    print("\n".join(lines))
    print(f"wrote {out / 'README.md'} and {out / 'results.json'}")


if __name__ == "__main__":
    main()
