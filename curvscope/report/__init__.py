"""Figures and the HTML report, rendered from result documents only."""

__all__: list[str] = []
