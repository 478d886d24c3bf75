r"""Optimiser states in: the diagonal preconditioner of Adam, AdamW, RMSprop and Adagrad.

Cohen et al. 2022, "Adaptive Gradient Methods at the Edge of Stability" (arXiv 2207.14484):
under an adaptive method the quantity that settles at the stability threshold is not the
sharpness :math:`\lambda_1(H)` but the *preconditioned* sharpness :math:`\lambda_1(P^{-1}H)`,
with :math:`P` the diagonal the optimiser divides the step by. This module reads :math:`P`
and the optimiser's hyper-parameters from a ``torch.optim`` state (a checkpoint, a file, or
a live optimiser); ``curvscope.operators.preconditioned`` builds the operator
:math:`P^{-1/2} A P^{-1/2}` from it (docs/DESIGN.md "Preconditioned sharpness").

What each optimiser divides by (PyTorch 2.x, checked against ``torch.optim`` in
``tests/test_precond.py``):

- Adam, AdamW: :math:`P = \sqrt{\hat v} + \epsilon`, :math:`\hat v = v / (1 - \beta_2^t)` from
  ``exp_avg_sq`` (``max_exp_avg_sq`` with ``amsgrad``) and the parameter's ``step`` :math:`t`;
  threshold :math:`(2 + 2\beta_1) / ((1 - \beta_1)\eta)` (38/η for :math:`\beta_1 = 0.9`).
- RMSprop: :math:`P = \sqrt{s} + \epsilon` from ``square_avg`` (``centered``: minus
  ``grad_avg``²), no bias correction; threshold :math:`2(1+\mu)/\eta` with momentum :math:`\mu`.
- Adagrad: :math:`P = \sqrt{\Sigma g^2} + \epsilon` from ``sum``; the step is
  :math:`\eta_t = \eta / (1 + (t-1)\,\text{lr\_decay})`, threshold :math:`2/\eta_t`.
- SGD has no preconditioner (:math:`P = I`); its threshold :math:`2(1+\mu)/((1-d)\eta)`
  (heavy ball, dampening :math:`d`; none for Nesterov) applies to the raw sharpness.

State entries are numbered in the order of the param groups' ``params`` lists; that order is
mapped onto the model's ``named_parameters()`` order (how ``torch.optim.Adam(model.parameters())``
numbers them), or onto the groups' ``param_names`` when torch recorded them
(``torch.optim.Adam(model.named_parameters())``). A live optimiser is mapped by identity.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .._errors import CheckpointError, OptionError, arg
from ._checkpoints import CHECKPOINT_FORMAT, _kind

__all__ = [
    "OPTIMIZER_KEYS",
    "PRECONDITIONED_OPTIMIZERS",
    "OptimizerGroup",
    "Preconditioner",
    "find_optimizer_state",
    "optimizer_threshold",
    "preconditioner_from_optimizer",
    "preconditioner_from_state",
    "read_preconditioner",
]

OPTIMIZER_KEYS = ("optimizer", "optim", "opt", "optimizer_state_dict")
"""Keys of a checkpoint dict under which the optimiser's ``state_dict()`` is looked for."""

PRECONDITIONED_OPTIMIZERS = ("Adam", "AdamW", "RMSprop", "Adagrad")
"""Optimisers whose diagonal preconditioner is read; SGD gives only its threshold."""

_UNSUPPORTED = {
    "NAdam": "its step mixes two momentum terms",
    "RAdam": "its rectification switches the preconditioner on and off",
    "Adamax": "it divides by an infinity norm (exp_inf), not a square root",
    "Adadelta": "its step is a ratio of two running averages",
}


