"""Inputs (checkpoints, data sets) and outputs (result documents)."""

from ._eigenvectors import (
    EIGENVECTOR_FORMAT,
    canonical_sign,
    load_eigenvectors,
    save_eigenvectors,
)
from ._results import (
    SCHEMA,
    file_sha256,
    make_document,
    read_document,
    to_jsonable,
    versions,
    write_atomic,
    write_document,
)

__all__ = [
    "EIGENVECTOR_FORMAT",
    "canonical_sign",
    "load_eigenvectors",
    "save_eigenvectors",
    "SCHEMA",
    "file_sha256",
    "make_document",
    "read_document",
    "to_jsonable",
    "versions",
    "write_atomic",
    "write_document",
]
