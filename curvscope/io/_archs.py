"""Built-in architectures, constructed by name from an allow-list (no code from files).

``arch`` (docs/DESIGN.md "Checkpoint format", ``curvscope/1``) is one of::

    {"type": "mlp", "sizes": [64, 128, 10], "activation": "tanh", "bias": true}
    {"type": "sequential", "layers": [{"type": "Conv2d", "args": {...}}, ...]}
    {"type": "tiny-gpt", "vocab_size": 65, "block_size": 64, "n_layer": 2, "n_head": 4,
     "n_embd": 64}
    {"type": "char-lstm", "vocab_size": 65, "n_embd": 64, "hidden": 128, "num_layers": 1}

An MLP is an ``nn.Sequential`` of ``Linear`` and activation modules with no activation after
the last ``Linear``, so its module names are ``"0"``, ``"1"``, ``"2"``... The two sequence
models are :class:`curvscope.models.TinyGPT` and :class:`curvscope.models.CharLSTM`; they take
token ids ``[B, T]`` and return logits ``[B, T, vocab_size]``.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .._errors import CheckpointError
from ..models import CharLSTM, TinyGPT

__all__ = ["ACTIVATIONS", "ARCH_TYPES", "LAYER_TYPES", "build_arch"]

# Sequence models: arch type -> (class, its integer arguments in order).
_SEQUENCE_MODELS: dict[str, tuple[type[nn.Module], tuple[str, ...]]] = {
    "tiny-gpt": (TinyGPT, ("vocab_size", "block_size", "n_layer", "n_head", "n_embd")),
    "char-lstm": (CharLSTM, ("vocab_size", "n_embd", "hidden", "num_layers")),
}
ARCH_TYPES = ("mlp", "sequential", *_SEQUENCE_MODELS)

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
    if kind in _SEQUENCE_MODELS:
        return _build_sequence_model(kind, arch)
    raise CheckpointError(
        f"arch type {kind!r} is not known; use one of {', '.join(map(repr, ARCH_TYPES))}."
    )


def _build_sequence_model(kind: str, arch: dict[str, Any]) -> nn.Module:
    cls, names = _SEQUENCE_MODELS[kind]
    missing = [n for n in names if n not in arch]
    if missing:
        raise CheckpointError(
            f"the checkpoint's {kind} arch lacks {', '.join(map(repr, missing))}; it needs "
            f"{', '.join(map(repr, names))}."
        )
    args = {}
    for n in names:
        v = arch[n]
        # bool is an int subclass: True would build a one-unit model without complaint.
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise CheckpointError(
                f"the checkpoint's {kind} arch has {n} = {v!r}; it must be a positive integer."
            )
        args[n] = v
    if kind == "tiny-gpt" and args["n_embd"] % args["n_head"]:
        raise CheckpointError(
            f"the checkpoint's tiny-gpt arch has n_embd = {args['n_embd']}, which is not "
            f"divisible by n_head = {args['n_head']}; each head needs an equal share."
        )
    return cls(**args)