@dataclass(frozen=True)
class OptimizerGroup:
    """One parameter group: its parameters, hyper-parameters and stability threshold.

    Attributes:
        index: the group's position in ``param_groups``.
        params: names of its parameters.
        lr: its learning rate (Adagrad: the decayed one at the state's step).
        hyper: the other hyper-parameters that matter (``betas``, ``eps``, ``weight_decay``,
            ``momentum``, ``alpha``, ``centered``, ``amsgrad``, ``lr_decay``, ``dampening``,
            ``nesterov``), as recorded.
        threshold: the preconditioned (SGD: raw) sharpness above which the method is
            unstable on a quadratic, or ``None`` where no threshold is known.
        formula: the threshold's formula in words.
    """

    index: int
    params: tuple[str, ...]
    lr: float
    hyper: dict[str, Any]
    threshold: float | None
    formula: str

    def to_dict(self, params: bool = True) -> dict[str, Any]:
        """For the result document (``params=False``: the count of parameters, not names)."""
        return {
            "index": self.index,
            **({"params": list(self.params)} if params else {"num_params": len(self.params)}),
            "lr": self.lr,
            **{k: (list(v) if isinstance(v, tuple) else v) for k, v in self.hyper.items()},
            "threshold": self.threshold,
            "formula": self.formula,
        }


@dataclass(frozen=True)
class Preconditioner:
    r"""The diagonal :math:`P` an optimiser divides its step by, with its hyper-parameters.

    Attributes:
        diagonals: parameter name -> :math:`P` in the parameter's shape (float64, positive),
            for the parameters that have a state; ``None`` for SGD (no preconditioner).
        source: ``checkpoint`` (the model checkpoint's optimiser state), ``file`` (another
            file), ``optimizer`` (a live ``torch.optim`` optimiser).
        optimizer: ``Adam``, ``AdamW``, ``RMSprop``, ``Adagrad``, ``SGD``, or ``None`` for a
            file of diagonals.
        step: the optimiser's step count (the largest over its parameters), or ``None``.
        groups: the parameter groups.
        path: the file read, or ``None``.
        key: the checkpoint key the state was found under, or ``None``.
        notes: sentences for the document.
    """

    diagonals: dict[str, torch.Tensor] | None
    source: str
    optimizer: str | None
    step: int | None
    groups: tuple[OptimizerGroup, ...]
    path: str | None = None
    key: str | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def preconditions(self) -> bool:
        """Whether there is a preconditioner (``False`` for SGD: the identity)."""
        return self.diagonals is not None

    @property
    def thresholds(self) -> list[float | None]:
        """Each group's threshold."""
        return [g.threshold for g in self.groups]

    def diagonal(self, names: Sequence[str]) -> torch.Tensor:
        """The flat diagonal of ``names`` in that order (float64).

        Raises:
            OptionError: for a name without a diagonal, naming it.
        """
        if self.diagonals is None:
            raise OptionError(
                f"a {self.optimizer} state has no preconditioner (its step is not divided by "
                "anything); its threshold applies to the sharpness itself.",
                option="preconditioner",
            )
        missing = [n for n in names if n not in self.diagonals]
        if missing:
            where = f" in {self.path}" if self.path else ""
            raise OptionError(
                f"the preconditioner{where} has no entry for parameter {missing[0]}"
                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                + ": the optimiser state does not cover the parameters analysed.",
                option="preconditioner",
                layer=missing[0],
            )
        return torch.cat([self.diagonals[n].reshape(-1) for n in names])

    @property
    def applies_to(self) -> str:
        """What the thresholds bound: ``preconditioned`` matrices, or the ``raw`` ones (SGD)."""
        return "preconditioned" if self.preconditions else "raw"

    def to_dict(self, params: bool = True) -> dict[str, Any]:
        """The document's record: source, optimiser, step, per-group hyper-parameters.

        Args:
            params: list each group's parameter names (else their count, for track rows).
        """
        lrs = [g.lr for g in self.groups]
        return {
            "source": self.source,
            "path": self.path,
            "key": self.key,
            "optimizer": self.optimizer,
            "preconditioned": self.preconditions,
            "step": self.step,
            "lrs": lrs,
            "betas": _common(g.hyper.get("betas") for g in self.groups),
            "eps": _common(g.hyper.get("eps") for g in self.groups),
            "weight_decay": _common(g.hyper.get("weight_decay") for g in self.groups),
            "thresholds": self.thresholds,
            "threshold_applies_to": self.applies_to,
            "groups": [g.to_dict(params) for g in self.groups],
            "notes": list(self.notes),
        }


