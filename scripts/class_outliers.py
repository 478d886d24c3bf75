"""Papyan's class / cross-class outliers of the digits classifiers, with ``curvscope classes``.

V. Papyan, "Measurements of Three-Level Hierarchical Structure in the Outliers in the Spectrum
of Deepnet Hessians" (ICML 2019, arXiv 1901.08244) and "Traces of Class/Cross-Class Structure
Pervade Deep Learning Spectra" (JMLR 2020, arXiv 2008.11865). For a C-class softmax network
the GGN is a second moment of the per-sample, per-label vectors
``delta_icc' = sqrt(p_ic') J_i^T (p_i - e_c')`` (sample i of true class c, label c'). With the
C^2 means ``delta_cc'`` over the samples of class c, the GGN has C outliers and C(C-1) smaller
"mini-outliers" above the bulk, attributed to the means.

Two splits of the means' part of G are compared (w_c = N_c / N, the class weights):

* the library's (``curvscope classes``, ``cs.class_structure``):
  G_class = sum_c w_c delta_cc delta_cc^T (rank C) and
  G_cross = sum_c sum_{c' != c} w_c delta_cc' delta_cc'^T (rank C(C-1));
* Papyan's, as his released code for the 2019 paper computes it (``compute_G_decomp`` of
  github.com/deep-lab/DeepnetHessian): the class means are the averages of the *cross-class*
  means, ``delta_c = (1/(C-1)) sum_{c' != c} delta_cc'``, and
  G0 = sum_c w_c delta_cc delta_cc^T (= the library's G_class),
  G1 = sum_c w_c (C-1) delta_c delta_c^T (rank C: the C outliers),
  G2 = sum_c sum_{c' != c} w_c (delta_cc' - delta_c)(delta_cc' - delta_c)^T (rank C(C-1): the
  mini-outliers), so that the library's G_cross = G1 + G2 exactly (checked here).

For each model and training stage: ``cs.classes(problem)`` (the document ``curvscope classes``
writes), the GGN's top C^2 + 1 eigenpairs (Lanczos, tol 1e-4), the exact eigenvalues of G0, G1,
G2 (Gram matrices of the means) and the cosines of the principal angles between their ranges and
the GGN's eigenspaces (pairs 1..C and C+1..C^2), each with its Davis-Kahan bound.

Models: the two digits classifiers of ``curvscope example`` (``digits-mlp``: 64-128-64-10 tanh
MLP, 17,226 parameters; ``digits-cnn``: Conv2d + BatchNorm2d + ReLU + max-pool + Linear, 1,386
parameters), trained as the examples are (full-batch Adam, lr 1e-2, seed 0, all 1797 digits),
analysed in eval mode on all 1797 digits with the mean cross-entropy, stopped at three stages:
10 steps (early: loss well above zero, 83-91% accuracy), 150 steps (what ``curvscope example``
ships) and 1000 steps (near-zero loss).

Writes ``OUT/class-outliers.png``, ``OUT/summary.json`` and ``OUT/<model>-<steps>/classes.json``
(the ``curvscope classes`` documents).

Usage:  OMP_NUM_THREADS=1 python scripts/class_outliers.py [--out reports/class-outliers]
About 1 to 2 minutes on one core. ``--quick``: 300 samples, 3 and 20 steps, written to ``--out``
or a fresh temporary folder (never into the repository), for a check that it runs.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
STAGES = [10, 150, 1000]
MODELS = ["digits-mlp", "digits-cnn"]


def _r(v: float) -> float:
    return float(f"{float(v):.6g}")


def train(name: str, steps: list[int], samples: int | None):
    """Full-batch Adam as ``curvscope example`` trains; yields (steps, model, x, y, loss, acc)."""
    from curvscope._examples import _SPECS
    from curvscope.io import build_arch, load_dataset

    spec = _SPECS[name]
    d = load_dataset("digits", input_shape=spec["shape"])
    x, y = torch.as_tensor(d.x).float(), torch.as_tensor(d.y).long()
    if samples:
        x, y = x[:samples], y[:samples]
    torch.manual_seed(0)
    model = build_arch(spec["arch"])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(1, max(steps) + 1):
        model.train()
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        if step in steps:
            model.eval()
            with torch.no_grad():
                out = model(x)
            yield (step, model, x, y, float(nn.functional.cross_entropy(out, y)),
                   float((out.argmax(-1) == y).float().mean()))


def papyan_split(st) -> dict:
    """G0, G1, G2 of Papyan's code as low-rank factors, from the library's means."""
    from curvscope.operators import LowRankOperator

    means = st.means.to(torch.float64)  # [P, C, C]: means[:, c, c'] = delta_cc'
    C = means.shape[1]
    w = st.weights.to(means.device)  # w_c
    off = ~torch.eye(C, dtype=torch.bool)
    cross = means.clone()
    cross[:, torch.arange(C), torch.arange(C)] = 0
    delta_c = cross.sum(2) / (C - 1)  # [P, C]
    g0 = means[:, torch.arange(C), torch.arange(C)] * w.sqrt()
    g1 = delta_c * (w * (C - 1)).sqrt()
    centred = (means - delta_c[:, :, None]) * w.sqrt()[None, :, None]
    g2 = centred[:, off]
    return {"G0": LowRankOperator(g0, name="G0"), "G1": LowRankOperator(g1, name="G1"),
            "G2": LowRankOperator(g2, name="G2")}


def analyse(model: nn.Module, x: torch.Tensor, y: torch.Tensor, out: Path) -> dict:
    """``cs.classes`` and Papyan's split against the GGN's top C^2 eigenpairs."""
    import curvscope as cs
    from curvscope.diagnostics._overlap import ritz_subspace_bound
    from curvscope.io import write_document

    prob = cs.load(model, [(x, y)], loss="cross_entropy")
    res = cs.classes(prob)
    write_document(cs.document(res, prob), out)
    st = cs.class_structure(prob)
    C = st.num_classes
    k = min(C * C, prob.num_params - 1)
    eig = cs.lanczos(st.ggn, top=k + 1, bottom=0, seed=0)
    theta = eig.eigenvalues.detach().to(torch.float64)
    V = eig.eigenvectors.detach().to(torch.float64)
    parts = papyan_split(st)
    # the library's parts are Papyan's split: class = G1, cross = G2 (check on random vectors)
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(prob.num_params, 4, dtype=torch.float64, generator=gen)
    lib = [st.class_part.factor.to(torch.float64), st.cross_part.factor.to(torch.float64)]
    lhs = lib[0] @ (lib[0].T @ z) + lib[1] @ (lib[1].T @ z)
    rhs = parts["G1"].factor @ (parts["G1"].factor.T @ z) + parts["G2"].factor @ (
        parts["G2"].factor.T @ z)
    identity_error = float((lhs - rhs).norm() / lhs.norm().clamp(min=1e-300))
    ranges = {"top": (0, C), "next": (C, k)}
    bounds = {key: ritz_subspace_bound(eig.eigenvalues, eig.residual_norms, eig.error_bounds,
                                       eig.converged, lo, hi)[0]
              for key, (lo, hi) in ranges.items()}
    spectra, angles = {}, {}
    for name, op in parts.items():
        vals, vecs = op.eigh()
        spectra[name] = [_r(v) for v in vals]
        for key, (lo, hi) in ranges.items():
            if hi <= lo or vecs.shape[1] == 0:
                continue
            cos = torch.linalg.svdvals(vecs.T.to(V.dtype) @ V[:, lo:hi]).clamp(max=1)
            angles[f"{name} vs GGN {lo + 1}..{hi}"] = {
                "mean_squared_cosine": _r(cos.pow(2).sum() / max(vecs.shape[1], hi - lo)),
                "largest_cosine": _r(cos.max()), "smallest_cosine": _r(cos.min()),
                "error_bound": _r(bounds[key])}
    traces = {name: _r(op.factor.pow(2).sum()) for name, op in parts.items()}
    ggn_trace = cs.hutchpp(st.ggn, num_matvecs=99, seed=0)
    lib = res.to_results()["classes"]
    means = np.array(lib["means_eigenvalues"])
    return {
        "num_params": prob.num_params,
        "ggn_eigenvalues": [_r(v) for v in theta[:k]],
        "ggn_next_eigenvalue": _r(theta[k]),
        "ggn_max_error_bound": _r(eig.error_bounds[:k].max()) if eig.error_bounds is not None
        else None,
        "ggn_converged": int(eig.converged[:k].sum()),
        "ggn_trace": {"estimate": _r(ggn_trace.estimate), "stderr": _r(ggn_trace.stderr)},
        "outlier_gap_ratio": _r(theta[C - 1] / theta[C]),
        "spectra": spectra | {"means (G0+G1+G2)": [_r(v) for v in means]},
        "traces": traces,
        "means_trace_fraction": _r(sum(traces.values()) / ggn_trace.estimate),
        "means_over_ggn_top_c": [_r(m / g) for m, g in zip(means[:C], theta[:C].tolist(),
                                                           strict=False)],
        "angles": angles,
        "library": {
            "class_eigenvalues": [_r(v) for v in lib["class_eigenvalues"]],
            "cross_eigenvalues_top": [_r(v) for v in lib["cross_eigenvalues"][:C]],
            "class_trace": _r(lib["class_trace"]), "cross_trace": _r(lib["cross_trace"]),
            "angles": [{"part": a.part, "ggn_pairs": a.ggn_pairs,
                        "mean_squared_cosine": _r(a.mean_squared_cosine),
                        "error_bound": _r(a.error_bound)} for a in lib["angles"]],
        },
        "identity_class_cross_vs_G1_G2": identity_error,
    }


def figure(results: list[dict], path: Path) -> None:
    """Per model and stage: the GGN's top C^2 eigenvalues against those of the means' parts."""
    import matplotlib as mpl
    from matplotlib.figure import Figure

    style = {"font.size": 9.5, "axes.titlesize": 10, "axes.titleweight": "bold",
             "axes.spines.top": False, "axes.spines.right": False, "axes.grid": True,
             "grid.alpha": 0.25, "legend.frameon": False, "savefig.dpi": 150,
             "savefig.bbox": "tight"}
    models = list(dict.fromkeys(r["model"] for r in results))
    stages = list(dict.fromkeys(r["steps"] for r in results))
    with mpl.rc_context(style):
        fig = Figure(figsize=(4.6 * len(stages), 4.0 * len(models) + 0.4), layout="constrained")
        axes = fig.subplots(len(models), len(stages), squeeze=False)
        for r in results:
            ax = axes[models.index(r["model"]), stages.index(r["steps"])]
            a = r["analysis"]
            g = np.array(a["ggn_eigenvalues"])
            ax.plot(np.arange(1, len(g) + 1), g, "o", ms=3.4, color="black",
                    label="GGN top C² (Lanczos)")
            for name, colour, marker in (("means (G0+G1+G2)", "#CC79A7", "D"),
                                         ("G1", "#D55E00", "s"), ("G2", "#0072B2", "^"),
                                         ("G0", "#009E73", "x")):
                v = np.array(a["spectra"][name])
                v = v[v > 0]
                ax.plot(np.arange(1, len(v) + 1), v, marker, ms=3.0, mfc="none", color=colour,
                        label={"means (G0+G1+G2)": "all C² means (G_class + G_cross)",
                               "G1": "G1: Papyan's class means",
                               "G2": "G2: centred cross-class means",
                               "G0": "G0 = library's G_class"}[name])
            ax.axvline(10.5, color="grey", lw=0.8, ls=":")  # C = 10 classes
            ax.set_yscale("log")
            ax.set_xscale("log")
            ax.set_ylim(bottom=max(1e-5 * g[0], ax.get_ylim()[0]))
            cos1 = a["angles"].get("G1 vs GGN 1..10", {}).get("mean_squared_cosine")
            cos0 = a["angles"].get("G0 vs GGN 1..10", {}).get("mean_squared_cosine")
            ax.set_title(f"{r['model']}, {r['steps']} steps: loss {r['loss']:.2g}, "
                         f"acc {r['accuracy']:.3f}\nthe means carry "
                         f"{100 * a['means_trace_fraction']:.0f}% of tr G\nmean cos² with GGN "
                         f"pairs 1..10: G1 {cos1:.2f}, G0 {cos0:.2f}", fontsize=9)
            ax.set_xlabel("eigenvalue index")
            ax.set_ylabel("eigenvalue")
        axes[0, 0].legend(loc="lower left", fontsize=8)
        fig.savefig(path, metadata={"Software": "curvscope"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None,
                        help="default reports/class-outliers of this checkout")
    parser.add_argument("--quick", action="store_true", help="tiny run, a temporary folder")
    args = parser.parse_args()
    if args.out is None:
        args.out = (Path(tempfile.mkdtemp(prefix="class-outliers-")) if args.quick
                    else ROOT / "reports" / "class-outliers")
    args.out.mkdir(parents=True, exist_ok=True)
    stages, samples = ([3, 20], 300) if args.quick else (STAGES, None)
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)  # as the command line does (saturated tanh units)
    from curvscope.io import write_atomic

    results = []
    for name in MODELS:
        for steps, model, x, y, loss, acc in train(name, stages, samples):
            t0 = time.perf_counter()
            a = analyse(model, x, y, args.out / f"{name}-{steps}")
            results.append({"model": name, "steps": steps, "samples": int(x.shape[0]),
                            "loss": _r(loss), "accuracy": _r(acc), "analysis": a,
                            "seconds": round(time.perf_counter() - t0, 1)})
            ang = a["angles"]
            ev = a["ggn_eigenvalues"]
            next_ev = ev[10] if len(ev) > 10 else float("nan")
            print(f"{name} {steps} steps: loss {loss:.3g}, acc {acc:.3f}; GGN top-10 "
                  f"{a['ggn_eigenvalues'][0]:.3g}..{a['ggn_eigenvalues'][9]:.3g}, "
                  f"lambda_11 {next_ev:.3g}; "
                  f"top eigenvalue G0 {a['spectra']['G0'][0]:.3g}, G1 {a['spectra']['G1'][0]:.3g}, "
                  f"G2 {a['spectra']['G2'][0]:.3g}; mean cos^2 with GGN 1..10: "
                  f"G0 {ang['G0 vs GGN 1..10']['mean_squared_cosine']:.2f}, "
                  f"G1 {ang['G1 vs GGN 1..10']['mean_squared_cosine']:.2f}; "
                  f"identity error {a['identity_class_cross_vs_G1_G2']:.1e}; "
                  f"{results[-1]['seconds']} s", flush=True)
    doc = {
        "what": "Papyan 2019/2020 class and cross-class outliers of the digits classifiers: the "
                "library's G_class/G_cross against Papyan's G0/G1/G2",
        "settings": {"models": MODELS, "stages": stages, "samples": samples or 1797,
                     "training": "full-batch Adam lr 1e-2 seed 0 (as curvscope example)",
                     "loss": "cross_entropy (mean), eval mode",
                     "lanczos": "top C^2 + 1 GGN pairs, tol 1e-4, seed 0"},
        "results": results,
    }
    write_atomic(args.out / "summary.json", json.dumps(doc, indent=1) + "\n")
    figure(results, args.out / "class-outliers.png")
    print(f"wrote {args.out / 'summary.json'} and {args.out / 'class-outliers.png'}")


if __name__ == "__main__":
    main()
