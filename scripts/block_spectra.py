"""Block heterogeneity of the Hessian (Zhang et al. 2024) from curvscope result documents.

Y. Zhang, C. Chen, T. Ding, Z. Li, R. Sun, Z.-Q. Luo, "Why Transformers Need Adam: A Hessian
Perspective", 2024. Their observation: the Hessian spectra of a transformer's parameter blocks
(embeddings, attention, MLP, norms, head) differ widely from block to block, while a CNN's blocks
have similar spectra ("block heterogeneity" vs "block homogeneity"). They measure it with the
Jensen-Shannon distance between the SLQ densities of pairs of blocks.

This script only reads what ``curvscope spectrum --per-layer`` and ``curvscope density
--per-layer`` wrote (``spectrum.json`` and ``density.json`` in one folder per model, see
``reports/block-spectra/README.md`` for the commands) and writes:

* ``block-spectra.png``: the top-3 and the bottom eigenvalue of every block of both models,
  coloured by block type, and the per-block SLQ densities on a log10|lambda| axis;
* ``block-js.png``: the matrices of pairwise Jensen-Shannon distances between block densities;
* ``summary.json``: per-block numbers (with residuals and error bounds) and the heterogeneity
  numbers of each model, printed as a Markdown table too.

Heterogeneity numbers (per model, over its blocks, with and without the normalisation blocks):

* ``std_log10_top``: the standard deviation of log10 lambda_max;
* ``ratio_top``: max/min of lambda_max;
* ``js_mean``: the mean pairwise JS distance (base 2, so in [0, 1]) between block densities on
  a common log10|lambda| axis (floor: 1e-6 times the model's largest eigenvalue, Gaussian
  broadening 0.1 decade), with a leave-one-probe-out jackknife standard error;
* ``js_linear_mean``: the same on a common linear lambda axis (broadening 1% of the model's
  range), closer to how Zhang et al. plot densities, dominated by the bulk near 0;
* ``js_self_mean``, ``js_linear_self_mean``: the mean JS distance between the densities of the
  two halves of one block's probes, the estimator's noise floor (what "identical spectra"
  reads as with this many probes).

Usage:  python scripts/block_spectra.py [--dir reports/block-spectra] [--out DIR] [--quick]
Reads the documents under ``--dir`` and writes the figures and ``summary.json`` to ``--out``
(default: ``--dir``). ``--quick``: the same from the committed documents, written to ``--out`` or
a fresh temporary folder (never into the repository), for a check that it runs (seconds).
"""

from __future__ import annotations

import argparse
import fnmatch
import itertools
import json
import tempfile
from pathlib import Path

import numpy as np

MODELS = ("tiny-gpt", "digits-cnn")

# Block name pattern -> block type, first match wins.
BLOCK_TYPES = {
    "tiny-gpt": [
        ("tok_emb", "embedding"),
        ("pos_emb", "embedding"),
        ("*ln*", "norm"),
        ("*attn.qkv", "attn qkv"),
        ("*attn.proj", "attn proj"),
        ("*mlp.0", "mlp in"),
        ("*mlp.2", "mlp out"),
        ("head", "head"),
    ],
    "digits-cnn": [("0", "conv"), ("1", "norm"), ("5", "head")],
}
LABELS = {"digits-cnn": {"0": "conv (0)", "1": "batchnorm (1)", "5": "linear head (5)"}}
COLOURS = {
    "embedding": "tab:purple",
    "norm": "tab:gray",
    "attn qkv": "tab:red",
    "attn proj": "tab:orange",
    "mlp in": "tab:green",
    "mlp out": "tab:olive",
    "head": "tab:blue",
    "conv": "tab:brown",
}
FLOOR_REL = 1e-6
SIGMA_LOG = 0.1
GRID = 600


def block_type(model: str, block: str) -> str:
    for pattern, kind in BLOCK_TYPES[model]:
        if fnmatch.fnmatchcase(block, pattern):
            return kind
    return "other"


def label(model: str, block: str) -> str:
    return LABELS.get(model, {}).get(block, block)


def load(folder: Path) -> tuple[dict, dict | None]:
    spectrum = json.loads((folder / "spectrum.json").read_text())
    dens_path = folder / "density.json"
    density = json.loads(dens_path.read_text()) if dens_path.exists() else None
    return spectrum, density


