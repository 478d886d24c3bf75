"""Seconds of curvature products as they happen, for plans that must hold (the report's budget).

While a :class:`ProductMeter` is installed on a problem (:meth:`Problem.metered`), every
outermost product of a :class:`~curvscope.operators.CurvatureOperator` on that problem or any
view of it (blocks, subsets, dtype copies) is recorded: the matrix, dtype, size, columns,
seconds, data passes it made and whether it was the operator's first product (a Hessian's
first product also builds the first-order graphs later products reuse, so it costs more).
Nothing is recorded, and nothing costs, when no meter is installed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["Product", "ProductMeter"]


@dataclass(frozen=True)
class Product:
    """One timed product: ``columns`` products of an ``dim x dim`` matrix in ``seconds``."""

    matrix: str
    dtype: str
    dim: int
    columns: int
    seconds: float
    passes: int
    first: bool


@dataclass
class ProductMeter:
    """The products taken while installed (nested products count once, in the outer one)."""

    products: list[Product] = field(default_factory=list)
    depth: int = 0

    def record(self, product: Product) -> None:
        self.products.append(product)

    def since(self, start: int) -> list[Product]:
        """The products recorded after the first ``start``."""
        return self.products[start:]
