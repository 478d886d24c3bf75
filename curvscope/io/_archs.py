"""Built-in architectures, constructed by name from an allow-list (no code from files).

``arch`` (DESIGN.md, checkpoint format ``curvscope/1``) is one of::

    {"type": "mlp", "sizes": [64, 128, 10], "activation": "tanh", "bias": true}
    {"type": "sequential", "layers": [{"type": "Conv2d", "args": {...}}, ...]}

An MLP is an ``nn.Sequential`` of ``Linear`` and activation modules with no activation after
the last ``Linear``, so its module names are ``"0"``, ``"1"``, ``"2"``...
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .._errors import CheckpointError

__all__ = ["ACTIVATIONS", "LAYER_TYPES", "build_arch"]

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "softplus": nn.Softplus,
    "elu": nn.ELU,
    "leaky_relu": nn.LeakyReLU,
    "identity": nn.Identity,
}

LAYER_TYPES: dict[str, type[nn.Module]] = {
    cls.__name__: cls
    for cls in [
        nn.Linear,
        nn.Conv1d,
        nn.Conv2d,
        nn.BatchNorm1d,
        nn.BatchNorm2d,
        nn.LayerNorm,
        nn.ReLU,
        nn.Tanh,
        nn.Sigmoid,
        nn.GELU,
        nn.SiLU,
        nn.Softplus,
        nn.ELU,
        nn.LeakyReLU,
        nn.MaxPool1d,
        nn.MaxPool2d,
        nn.AvgPool1d,
        nn.AvgPool2d,
        nn.AdaptiveAvgPool2d,
        nn.Flatten,
        nn.Dropout,
        nn.Identity,
        nn.LogSoftmax,
        nn.Softmax,
    ]
}


def build_arch(arch: dict[str, Any]) -> nn.Module:
    """Build the module an ``arch`` dict describes.

    Raises:
        CheckpointError: for an unknown type, activation or layer, or bad arguments.
    """
    if not isinstance(arch, dict) or "type" not in arch:
        raise CheckpointError(f"the checkpoint's arch {arch!r} has no 'type'.")
    kind = arch["type"]
    if kind == "mlp":
        sizes = list(arch.get("sizes", []))
        act = str(arch.get("activation", "tanh"))
        if len(sizes) < 2 or not all(isinstance(s, int) and s > 0 for s in sizes):
            raise CheckpointError(f"mlp sizes {sizes!r} must be at least two positive integers.")
        if act not in ACTIVATIONS:
            raise CheckpointError(
                f"mlp activation {act!r} is not known; choose one of {', '.join(ACTIVATIONS)}."
            )
        bias = bool(arch.get("bias", True))
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
            layers.append(nn.Linear(a, b, bias=bias))
            if i < len(sizes) - 2:
                layers.append(ACTIVATIONS[act]())
        return nn.Sequential(*layers)
    if kind == "sequential":
        modules = []
        for i, spec in enumerate(arch.get("layers", [])):
            name = spec.get("type") if isinstance(spec, dict) else None
            if name not in LAYER_TYPES:
                raise CheckpointError(
                    f"layer {i} of the checkpoint's arch has type {name!r}, which is not in the "
                    f"allow-list ({', '.join(LAYER_TYPES)})."
                )
            try:
                modules.append(LAYER_TYPES[name](**dict(spec.get("args", {}))))
            except TypeError as exc:
                raise CheckpointError(f"layer {i} ({name}) has bad arguments: {exc}.") from None
        return nn.Sequential(*modules)
    raise CheckpointError(f"arch type {kind!r} is not known; use 'mlp' or 'sequential'.")
