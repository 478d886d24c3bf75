"""Inputs (checkpoints, data sets) and outputs (result documents)."""

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
    "SCHEMA",
    "file_sha256",
    "make_document",
    "read_document",
    "to_jsonable",
    "versions",
    "write_atomic",
    "write_document",
]
