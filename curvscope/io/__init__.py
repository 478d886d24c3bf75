"""Inputs (checkpoints, data sets) and outputs (result documents)."""

from ._archs import ACTIVATIONS, ARCH_TYPES, LAYER_TYPES, build_arch
from ._checkpoints import (
    CHECKPOINT_FORMAT,
    LoadedModel,
    load_checkpoint,
    save_checkpoint,
    save_safetensors,
)
from ._datasets import BUILTIN_DATASETS, Dataset, check_fits, load_dataset
from ._eigenvectors import (
    EIGENVECTOR_FORMAT,
    canonical_sign,
    load_eigenvectors,
    read_directions,
    save_eigenvectors,
)
from ._hf import is_hf_folder, load_hf
from ._imports import import_callable
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
from ._runs import (
    MARKER,
    RUN_STATES,
    Run,
    active_run,
    current_run,
    new_run_id,
    now_iso,
    read_marker,
    rename_marker,
    run_of,
    set_current_run,
)
from ._steps import STEP_KEYS, checkpoint_step
from ._tokens import TokenBatches, TokenWindows, load_tokens, shipped_text

__all__ = [
    "is_hf_folder",
    "load_hf",
    "shipped_text",
    "import_callable",
    "ACTIVATIONS",
    "ARCH_TYPES",
    "BUILTIN_DATASETS",
    "CHECKPOINT_FORMAT",
    "LAYER_TYPES",
    "Dataset",
    "LoadedModel",
    "STEP_KEYS",
    "build_arch",
    "checkpoint_step",
    "check_fits",
    "load_checkpoint",
    "load_dataset",
    "TokenBatches",
    "TokenWindows",
    "load_tokens",
    "save_checkpoint",
    "save_safetensors",
    "EIGENVECTOR_FORMAT",
    "canonical_sign",
    "read_directions",
    "load_eigenvectors",
    "save_eigenvectors",
    "MARKER",
    "RUN_STATES",
    "Run",
    "active_run",
    "current_run",
    "new_run_id",
    "now_iso",
    "read_marker",
    "rename_marker",
    "run_of",
    "set_current_run",
    "SCHEMA",
    "file_sha256",
    "make_document",
    "read_document",
    "to_jsonable",
    "versions",
    "write_atomic",
    "write_document",
]
