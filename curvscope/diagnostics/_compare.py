r"""``compare``: each curvature approximation against the true Hessian, layer by layer.

For every layer block (a module's weight and bias together, the diagonal block of the full
matrix) and every matrix ``A``:

- relative Frobenius error :math:`\lVert A - H\rVert_F / \lVert H\rVert_F`: exact from dense
  blocks when the block has at most ``exact_max_dim`` rows, else a Hutchinson estimate
  :math:`\lVert M\rVert_F^2 = E\lVert M z\rVert^2` (Rademacher ``z``) with the standard error by
  the delta method; block-diagonal approximations (PCH per tensor, KFAC) carry their missing
  cross terms into the error, since the layer block of ``H`` includes weight-bias terms;
- the Chen et al. metric on the layer's bias block (Tables 2-5, FINDINGS.md section 2):
  :math:`\lVert A_b - V|\Lambda|V^T\rVert_F` with :math:`E_i[\nabla^2_b \xi_i] = H_b = V\Lambda
  V^T`, i.e. the distance to the absolute-value Hessian of the bias block (absolute, not
  relative, as in the paper's tables);
- top-k eigenvalues of both, overlap of the top-k eigenspaces (cosines of the principal angles,
  the singular values of :math:`Q_A^T Q_H`), and the smallest eigenvalue of ``A``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from .._errors import CurvscopeError, OptionError, UnsupportedModelError
from ..linalg import LinearOperator, as_operator, eigsh
from ..operators import compare_defaults
from ._common import Progress, keep_finished, named_operators, resolve_blocks

__all__ = ["COMPARE_MATRICES", "CompareResult", "Comparison", "compare"]

COMPARE_MATRICES = tuple(compare_defaults())
"""Approximations compared by default (from the registry)."""


@dataclass(frozen=True)
class Comparison:
    """One ``results.comparisons`` row."""

    block: str
    matrix: str
    rel_frobenius: float
    rel_frobenius_stderr: float
    method: str
    chen_metric: float | None
    top_eigenvalues: list[float]
    hessian_top_eigenvalues: list[float]
    subspace_overlap: list[float]
    min_eigenvalue: float
    num_matvecs: int


@dataclass(frozen=True)
class CompareResult:
    """All rows, the matrices skipped with their reasons, and the products used."""

    comparisons: list[Comparison]
    skipped: list[dict] = field(default_factory=list)
    num_matvecs: int = 0
    notes: list[str] = field(default_factory=list)

    def to_results(self) -> dict:
        """The ``results`` part of the result document."""
        return {"comparisons": self.comparisons, "skipped": self.skipped}


@dataclass
class _Reference:
    """What is computed once per block from the Hessian."""

    dense: torch.Tensor | None
    probes: torch.Tensor | None
    hz: torch.Tensor | None
    top_values: list[float]
    top_vectors: torch.Tensor
    bias_abs: torch.Tensor | None
    bias_name: str | None
    num_matvecs: int


def _rademacher(n: int, m: int, gen: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    z = torch.randint(0, 2, (n, m), generator=gen, dtype=torch.int8).to(like.dtype) * 2 - 1
    return z.to(like.device)


def _rel_hutchinson(az: torch.Tensor, hz: torch.Tensor) -> tuple[float, float]:
    """Ratio of Frobenius norms from probe products, with a delta-method standard error."""
    a = ((az - hz) ** 2).sum(0).to(torch.float64)
    b = (hz**2).sum(0).to(torch.float64)
    m = a.shape[0]
    ma, mb = float(a.mean()), float(b.mean())
    if mb <= 0:
        return math.inf, math.nan
    rel = math.sqrt(max(ma, 0.0) / mb)
    if m < 2 or ma <= 0:
        return rel, 0.0
    va, vb = float(a.var()) / m, float(b.var()) / m
    cov = float(((a - ma) * (b - mb)).sum()) / (m - 1) / m
    # d rel = rel/2 * (da/a - db/b)
    var = (rel / 2) ** 2 * (va / ma**2 + vb / mb**2 - 2 * cov / (ma * mb))
    return rel, math.sqrt(max(var, 0.0))


def _bias_of(reference: LinearOperator, block: str) -> str | None:
    names = reference.block_parts(block)
    return next((n for n in names if n.endswith("bias")), None)


def _abs_matrix(m: torch.Tensor) -> torch.Tensor:
    lam, v = torch.linalg.eigh(m.to(torch.float64))
    return (v * lam.abs()) @ v.T


def compare(
    reference,
    candidates: Mapping[str, object],
    *,
    blocks: Sequence[str] | str | None = None,
    top_k: int = 5,
    exact_max_dim: int = 2048,
    hutchinson_probes: int = 64,
    tol: float = 1e-4,
    seed: int = 0,
    skipped: Sequence[dict] = (),
    progress: Progress | None = None,
) -> CompareResult:
    """Compare approximations with a reference (the Hessian) per block.

    Args:
        reference: the true matrix (an operator, or anything ``as_operator`` accepts).
        candidates: ``{name: operator}`` of approximations with the same block structure.
        blocks: block names or a blocking mode (default: per layer, or ``all`` when the
            reference has no named blocks).
        top_k: eigenvalues and eigenspace dimension compared.
        exact_max_dim: blocks up to this many rows are compared densely (exactly).
        hutchinson_probes: probes of the Frobenius estimate for larger blocks.
        tol: Lanczos tolerance of the eigenvalues.
        seed: seeds probes and start vectors.
        skipped: candidates left out before the call, ``{"matrix", "reason"}``, recorded.
        progress: ``progress(completed, total, description)``.

    Raises:
        OptionError: for an unknown block, or no candidate at all.
    """
    H = as_operator(reference, name="hessian")
    ops = named_operators(candidates) if candidates else {}
    if not ops:
        reasons = "; ".join(f"{s['matrix']}: {s['reason']}" for s in skipped) or "none given"
        raise OptionError(
            f"no matrix to compare with the reference ({reasons}).", option="matrices"
        )
    if blocks is None:
        try:
            block_names = H.named_blocks("per-layer")
        except OptionError:
            block_names = ["all"]
    else:
        block_names = resolve_blocks(H, blocks)
    skipped = [dict(s) for s in skipped]
    rows: list[Comparison] = []
    total = len(block_names) * (1 + len(ops))
    done = 0
    matvecs = 0
    notes: list[str] = []
    with keep_finished(
        notes,
        "the blocks and matrices listed",
        lambda: CompareResult(rows, skipped, matvecs, notes),
    ):
        for block in block_names:
            gen = torch.Generator().manual_seed(int(seed))
            hb = H.block(block)
            n = hb.shape[0]
            k = min(top_k, n - 1) if n > 1 else 1
            ref = _reference(H, hb, block, n, k, exact_max_dim, hutchinson_probes, tol, gen)
            matvecs += ref.num_matvecs
            done += 1
            if progress is not None:
                progress(done, total, f"compare [{block}] reference")
            for name, op in list(ops.items()):
                try:
                    row = _row(op, block, name, ref, k, tol, gen)
                    matvecs += row.num_matvecs
                except UnsupportedModelError as exc:
                    skipped.append({"matrix": name, "block": block, "reason": str(exc)})
                    continue
                except CurvscopeError:
                    raise
                rows.append(row)
                done += 1
                if progress is not None:
                    progress(done, total, f"compare [{block}] {name}")
    return CompareResult(rows, skipped, matvecs)


def _reference(H, hb, block, n, k, exact_max_dim, probes, tol, gen) -> _Reference:
    dense = hb.dense() if n <= exact_max_dim else None
    z = hz = None
    if dense is None:
        z = _rademacher(n, probes, gen, torch.empty(0, dtype=hb.dtype, device=hb.device))
        hz = hb @ z
    res = eigsh(hb, top=k, tol=tol, seed=gen)[0]
    bias = _bias_of(H, block)
    hbias = H.block(bias) if bias else None
    bias_abs = _abs_matrix(hbias.dense()) if bias else None
    used = hb.num_matvecs + (hbias.num_matvecs if hbias is not None else 0)
    return _Reference(
        dense, z, hz, res.eigenvalues.tolist(), res.eigenvectors, bias_abs, bias, used
    )


def _row(op, block, name, ref: _Reference, k, tol, gen) -> Comparison:
    ab = op.block(block)
    if ref.dense is not None:
        a = ab.dense()
        num = torch.linalg.matrix_norm((a - ref.dense).to(torch.float64))
        den = torch.linalg.matrix_norm(ref.dense.to(torch.float64))
        rel, stderr, method = float(num / den), 0.0, "exact"
    else:
        rel, stderr = _rel_hutchinson(ab @ ref.probes, ref.hz)
        method = "hutchinson"
    top, bottom = eigsh(ab, top=k, bottom=1, tol=tol, seed=gen)
    overlap = torch.linalg.svdvals(
        top.eigenvectors.to(torch.float64).T @ ref.top_vectors.to(torch.float64)
    ).clamp(max=1.0)
    chen = None
    used = ab.num_matvecs
    if ref.bias_name is not None:
        bias_op = op.block(ref.bias_name)
        ob = bias_op.dense().to(torch.float64)
        chen = float(torch.linalg.matrix_norm(ob - ref.bias_abs))
        used += bias_op.num_matvecs
    return Comparison(
        block=block,
        matrix=name,
        rel_frobenius=rel,
        rel_frobenius_stderr=stderr,
        method=method,
        chen_metric=chen,
        top_eigenvalues=top.eigenvalues.tolist(),
        hessian_top_eigenvalues=list(ref.top_values),
        subspace_overlap=overlap.tolist(),
        min_eigenvalue=float(bottom.eigenvalues[0]),
        num_matvecs=used,
    )
