"""Optimisers whose convergence curvscope analyses."""

__all__: list[str] = []