def _common(values: Iterable[Any]) -> Any:
    """The one value all groups share, else the list of them."""
    vals = [list(v) if isinstance(v, tuple) else v for v in values]
    if not vals:
        return None
    return vals[0] if all(v == vals[0] for v in vals) else vals


# ---------------------------------------------------------------------------- thresholds
def optimizer_threshold(kind: str, lr: float, hyper: Mapping[str, Any]) -> tuple[float | None, str]:
    r"""The stability threshold of one group, and its formula in words.

    Adam/AdamW :math:`(2+2\beta_1)/((1-\beta_1)\eta)` (Cohen et al. 2022); RMSprop and SGD
    :math:`2(1+\mu)/\eta` (heavy ball; SGD's dampening :math:`d` scales the step by
    :math:`1-d`); Adagrad :math:`2/\eta_t`. Nesterov SGD has none here (``None``).
    """
    if not lr > 0 or not math.isfinite(lr):
        return None, f"no threshold: the learning rate is {lr}"
    if kind in ("Adam", "AdamW"):
        b1 = float(hyper["betas"][0])
        if not 0 <= b1 < 1:
            return None, f"no threshold: beta1 is {b1}"
        return (2 + 2 * b1) / ((1 - b1) * lr), "(2+2 beta1)/((1-beta1) lr), Cohen et al. 2022"
    if kind == "RMSprop":
        mu = float(hyper.get("momentum") or 0.0)
        return 2 * (1 + mu) / lr, "2(1+momentum)/lr (RMSprop, preconditioned heavy ball)"
    if kind == "Adagrad":
        return 2 / lr, "2/lr_t (Adagrad's decayed learning rate)"
    if kind == "SGD":
        if hyper.get("nesterov"):
            return None, "no threshold drawn for Nesterov momentum"
        mu = float(hyper.get("momentum") or 0.0)
        damp = float(hyper.get("dampening") or 0.0) if mu else 0.0
        if not 0 <= mu < 1 or damp >= 1:
            return None, f"no threshold: momentum {mu}, dampening {damp}"
        return 2 * (1 + mu) / ((1 - damp) * lr), "2(1+momentum)/((1-dampening) lr), heavy ball"
    return None, "no threshold"


# ---------------------------------------------------------------------------- kinds
def _optimizer_kind(
    group: Mapping[str, Any], states: Iterable[Mapping[str, Any]], where: str
) -> str:
    """The optimiser a state belongs to, from its groups' and states' keys.

    Raises:
        OptionError: for an optimiser whose preconditioner is not read, or an unknown one.
    """
    gk = set(group)
    sk: set[str] = set()
    for s in states:
        sk |= set(s)
    if "momentum_decay" in gk:
        kind = "NAdam"
    elif "exp_inf" in sk:
        kind = "Adamax"
    elif "acc_delta" in sk or "rho" in gk:
        kind = "Adadelta"
    elif "betas" in gk or "exp_avg_sq" in sk:
        if "amsgrad" not in gk:
            kind = "RAdam"
        else:
            kind = "AdamW" if group.get("decoupled_weight_decay") else "Adam"
    elif "alpha" in gk or "square_avg" in sk:
        kind = "RMSprop"
    elif "lr_decay" in gk or "sum" in sk:
        kind = "Adagrad"
    elif "nesterov" in gk or "dampening" in gk or "momentum_buffer" in sk:
        kind = "SGD"
    else:
        raise OptionError(
            f"{where} is an optimiser state curvscope does not recognise (group keys "
            f"{sorted(gk)[:8]}); a preconditioner is read from Adam, AdamW, RMSprop and Adagrad.",
            option="preconditioner",
        )
    if kind in _UNSUPPORTED:
        raise OptionError(
            f"{where} is a {kind} state, whose preconditioner curvscope does not read "
            f"({_UNSUPPORTED[kind]}); it reads Adam, AdamW, RMSprop and Adagrad (SGD for its "
            "threshold).",
            option="preconditioner",
        )
    return kind


def _step_of(state: Mapping[str, Any]) -> int | None:
    step = state.get("step")
    if step is None:
        return None
    if isinstance(step, torch.Tensor):
        step = step.item()
    return int(step)