def per_block(model: str, spectrum: dict, density: dict | None) -> dict[str, dict]:
    """Per-block numbers from the documents, in the order the blocks appear."""
    blocks: dict[str, dict] = {}
    for entry in spectrum["results"]["spectra"]:
        b = blocks.setdefault(
            entry["block"], {"block": entry["block"], "type": block_type(model, entry["block"])}
        )
        b[entry["which"]] = {
            "eigenvalues": entry["eigenvalues"],
            "residuals": entry["residual_norms"],
            "error_bounds": entry["error_bounds"],
            "converged": entry["converged"],
        }
    if density is not None:
        for entry in density["results"]["densities"]:
            b = blocks[entry["block"]]
            b["dim"] = entry["dim"]
            b["nodes"] = np.asarray(entry["nodes"], dtype=float)
            b["weights"] = np.asarray(entry["weights"], dtype=float)
            b["slq_trace"] = entry["slq_trace"]
            b["slq_trace_stderr"] = entry["slq_trace_stderr"]
            b["probes"] = entry["num_probes"]
            b["steps"] = entry["lanczos_steps"]
    return blocks


def broadened(nodes, weights, grid, sigma):
    """Gaussian-broadened quadrature density on ``grid`` (normalised by the trapezoid rule)."""
    x = np.asarray(nodes, dtype=float).ravel()
    w = np.asarray(weights, dtype=float).ravel()
    d = (w[None, :] * np.exp(-0.5 * ((grid[:, None] - x[None, :]) / sigma) ** 2)).sum(axis=1)
    area = np.trapezoid(d, grid)
    return d / area if area > 0 else d


def js_distance(p, q, grid) -> float:
    """Jensen-Shannon distance (base 2, in [0, 1]) between two densities on one grid."""
    dx = np.gradient(grid)
    p = p * dx / (p * dx).sum()
    q = q * dx / (q * dx).sum()
    m = 0.5 * (p + q)

    def kl(a, b):
        mask = (a > 0) & (b > 0)  # b >= a/2 > 0 wherever a > 0, bar underflow
        return float((a[mask] * np.log2(a[mask] / b[mask])).sum())

    return float(np.sqrt(max(0.5 * kl(p, m) + 0.5 * kl(q, m), 0.0)))


def log_axis(blocks: list[dict]):
    top = max(b["top"]["eigenvalues"][0] for b in blocks)
    floor = FLOOR_REL * top
    grid = np.linspace(np.log10(floor) - 0.5, np.log10(top) + 0.5, GRID)
    return grid, floor


def log_density(b: dict, grid, floor, probes=None) -> np.ndarray:
    nodes, weights = b["nodes"], b["weights"]
    if probes is not None:
        nodes, weights = nodes[probes], weights[probes]
    x = np.log10(np.maximum(np.abs(nodes), floor))
    return broadened(x, weights / len(weights), grid, SIGMA_LOG)


def densities(parts: list[tuple[dict, list | None]], blocks: list[dict], axis: str):
    """The grid shared by ``blocks`` and the density of each ``(block, probes)`` part on it.

    ``probes`` selects a block's probes (``None``: all of them).
    """
    if axis == "log":
        grid, floor = log_axis(blocks)
        return grid, [log_density(b, grid, floor, probes) for b, probes in parts]
    lo = min(float(b["nodes"].min()) for b in blocks)
    hi = max(float(b["nodes"].max()) for b in blocks)
    grid = np.linspace(lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo), 4 * GRID)
    dens = []
    for b, probes in parts:
        nodes, weights = b["nodes"], b["weights"]
        if probes is not None:
            nodes, weights = nodes[probes], weights[probes]
        dens.append(broadened(nodes, weights / len(weights), grid, 0.01 * (hi - lo)))
    return grid, dens


def js_matrix(blocks: list[dict], axis: str, probes=None) -> np.ndarray:
    grid, dens = densities([(b, probes) for b in blocks], blocks, axis)
    n = len(blocks)
    out = np.zeros((n, n))
    for i, j in itertools.combinations(range(n), 2):
        out[i, j] = out[j, i] = js_distance(dens[i], dens[j], grid)
    return out


def mean_offdiag(m: np.ndarray) -> float:
    n = len(m)
    return float(m[np.triu_indices(n, 1)].mean()) if n > 1 else float("nan")


def jackknife_js(blocks: list[dict], axis: str) -> tuple[float, float]:
    """Mean pairwise JS distance and its leave-one-probe-out jackknife standard error."""
    full = mean_offdiag(js_matrix(blocks, axis))
    p = min(len(b["nodes"]) for b in blocks)
    if p < 3:
        return full, float("nan")
    reps = [
        mean_offdiag(js_matrix(blocks, axis, probes=[k for k in range(p) if k != i]))
        for i in range(p)
    ]
    se = float(np.sqrt((p - 1) / p * ((np.asarray(reps) - np.mean(reps)) ** 2).sum()))
    return full, se


