r"""Where the outliers come from: the GGN's class / cross-class structure (Papyan 2019, 2020).

:func:`classes` splits the GGN of a ``C``-class softmax classifier into
:math:`G_\mathrm{class} + G_\mathrm{cross} + G_\mathrm{within}`
(:func:`curvscope.operators.class_structure` states the decomposition), takes the exact
eigenvalues of the two low-rank parts from their Gram matrices, the top ``C^2`` eigenpairs
of the GGN by Lanczos, and the principal angles between the parts' ranges and the GGN's
eigenspaces: Papyan's ``C`` outliers should lie in the span of the class means, the next
``C(C-1)`` in the span of the cross-class means.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .._errors import Interrupted, OptionError, arg
from ..linalg import DEFAULT_TOL, eigsh
from ..operators import LowRankOperator, check_classifier, class_structure
from ._common import Progress, add_notes
from ._overlap import ritz_subspace_bound

__all__ = ["ClassAngles", "ClassesResult", "check_classifier", "classes"]


@dataclass(frozen=True)
class ClassAngles:
    r"""Principal angles between a part's range and a GGN eigenspace.

    Attributes:
        part: ``class`` (range of :math:`G_\mathrm{class}`), ``cross`` or ``means`` (range of
            :math:`G_\mathrm{class} + G_\mathrm{cross}`).
        ggn_pairs: ``[first, last]``, 1-based, the GGN eigenpairs spanning the other space.
        dimension: the part's rank.
        cosines: cosines of the principal angles, descending (1: shared direction).
        mean_squared_cosine: :math:`\lVert U^T V\rVert_F^2 / \max(\dim U, \dim V)`, 1 when the
            spaces coincide.
        error_bound: each cosine with the exact eigenvectors lies within it of the one given
            (Davis-Kahan on the Ritz vectors; 1: the gap is unknown).
    """

    part: str
    ggn_pairs: list[int]
    dimension: int
    cosines: list[float]
    mean_squared_cosine: float
    error_bound: float


@dataclass(frozen=True)
class ClassesResult:
    """The ``results`` of ``curvscope classes`` (docs/DESIGN.md "Class structure")."""

    num_classes: int
    class_counts: list[int]
    weights: list[float]
    class_eigenvalues: list[float]
    cross_eigenvalues: list[float]
    means_eigenvalues: list[float]
    class_trace: float
    cross_trace: float
    ggn: dict
    angles: list[ClassAngles]
    notes: list[str] = field(default_factory=list)
    num_matvecs: int = 0
    self_eigenvalues: list[float] = field(default_factory=list)
    self_trace: float = 0.0

    def to_results(self) -> dict:
        """The ``results`` part of the result document."""
        return {
            "classes": {
                "num_classes": self.num_classes,
                "class_counts": self.class_counts,
                "weights": self.weights,
                "class_eigenvalues": self.class_eigenvalues,
                "cross_eigenvalues": self.cross_eigenvalues,
                "means_eigenvalues": self.means_eigenvalues,
                "class_trace": self.class_trace,
                "cross_trace": self.cross_trace,
                "self_eigenvalues": self.self_eigenvalues,
                "self_trace": self.self_trace,
                "ggn": self.ggn,
                "angles": self.angles,
            }
        }


def _angles(part, U, V, lo, hi, bound) -> ClassAngles:
    if U.shape[1] == 0 or V.shape[1] == 0:
        cos = torch.zeros(0, dtype=torch.float64)
    else:
        cos = torch.linalg.svdvals(U.T @ V).clamp(max=1.0)
    dim = max(U.shape[1], V.shape[1], 1)
    return ClassAngles(
        part=part,
        ggn_pairs=[lo + 1, hi],
        dimension=int(U.shape[1]),
        cosines=cos.tolist(),
        mean_squared_cosine=float(cos.pow(2).sum()) / dim,
        error_bound=bound,
    )


def classes(
    problem,
    *,
    top: int | None = None,
    tol: float = DEFAULT_TOL,
    rtol: float | None = None,
    max_matvecs: int | None = None,
    basis_size: int | None = None,
    basis_device: str | None = None,
    seed: int | torch.Generator = 0,
    progress: Progress | None = None,
) -> ClassesResult:
    r"""The GGN's class and cross-class parts against its top eigenpairs (module docstring).

    Args:
        problem: a softmax classifier's problem (``cross_entropy`` or ``nll`` on ``[N, C]``
            logits).
        top: GGN eigenpairs to compute (default ``C^2``: ``C`` class outliers and ``C(C-1)``
            cross-class ones; capped at the parameters less one). One more is computed for the
            gap of the bounds.
        tol: relative residual tolerance of the Lanczos pairs.
        rtol: relative error-bound tolerance instead.
        max_matvecs: Lanczos products at most.
        basis_size: Lanczos basis vectors at most.
        basis_device: where the Lanczos basis lives.
        seed: the Lanczos start vector.
        progress: ``progress(done, total, description)``.

    Raises:
        UnsupportedModelError: for a loss without classes or outputs not ``[N, C]``.
        OptionError: for a ``top`` below 1.
    """
    st = class_structure(problem)
    C = st.num_classes
    P = problem.num_params
    k = C * C if top is None else int(top)
    if k < 1:
        raise OptionError(f"{arg('top')} must be at least 1, got {k}.", option="top")
    notes: list[str] = []
    if k + 1 > P:
        notes.append(f"only {P - 1} GGN eigenpairs of {k} asked for: the model has {P} parameters.")
        k = P - 1
    # the parts first: exact and cheap (small Gram matrices), so Ctrl-C in the GGN's Lanczos
    # below keeps them
    cls_vals, cls_vecs = st.class_part.eigh()
    crs_vals, crs_vecs = st.cross_part.eigh()
    both = LowRankOperator(torch.cat([st.class_part.factor, st.cross_part.factor], dim=1))
    mean_vals, mean_vecs = both.eigh()
    cls_vecs, crs_vecs, mean_vecs = (t.to("cpu") for t in (cls_vecs, crs_vecs, mean_vecs))
    parts = {
        "num_classes": C,
        "class_counts": [int(c) for c in st.counts],
        "weights": st.weights.tolist(),
        "class_eigenvalues": cls_vals.tolist(),
        "cross_eigenvalues": crs_vals.tolist(),
        "means_eigenvalues": mean_vals.tolist(),
        "class_trace": float(st.class_part.factor.double().pow(2).sum()),
        "cross_trace": float(st.cross_part.factor.double().pow(2).sum()),
        "self_eigenvalues": st.self_part.eigh()[0].tolist() if st.self_part is not None else [],
        "self_trace": float(st.self_part.factor.double().pow(2).sum())
        if st.self_part is not None
        else 0.0,
    }
    ggn = st.ggn
    stopped = False
    try:
        (res,) = eigsh(
            ggn,
            top=k + 1,
            tol=tol,
            rtol=rtol,
            basis_size=basis_size,
            max_matvecs=max_matvecs,
            basis_device=basis_device,
            seed=seed,
            progress=progress,
        )
    except Interrupted as stop:  # Lanczos keeps the Ritz pairs at hand
        found = [r for r in (stop.partial or []) if r.which == "top"]
        if not found:
            notes.append(
                "interrupted (Ctrl-C) during the GGN's Lanczos before any Ritz value: the "
                "parts' eigenvalues are kept, the GGN's eigenvalues and the angles are not."
            )
            raise Interrupted(
                ClassesResult(**parts, ggn={}, angles=[], notes=notes, num_matvecs=C * C)
            ) from None
        res, stopped = found[0], True
        notes.append(
            f"interrupted (Ctrl-C) during the GGN's Lanczos: its {len(res.eigenvalues)} current "
            "Ritz values are kept with their residual estimates (not measured, no bound), "
            "marked not converged; the angles use those Ritz vectors (error bound 1)."
        )
    except KeyboardInterrupt:
        notes.append("interrupted (Ctrl-C): the parts' eigenvalues are kept, the GGN's are not.")
        raise Interrupted(
            ClassesResult(**parts, ggn={}, angles=[], notes=notes, num_matvecs=C * C)
        ) from None
    add_notes(notes, ggn)
    V = res.eigenvectors.detach().to("cpu", torch.float64)
    got = int(res.eigenvalues.shape[0])
    angles = []
    for part, U, lo, hi in (
        ("class", cls_vecs, 0, min(C, k, got)),
        ("cross", crs_vecs, C, min(C * C, k, got)),
        ("means", mean_vecs, 0, min(C * C, k, got)),
    ):
        if hi <= lo:
            continue
        bound, _, _ = ritz_subspace_bound(
            res.eigenvalues, res.residual_norms, res.error_bounds, res.converged, lo, hi
        )
        angles.append(_angles(part, U, V[:, lo:hi], lo, hi, bound))
    if k < C * C:
        notes.append(
            f"{k} GGN eigenpairs (of C^2 = {C * C}): the cross-class comparison covers pairs "
            f"{C + 1}..{k} only."
        )
    empty = [c for c in range(C) if int(st.counts[c]) == 0]
    if empty:
        notes.append(f"classes {empty} have no sample: their means are zero.")
    notes.append(
        "G = G_self + G_class + G_cross + G_within exactly (Papyan 2019, 2020, as his code "
        "splits it): G_class holds the class means (the average of each class's cross means, "
        "rank <= C), G_cross their deviations (rank <= C(C-2)), G_self the same-class means "
        "Papyan neglects; their eigenvalues are exact (small Gram matrices); angles compare the "
        "parts' ranges with the GGN's Ritz vectors, each cosine within error_bound of the exact "
        "one."
    )
    kept = min(k, got)
    ggn_entry = {
        "eigenvalues": res.eigenvalues[:kept].tolist(),
        "residual_norms": res.residual_norms[:kept].tolist(),
        "error_bounds": None if res.error_bounds is None else res.error_bounds[:kept].tolist(),
        "converged": [bool(c) for c in res.converged[:kept]],
        "next_eigenvalue": float(res.eigenvalues[k]) if got > k else None,
        "num_matvecs": int(res.num_matvecs),
    }
    result = ClassesResult(
        **parts,
        ggn=ggn_entry,
        angles=angles,
        notes=notes,
        num_matvecs=int(res.num_matvecs) + C * C,
    )
    if stopped:
        raise Interrupted(result)
    return result
