"""Parameter selection and layout: which parameters, where they lie in the flat vector.

Owns the selection by globs or dict (``params``), the flat layout (names, shapes, offsets),
the blocks (modules, parameters, groups), and flatten/unflatten between the two.
"""

from __future__ import annotations

import fnmatch
from typing import TypeVar

import torch
from torch import nn

from .._errors import OptionError, arg

P = TypeVar("P", bound="Parameters")


class Parameters:
    """The selected parameters of a problem and their flat layout."""

    @staticmethod
    def _select(params, model: nn.Module) -> dict[str, torch.Tensor]:
        named = dict(model.named_parameters())
        if isinstance(params, dict):
            unknown = [n for n in params if n not in named]
            if unknown:
                raise OptionError(
                    f"{arg('params')}: {unknown} are not parameters of the model.",
                    option="params",
                )
            chosen = [n for n in named if n in params]
        elif params is None:
            chosen = list(named)
        else:
            globs = [params] if isinstance(params, str) else list(params)
            globs = [g.strip() for pat in globs for g in pat.split(",") if g.strip()]
            chosen = [n for n in named if any(fnmatch.fnmatchcase(n, g) for g in globs)]
            if not chosen:
                shown = ", ".join(list(named)[:20]) + (" ..." if len(named) > 20 else "")
                raise OptionError(
                    f"{arg('params')} {','.join(globs)!r} matches no parameter; the model has "
                    f"{shown}.",
                    option="params",
                )
        if not chosen:
            raise OptionError(f"{arg('params')} selects no parameter of the model.")
        return {n: named[n].detach() for n in chosen}

    def _set_params(self, params: dict[str, torch.Tensor]) -> None:
        self.params = params
        self.names = list(params)
        self.shapes = [tuple(p.shape) for p in params.values()]
        self.numels = [p.numel() for p in params.values()]
        offsets = [0]
        for n in self.numels:
            offsets.append(offsets[-1] + n)
        self.offsets = offsets
        self.num_params = offsets[-1]
        first = next(iter(params.values()))
        self.dtype = first.dtype
        self.device = first.device

    def select(self: P, params: None | str | list[str]) -> P:
        """A problem over the same model, loss and data with another parameter selection.

        The new problem shares the data and the sample count; no pass over the data is made.
        """
        self._refuse_sharded("parameter blocks (Problem.select)")  # type: ignore[attr-defined]
        new = self._copy()
        new._set_params(self._select(params, self.model))
        return new

    def param_slices(self) -> dict[str, slice]:
        """Where each selected parameter lies in the flat vector."""
        return {n: slice(self.offsets[i], self.offsets[i + 1]) for i, n in enumerate(self.names)}

    def module_blocks(self) -> dict[str, list[str]]:
        """Selected parameter names grouped by the module that owns them (per-layer blocks).

        Module names are those of ``named_modules()`` (``transformer.h.0.attn``...); only
        modules that own a selected parameter directly appear, in ``named_parameters()`` order.
        """
        blocks: dict[str, list[str]] = {}
        for name in self.names:
            module = name.rpartition(".")[0]
            blocks.setdefault(module, []).append(name)
        return blocks

    def block_names(self) -> list[str]:
        """Every named block: modules, then parameters, then groups."""
        modules = list(self.module_blocks())
        return modules + [n for n in self.names if n not in modules] + list(self.groups)

    def block_param_names(self, block: str) -> list[str]:
        """Parameter names of a block: ``"all"``, a module, a parameter or a group name.

        Raises:
            OptionError: when no selected parameter belongs to ``block``, listing valid names.
        """
        if block == "all":
            return list(self.names)
        if block in self.params:
            return [block]
        modules = self.module_blocks()
        if block in modules:
            return modules[block]
        if block in getattr(self, "groups", {}):
            globs = self.groups[block]
            chosen = [n for n in self.names if any(fnmatch.fnmatchcase(n, g) for g in globs)]
            if not chosen:
                raise OptionError(
                    f"group {block!r} ({', '.join(globs)}) matches no selected parameter.",
                    option="group",
                )
            return chosen
        valid = ["all", *self.block_names()]
        shown = ", ".join(valid[:30]) + (" ..." if len(valid) > 30 else "")
        raise OptionError(
            f"block {block!r} does not exist; valid blocks: {shown}.", option="blocks", block=block
        )

    def flatten(self, tensors: dict[str, torch.Tensor] | list[torch.Tensor]) -> torch.Tensor:
        """Concatenate per-parameter tensors into one flat vector (selected-parameter order)."""
        parts = tensors.values() if isinstance(tensors, dict) else tensors
        return torch.cat([t.reshape(-1) for t in parts])

    def unflatten(self, vec: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split a flat vector ``[P]`` (or columns ``[P, k]`` -> ``[k, *shape]``) per parameter."""
        if vec.shape[0] != self.num_params:
            raise OptionError(
                f"a vector of length {vec.shape[0]} does not fit the {self.num_params} "
                "selected parameters."
            )
        out = {}
        for i, (name, shape) in enumerate(zip(self.names, self.shapes, strict=True)):
            piece = vec[self.offsets[i] : self.offsets[i + 1]]
            if vec.dim() == 1:
                out[name] = piece.reshape(shape)
            else:
                out[name] = piece.T.reshape(vec.shape[1], *shape)
        return out

    def param_vector(self) -> torch.Tensor:
        """A flat copy of the selected parameters' current values."""
        return self.flatten(self.params).clone()

    def params_at(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Parameter dict with values from the flat vector ``flat``."""
        return self.unflatten(flat)