def _diagonal(
    kind: str, state: Mapping[str, Any], hyper: Mapping[str, Any], name: str, where: str
) -> torch.Tensor:
    """``P`` of one parameter (float64)."""

    def entry(key: str) -> torch.Tensor:
        if not isinstance(state.get(key), torch.Tensor):
            raise OptionError(
                f"{where}: the {kind} state of parameter {name} has no {key!r} entry "
                f"(it holds {sorted(state)}).",
                option="preconditioner",
                layer=name,
            )
        return state[key].detach().to(device="cpu", dtype=torch.float64)

    eps = float(hyper.get("eps") or 0.0)
    if kind in ("Adam", "AdamW"):
        v = entry("max_exp_avg_sq" if hyper.get("amsgrad") else "exp_avg_sq")
        step = _step_of(state)
        if not step:
            raise OptionError(
                f"{where}: the {kind} state of parameter {name} records no step, so its bias "
                "correction is unknown.",
                option="preconditioner",
                layer=name,
            )
        beta2 = float(hyper["betas"][1])
        p = (v / (1.0 - beta2**step)).sqrt() + eps
    elif kind == "RMSprop":
        v = entry("square_avg")
        if hyper.get("centered"):
            g = entry("grad_avg")
            v = v - g * g
        p = v.clamp_min(0).sqrt() + eps
    else:  # Adagrad
        p = entry("sum").sqrt() + eps
    if not bool((p > 0).all()) or not bool(torch.isfinite(p).all()):
        raise OptionError(
            f"{where}: the {kind} preconditioner of parameter {name} has entries that are zero "
            f"or not finite (eps {eps}): P^-1 does not exist there.",
            option="preconditioner",
            layer=name,
        )
    return p


def _hyper(kind: str, group: Mapping[str, Any]) -> dict[str, Any]:
    keys = {
        "Adam": ("betas", "eps", "weight_decay", "amsgrad"),
        "AdamW": ("betas", "eps", "weight_decay", "amsgrad"),
        "RMSprop": ("alpha", "eps", "weight_decay", "momentum", "centered"),
        "Adagrad": ("eps", "weight_decay", "lr_decay"),
        "SGD": ("momentum", "dampening", "nesterov", "weight_decay"),
    }[kind]
    out = {}
    for k in keys:
        v = group.get(k)
        if isinstance(v, torch.Tensor):
            v = v.tolist()
        out[k] = tuple(float(x) for x in v) if k == "betas" and v is not None else v
    return out


def _lr(group: Mapping[str, Any]) -> float:
    lr = group.get("lr")
    return float(lr.item() if isinstance(lr, torch.Tensor) else lr)