def js_self(blocks: list[dict], axis: str = "log") -> float:
    """Mean JS distance between the two halves of each block's probes: the noise floor."""
    p = min(len(b["nodes"]) for b in blocks)
    if p < 2:
        return float("nan")
    halves = (list(range(p // 2)), list(range(p // 2, p)))
    out = []
    for b in blocks:
        grid, d = densities([(b, h) for h in halves], blocks, axis)
        out.append(js_distance(d[0], d[1], grid))
    return float(np.mean(out))


def heterogeneity(blocks: list[dict]) -> dict:
    tops = np.array([b["top"]["eigenvalues"][0] for b in blocks])
    out = {
        "blocks": len(blocks),
        "std_log10_top": float(np.std(np.log10(tops))),
        "ratio_top": float(tops.max() / tops.min()),
    }
    if all("nodes" in b for b in blocks) and len(blocks) > 1:
        out["js_mean"], out["js_mean_se"] = jackknife_js(blocks, "log")
        out["js_linear_mean"], out["js_linear_mean_se"] = jackknife_js(blocks, "linear")
        out["js_self_mean"] = js_self(blocks, "log")
        out["js_linear_self_mean"] = js_self(blocks, "linear")
    return out


def plot(models: dict[str, list[dict]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    fig = plt.figure(figsize=(15, 10), layout="constrained")
    grid = fig.add_gridspec(2, 2, height_ratios=[1.0, 1.1])
    ax_top = fig.add_subplot(grid[0, 0])
    ax_bot = fig.add_subplot(grid[0, 1])
    names, xs, pos = [], [], 0
    for model in MODELS:
        for b in models[model]:
            c = COLOURS.get(b["type"], "black")
            ev = b["top"]["eigenvalues"]
            ax_top.scatter([pos] * len(ev), ev, color=c, s=[40, 18, 10][: len(ev)], zorder=3)
            bottom = b["bottom"]["eigenvalues"][0]
            ax_bot.scatter([pos], [bottom], color=c, s=40, zorder=3)
            names.append(label(model, b["block"]))
            xs.append(pos)
            pos += 1
        pos += 1
    n_gpt = len(models["tiny-gpt"])
    for ax in (ax_top, ax_bot):
        ax.set_xticks(xs, names, rotation=60, ha="right", fontsize=8)
        ax.axvline(n_gpt, color="k", lw=0.8, ls=":")
        ax.grid(alpha=0.3)
        ax.text(0.02, 0.97, "tiny-gpt", transform=ax.transAxes, va="top", fontsize=10)
        ax.text(0.86, 0.97, "digits-cnn", transform=ax.transAxes, va="top", fontsize=10)
    ax_top.set_yscale("log")
    ax_top.set_ylabel("top-3 Hessian eigenvalues of the block")
    ax_top.set_title("(a) top eigenvalues per block (largest dot: lambda_max)")
    ax_bot.set_yscale("symlog", linthresh=1e-3)
    ax_bot.axhline(0, color="k", lw=0.6)
    ax_bot.set_ylabel("smallest Hessian eigenvalue of the block")
    ax_bot.set_title("(b) bottom eigenvalue per block (symlog, linear within +-1e-3)")
    kinds = sorted({b["type"] for m in MODELS for b in models[m]}, key=list(COLOURS).index)
    handles = [
        Line2D([], [], marker="o", ls="", color=COLOURS.get(k, "black"), label=k) for k in kinds
    ]
    ax_top.legend(handles=handles, fontsize=8, loc="lower left", ncol=2)

    for col, model in enumerate(MODELS):
        ax = fig.add_subplot(grid[1, col])
        blocks = models[model]
        if not all("nodes" in b for b in blocks):
            ax.set_axis_off()
            continue
        g, floor = log_axis(blocks)
        seen: dict[str, int] = {}
        peak = 0.0
        for b in blocks:
            k = seen[b["type"]] = seen.get(b["type"], 0) + 1
            ls = ["-", "--", ":", "-."][(k - 1) % 4]
            d = log_density(b, g, floor)
            peak = max(peak, float(d.max()))
            ax.plot(
                g,
                d,
                color=COLOURS.get(b["type"], "black"),
                ls=ls,
                lw=1.2,
                label=label(model, b["block"]),
            )
        ax.set_yscale("log")
        ax.set_ylim(1e-4, 3 * peak)
        ax.set_xlabel(f"log10 |lambda|  (|lambda| below {floor:.1e} put at the floor)")
        ax.set_ylabel("SLQ density (per decade)")
        probes = blocks[0]["probes"]
        steps = max(b["steps"] for b in blocks)
        ax.set_title(
            f"({'cd'[col]}) {model}: per-block spectral densities "
            f"({probes} probes x {steps} Lanczos steps)"
        )
        ax.legend(fontsize=7, ncol=2, loc="upper right")
        ax.grid(alpha=0.3)
    fig.suptitle(
        "Per-block Hessian spectra: tiny-gpt (transformer) vs digits-cnn (CNN), "
        "after Zhang et al. 2024"
    )
    fig.savefig(out / "block-spectra.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(14, 6.2), layout="constrained")
    for ax, model in zip(axes, MODELS, strict=True):
        blocks = models[model]
        if not all("nodes" in b for b in blocks):
            ax.set_axis_off()
            continue
        m = js_matrix(blocks, "log")
        im = ax.imshow(m, vmin=0, vmax=1, cmap="viridis")
        ticks = [label(model, b["block"]) for b in blocks]
        ax.set_xticks(range(len(blocks)), ticks, rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(len(blocks)), ticks, fontsize=8)
        if len(blocks) <= 4:
            for i, j in itertools.product(range(len(blocks)), repeat=2):
                ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", color="w")
        ax.set_title(f"{model}: JS distance between block densities (log10|lambda| axis)")
    fig.colorbar(im, ax=axes, shrink=0.8, label="Jensen-Shannon distance (base 2)")
    fig.savefig(out / "block-js.png", dpi=110)
    plt.close(fig)


def table(model: str, blocks: list[dict]) -> str:
    rows = [
        f"**{model}**",
        "",
        "| block | type | P | lambda_1 (residual, bound) | lambda_2 | lambda_3 | lambda_min "
        "(residual, bound) | SLQ trace +- stderr |",
        "|---|---|---:|---|---:|---:|---|---|",
    ]
    for b in blocks:
        top, bot = b["top"], b["bottom"]
        ev = top["eigenvalues"]
        conv = all(top["converged"]) and all(bot["converged"])
        trace = f"{b['slq_trace']:.4g} +- {b['slq_trace_stderr']:.2g}" if "slq_trace" in b else "-"
        rows.append(
            f"| {label(model, b['block'])} | {b['type']} | {b.get('dim', '')} | "
            f"{ev[0]:.4g} ({top['residuals'][0]:.1e}, {top['error_bounds'][0]:.1e}) | "
            f"{ev[1]:.4g} | {ev[2]:.4g} | {bot['eigenvalues'][0]:.3g} "
            f"({bot['residuals'][0]:.1e}, {bot['error_bounds'][0]:.1e}) | {trace} |"
            + ("" if conv else " (not converged)")
        )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=None,
                        help="the documents (default reports/block-spectra of this checkout)")
    parser.add_argument("--out", type=Path, default=None, help="default: --dir")
    parser.add_argument("--quick", action="store_true", help="write to a temporary folder")
    args = parser.parse_args()
    if args.dir is None:
        # --quick runs from any folder (the test runs it from a temporary one)
        here = Path(__file__).resolve().parents[1] / "reports" / "block-spectra"
        args.dir = here if args.quick else Path("reports/block-spectra")
    out = args.out or (Path(tempfile.mkdtemp()) if args.quick else args.dir)
    out.mkdir(parents=True, exist_ok=True)
    models: dict[str, list[dict]] = {}
    summary: dict[str, dict] = {}
    for model in MODELS:
        spectrum, density = load(args.dir / model)
        blocks = list(per_block(model, spectrum, density).values())
        models[model] = blocks
        weights_only = [b for b in blocks if b["type"] != "norm"]
        summary[model] = {
            "heterogeneity_all_blocks": heterogeneity(blocks),
            "heterogeneity_without_norms": heterogeneity(weights_only),
            "blocks": [
                {k: v for k, v in b.items() if k not in ("nodes", "weights")} for b in blocks
            ],
        }
    plot(models, out)
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    for model in MODELS:
        print(table(model, models[model]))
        print()
    print(
        "| model | blocks | std log10 lambda_max | max/min lambda_max | mean JS (log axis) "
        "| mean JS (linear axis) |"
    )
    print("|---|---|---:|---:|---|---|")
    for model in MODELS:
        for which, key in (
            ("all", "heterogeneity_all_blocks"),
            ("without norms", "heterogeneity_without_norms"),
        ):
            h = summary[model][key]
            js = (
                f"{h['js_mean']:.3f} +- {h['js_mean_se']:.3f} (noise {h['js_self_mean']:.3f})"
                if "js_mean" in h
                else "-"
            )
            jl = (
                f"{h['js_linear_mean']:.3f} +- {h['js_linear_mean_se']:.3f} "
                f"(noise {h['js_linear_self_mean']:.3f})"
                if "js_linear_mean" in h
                else "-"
            )
            print(
                f"| {model} | {which} ({h['blocks']}) | {h['std_log10_top']:.2f} | "
                f"{h['ratio_top']:.0f} | {js} | {jl} |"
            )
    print(f"wrote {out / 'summary.json'}, {out / 'block-spectra.png'}, {out / 'block-js.png'}")


if __name__ == "__main__":
    main()
