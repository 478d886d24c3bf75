"""curvscope: a curvature microscope for trained PyTorch models.

The library the command line is built on, flat::

    import curvscope as cs

    prob = cs.load("model.pt", "data.npz")          # checkpoint + data -> Problem
    H = cs.hessian(prob)                             # operators: hessian, ggn, fisher, ...
    top = cs.lanczos(H, top=5)                       # extreme eigenpairs with residuals
    res = cs.spectrum({"H": H, "H+1e-3I": H + 1e-3 * cs.identity_like(H)}, top=3)
    doc = cs.document(res, prob)                     # the result document the CLI writes

Names are imported on first use, so ``import curvscope`` (and ``curvscope --version``) stays
fast and does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.2.0"

# name -> (module, attribute); resolved lazily by __getattr__ (PEP 562)
_API: dict[str, tuple[str, str]] = {
    # errors
    "CurvscopeError": ("._errors", "CurvscopeError"),
    "CheckpointError": ("._errors", "CheckpointError"),
    "DataError": ("._errors", "DataError"),
    "DeterminismError": ("._errors", "DeterminismError"),
    "Interrupted": ("._errors", "Interrupted"),
    "NonFiniteError": ("._errors", "NonFiniteError"),
    "OptionError": ("._errors", "OptionError"),
    "UnsupportedModelError": ("._errors", "UnsupportedModelError"),
    # problems and loading
    "Problem": (".problem", "Problem"),
    "Group": ("._distributed", "Group"),
    "load": ("._load", "load"),
    "load_like": ("._load", "load_like"),
    "get_loss": ("._losses", "get_loss"),
    # operators
    "LinearOperator": (".linalg", "LinearOperator"),
    "as_operator": (".linalg", "as_operator"),
    "identity_like": (".linalg", "identity_like"),
    "CurvatureOperator": (".operators", "CurvatureOperator"),
    "MATRICES": (".operators", "MATRICES"),
    "make_operator": (".operators", "make_operator"),
    "hessian": ("._api", "hessian"),
    "ggn": ("._api", "ggn"),
    "fisher": ("._api", "fisher"),
    "empirical_fisher": ("._api", "empirical_fisher"),
    "pch": ("._api", "pch"),
    "kfac": ("._api", "kfac"),
    "ekfac": ("._api", "ekfac"),
    "preconditioned": (".operators", "preconditioned"),
    "preconditioner": ("._api", "preconditioner"),
    # algorithms
    "lanczos": ("._api", "lanczos"),
    "power_iteration": (".linalg", "power_iteration"),
    "slq": (".linalg", "slq"),
    "spectral_density": (".linalg", "spectral_density"),
    "hutchinson": (".linalg", "hutchinson_trace"),
    "hutchpp": (".linalg", "hutchpp_trace"),
    "exact_trace": (".linalg", "exact_trace"),
    "cg": (".linalg", "cg"),
    "minres": (".linalg", "minres"),
    # diagnostics
    "spectrum": (".diagnostics", "spectrum"),
    "density": (".diagnostics", "density"),
    "compare": (".diagnostics", "compare"),
    "check": (".diagnostics", "check"),
    "surface": ("._api", "surface"),
    "gradient_overlap": (".diagnostics", "gradient_overlap"),
    "classes": (".diagnostics", "classes"),
    "class_structure": (".operators", "class_structure"),
    # solvers
    "run_solver": (".solvers", "run_solver"),
    # documents and reports
    "document": ("._api", "document"),
    "write_document": (".io", "write_document"),
    "read_document": (".io", "read_document"),
    "run_report": (".app", "run_report"),
    "track": (".app", "track"),
    "diff_documents": (".app", "diff_documents"),
    "Tracker": (".app", "Tracker"),
    "stability_threshold": (".app", "stability_threshold"),
}

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name in _API:
        module, attr = _API[name]
        value = getattr(importlib.import_module(module, __name__), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'curvscope' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