def _build(
    kind: str,
    groups: Sequence[tuple[Mapping[str, Any], Sequence[tuple[str, Mapping[str, Any] | None]]]],
    shapes: Mapping[str, tuple[int, ...]],
    needed: Sequence[str] | None,
    *,
    source: str,
    where: str,
    path: str | None,
    key: str | None,
) -> Preconditioner:
    """The preconditioner from resolved groups ``[(group, [(name, state or None)])]``."""
    diagonals: dict[str, torch.Tensor] | None = {} if kind != "SGD" else None
    steps: list[int] = []
    out_groups = []
    notes: list[str] = []
    for gi, (group, members) in enumerate(groups):
        hyper = _hyper(kind, group)
        group_steps = []
        for name, state in members:
            if state is None or not state:
                continue
            if kind != "SGD":
                for k in ("exp_avg_sq", "square_avg", "sum"):
                    t = state.get(k)
                    if isinstance(t, torch.Tensor) and tuple(t.shape) != tuple(shapes[name]):
                        raise OptionError(
                            f"{where} does not match the model's parameters: the state of "
                            f"{name} has shape {list(t.shape)}, the parameter "
                            f"{list(shapes[name])}.",
                            option="preconditioner",
                            layer=name,
                        )
                diagonals[name] = _diagonal(kind, state, hyper, name, where).reshape(shapes[name])
            s = _step_of(state)
            if s is not None:
                group_steps.append(s)
        steps += group_steps
        lr = _lr(group)
        if kind == "Adagrad" and group_steps:
            lr = lr / (1 + (max(group_steps) - 1) * float(hyper.get("lr_decay") or 0.0))
        threshold, formula = optimizer_threshold(kind, lr, hyper)
        out_groups.append(
            OptimizerGroup(gi, tuple(n for n, _ in members), lr, hyper, threshold, formula)
        )
        wd = float(hyper.get("weight_decay") or 0.0)
        if wd and kind in ("Adam", "RMSprop", "Adagrad", "SGD"):
            notes.append(
                f"{kind} adds weight_decay {wd:g} times the weights to the gradient (group "
                f"{gi}): the matrix its step sees is the Hessian plus {wd:g} I; analyse with "
                f"that weight decay ({wd:g}) to include it."
            )
        elif wd and kind == "AdamW":
            notes.append(
                f"AdamW's decoupled weight decay (group {gi}) shrinks the weights by lr x "
                f"{wd:g} = {lr * wd:.3g} per step outside the preconditioner; the threshold "
                "leaves it out."
            )
    if needed is not None and diagonals is not None:
        missing = [n for n in needed if n not in diagonals]
        if missing:
            raise OptionError(
                f"{where} has no optimiser state for parameter {missing[0]}"
                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                + ": the optimiser has not stepped it, or the state belongs to other "
                "parameters.",
                option="preconditioner",
                layer=missing[0],
                missing="state",
            )
    if diagonals is not None and not diagonals:
        raise OptionError(
            f"{where} holds no per-parameter state yet (the optimiser has taken no step).",
            option="preconditioner",
            missing="state",
        )
    if len(set(steps)) > 1:
        notes.append(
            f"the parameters' step counts differ ({min(steps)} to {max(steps)}); each "
            "parameter's bias correction uses its own."
        )
    if len({g.threshold for g in out_groups}) > 1:
        notes.append(
            "the parameter groups have different thresholds (learning rates or betas differ): "
            "figures draw one line per group."
        )
    return Preconditioner(
        diagonals,
        source,
        kind,
        max(steps) if steps else None,
        tuple(out_groups),
        path=path,
        key=key,
        notes=tuple(dict.fromkeys(notes)),
    )


# ---------------------------------------------------------------------------- states
def _is_optimizer_state(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and isinstance(obj.get("state"), Mapping)
        and isinstance(obj.get("param_groups"), (list, tuple))
    )


def preconditioner_from_state(
    state_dict: Mapping[str, Any],
    named_shapes: Sequence[tuple[str, Sequence[int]]],
    *,
    needed: Sequence[str] | None = None,
    source: str = "file",
    path: str | Path | None = None,
    key: str | None = None,
) -> Preconditioner:
    """The preconditioner an optimiser's ``state_dict()`` describes, for a model's parameters.

    Args:
        state_dict: ``opt.state_dict()``.
        named_shapes: the model's ``(name, shape)`` in ``named_parameters()`` order.
        needed: parameters that must have a state (default: all of them).
        source: recorded as the source (``checkpoint`` or ``file``).
        path: the file it came from (for messages and the record).
        key: the key it was found under.

    Raises:
        OptionError: when the state does not match the parameters (their count, a shape, a
            parameter without state, names the model lacks), or belongs to an optimiser
            whose preconditioner is not read; one sentence naming what is missing.
    """
    where = f"the optimiser state of {path}" if path else "the optimiser state"
    if key:
        where += f" (key {key!r})"
    shapes = {n: tuple(int(s) for s in shape) for n, shape in named_shapes}
    names = list(shapes)
    groups = list(state_dict["param_groups"])
    states = state_dict["state"]
    if not groups:
        raise OptionError(f"{where} has no param groups.", option="preconditioner")
    ids = [i for g in groups for i in g.get("params", [])]
    recorded = [n for g in groups for n in (g.get("param_names") or [])]
    if recorded and len(recorded) == len(ids):
        unknown = [n for n in recorded if n not in shapes]
        if unknown:
            raise OptionError(
                f"{where} does not match the model's parameters: it names {unknown[0]}, which "
                "the model does not have.",
                option="preconditioner",
                layer=unknown[0],
            )
        name_of = dict(zip(ids, recorded, strict=True))
    else:
        if len(ids) != len(names):
            raise OptionError(
                f"{where} does not match the model's parameters: its param groups hold "
                f"{len(ids)} parameters, the model {len(names)} (an optimiser made for a subset "
                "of them cannot be mapped by position; build it from model.named_parameters() "
                "so that torch records the names).",
                option="preconditioner",
            )
        name_of = dict(zip(ids, names, strict=True))

    def state_of(i: Any) -> Mapping[str, Any] | None:
        s = states.get(i)
        if s is None:
            s = states.get(str(i))
        return s

    kind = _optimizer_kind(groups[0], [s for s in states.values() if isinstance(s, Mapping)], where)
    resolved = [(g, [(name_of[i], state_of(i)) for i in g.get("params", [])]) for g in groups]
    return _build(
        kind,
        resolved,
        shapes,
        names if needed is None else needed,
        source=source,
        where=where,
        path=None if path is None else str(path),
        key=key,
    )


