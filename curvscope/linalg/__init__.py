"""Algorithms that only need ``A @ V``: Lanczos, power iteration, SLQ, traces, CG."""

__all__: list[str] = []