def preconditioner_from_optimizer(
    optimizer: torch.optim.Optimizer,
    model: torch.nn.Module,
    *,
    needed: Sequence[str] | None = None,
) -> Preconditioner:
    """The preconditioner of a live ``torch.optim`` optimiser, read without touching it.

    Parameters are mapped to the model's names by identity.

    Raises:
        OptionError: for a parameter of the optimiser that is not the model's, an optimiser
            whose preconditioner is not read, or (``missing="state"``) one that has taken no
            step yet.
    """
    names = {id(p): n for n, p in model.named_parameters()}
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    resolved = []
    for g in optimizer.param_groups:
        members = []
        for p in g["params"]:
            if id(p) not in names:
                raise OptionError(
                    f"{arg('optimizer')} holds a parameter of shape {list(p.shape)} that is "
                    "not one of the model's: give the optimiser of this model.",
                    option="optimizer",
                )
            members.append((names[id(p)], optimizer.state.get(p)))
        resolved.append((g, members))
    states = [s for s in optimizer.state.values() if isinstance(s, Mapping)]
    kind = _optimizer_kind(optimizer.param_groups[0], states, f"{arg('optimizer')}")
    if kind != "SGD" and not states:
        raise OptionError(
            f"{arg('optimizer')} has taken no step yet, so it has no second moment to "
            "precondition with.",
            option="optimizer",
            missing="state",
        )
    return _build(
        kind,
        resolved,
        shapes,
        needed,
        source="optimizer",
        where=f"{arg('optimizer')} ({type(optimizer).__name__})",
        path=None,
        key=None,
    )


def _load(path: Path) -> Any:
    if not path.is_file():
        raise OptionError(f"preconditioner file {path} does not exist.", path=str(path))
    kind = _kind(path)
    if kind not in ("zip", "pickle"):
        raise OptionError(
            f"{path} is not a torch.save file; a preconditioner is read from a checkpoint "
            "with an optimiser state, an opt.state_dict() file or a dict of diagonals.",
            path=str(path),
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=kind == "zip")
    except Exception as exc:  # noqa: BLE001 - a damaged or pickled file: one sentence
        raise CheckpointError(
            f"{path} cannot be read as a weights-only torch file "
            f"({str(exc).splitlines()[0][:160]}).",
            path=str(path),
        ) from None


def find_optimizer_state(
    obj: Any, path: str | Path, optimizer_key: str | None = None
) -> tuple[Mapping[str, Any], str | None]:
    """The optimiser ``state_dict()`` inside a loaded checkpoint, and the key it was under.

    Looked for: the object itself (a bare ``opt.state_dict()``), ``optimizer_key`` when given,
    else the first of :data:`OPTIMIZER_KEYS` that holds one.

    Raises:
        CheckpointError: when there is none, naming the keys found.
    """
    if _is_optimizer_state(obj):
        return obj, None
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"{path} holds a {type(obj).__name__}, not a checkpoint with an optimiser state.",
            path=str(path),
        )
    if optimizer_key is not None:
        if optimizer_key not in obj:
            raise CheckpointError(
                f"{path} has no key {optimizer_key!r} ({arg('optimizer_key')}); its keys are "
                f"{', '.join(repr(k) for k in list(obj)[:10])}.",
                path=str(path),
            )
        if not _is_optimizer_state(obj[optimizer_key]):
            raise CheckpointError(
                f"{path} holds no optimiser state under {optimizer_key!r} (an optimiser's "
                "state_dict() has 'state' and 'param_groups').",
                path=str(path),
            )
        return obj[optimizer_key], optimizer_key
    for k in OPTIMIZER_KEYS:
        if _is_optimizer_state(obj.get(k)):
            return obj[k], k
    keys = ", ".join(repr(k) for k in list(obj)[:10]) or "none"
    fmt = (
        " (a curvscope checkpoint saved without optimizer=)"
        if obj.get("format") == CHECKPOINT_FORMAT
        else ""
    )
    raise CheckpointError(
        f"{path} holds no optimiser state{fmt}: none of the keys {', '.join(OPTIMIZER_KEYS)} "
        f"holds an optimiser's state_dict() (its keys are {keys}); save opt.state_dict() with "
        f"the model, or name its key with {arg('optimizer_key')}.",
        path=str(path),
        missing="optimizer",
    )


def _diagonals_file(
    obj: Mapping[str, Any],
    path: Path,
    shapes: Mapping[str, tuple[int, ...]],
    needed: Sequence[str],
) -> Preconditioner:
    missing = [n for n in needed if n not in obj]
    if missing:
        raise OptionError(
            f"{path} holds no diagonal for parameter {missing[0]}"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            + "; a file of diagonals maps every parameter name to a tensor of its shape.",
            path=str(path),
            layer=missing[0],
        )
    diagonals = {}
    for n in needed:
        t = obj[n]
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(shapes[n]):
            got = list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise OptionError(
                f"{path}: the diagonal of {n} is {got}, not a tensor of the parameter's shape "
                f"{list(shapes[n])}.",
                path=str(path),
                layer=n,
            )
        t = t.detach().to(torch.float64)
        if not bool((t > 0).all()) or not bool(torch.isfinite(t).all()):
            raise OptionError(
                f"{path}: the diagonal of {n} has entries that are not positive and finite.",
                path=str(path),
                layer=n,
            )
        diagonals[n] = t
    return Preconditioner(diagonals, "file", None, None, (), path=str(path))


def read_preconditioner(
    path: str | Path,
    named_shapes: Sequence[tuple[str, Sequence[int]]],
    *,
    optimizer_key: str | None = None,
    needed: Sequence[str] | None = None,
    source: str = "file",
    diagonals: bool = True,
) -> Preconditioner:
    """The preconditioner a file holds, for a model's parameters.

    The file is a checkpoint with the optimiser's ``state_dict()`` under one of
    :data:`OPTIMIZER_KEYS` (or ``optimizer_key``), a bare ``opt.state_dict()``, or, with
    ``diagonals``, a dict parameter name -> tensor holding :math:`P` itself.

    Args:
        path: the file.
        named_shapes: the model's ``(name, shape)`` in ``named_parameters()`` order.
        optimizer_key: the key of the optimiser state in a checkpoint dict.
        needed: parameters that must be covered (default: all).
        source: ``checkpoint`` (the model's own checkpoint) or ``file``.
        diagonals: accept a dict of diagonals (not for the model's checkpoint, whose state
            dict would read as one).

    Raises:
        CheckpointError: a file that cannot be read, or holds no optimiser state.
        OptionError: a state or diagonals that do not match the parameters.
    """
    path = Path(path)
    obj = _load(path)
    shapes = {n: tuple(int(s) for s in shape) for n, shape in named_shapes}
    want = list(shapes) if needed is None else list(needed)
    if (
        diagonals
        and optimizer_key is None
        and isinstance(obj, Mapping)
        and not _is_optimizer_state(obj)
        and obj
        and all(isinstance(v, torch.Tensor) for v in obj.values())
        and not any(_is_optimizer_state(obj.get(k)) for k in OPTIMIZER_KEYS)
    ):
        return _diagonals_file(obj, path, shapes, want)
    state, key = find_optimizer_state(obj, path, optimizer_key)
    return preconditioner_from_state(
        state, list(shapes.items()), needed=want, source=source, path=path, key=key
    )
