"""HuggingFace model folders (``save_pretrained``: ``config.json`` plus weights) as checkpoints.

Needs the optional extra ``pip install "curvscope[hf]"`` (transformers; it does not replace
torch). The model is built offline from the folder alone (``local_files_only``, no hub), in
eval mode, with attention switched to the ``eager`` implementation: fused attention kernels
(SDPA, flash) have no double backward on every backend, and Hessian products need one.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from .._errors import CheckpointError, arg
from ._checkpoints import LoadedModel
from ._results import file_sha256

__all__ = ["is_hf_folder", "load_hf"]

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def is_hf_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder written by ``save_pretrained`` (it holds ``config.json``)."""
    p = Path(path)
    return p.is_dir() and (p / "config.json").is_file()


def _weight_files(folder: Path) -> list[Path]:
    files = [folder / n for n in WEIGHT_FILES if (folder / n).is_file()]
    for index in WEIGHT_INDEXES:
        ip = folder / index
        if ip.is_file():
            try:
                shards = sorted(set(json.loads(ip.read_text())["weight_map"].values()))
            except (ValueError, KeyError, TypeError):
                raise CheckpointError(f"{ip} is not a readable weight index.") from None
            files += [folder / s for s in shards]
    return files


def load_hf(path: str | os.PathLike) -> LoadedModel:
    """Build the model of a ``save_pretrained`` folder, offline, with eager attention.

    Raises:
        CheckpointError: when transformers is missing, the folder holds no weights, or the
            model cannot be built from it.
    """
    folder = Path(path)
    try:
        import transformers
    except ImportError:
        raise CheckpointError(
            f"{folder} is a HuggingFace model folder; reading it needs the optional extra: "
            'pip install "curvscope[hf]".',
            path=str(folder),
        ) from None
    weights = _weight_files(folder)
    if not weights:
        raise CheckpointError(
            f"HuggingFace folder {folder} has a config.json but no weights "
            f"({', '.join(WEIGHT_FILES)} or a sharded index); save it with save_pretrained.",
            path=str(folder),
        )
    missing = [w for w in weights if not w.is_file()]
    if missing:
        raise CheckpointError(f"HuggingFace folder {folder} lacks the weight shard {missing[0]}.")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the hub
    try:
        config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure reading the config is the file's
        raise CheckpointError(
            f"{folder}/config.json cannot be read by transformers ({str(exc)[:160]})."
        ) from None
    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None:
        cls = transformers.AutoModelForCausalLM
    try:
        model = cls.from_pretrained(folder, attn_implementation="eager", local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - transformers raises many kinds
        first = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise CheckpointError(
            f"HuggingFace folder {folder}: transformers could not build {arch or 'the model'} "
            f"from it ({first}); pass {arg('builder')} to build it yourself.",
            path=str(folder),
        ) from None
    model.eval()
    files = {str(folder / "config.json"): file_sha256(folder / "config.json")}
    files.update({str(w): file_sha256(w) for w in weights})
    digest = hashlib.sha256("".join(files[k] for k in sorted(files)).encode()).hexdigest()
    name = type(model).__name__
    meta: dict = {}
    if name.endswith("ForCausalLM") or name.endswith("LMHeadModel"):
        meta["loss"] = "causal_lm"
    elif name.endswith((
        "ForSequenceClassification", "ForImageClassification", "ForTokenClassification",
        "ForMaskedLM", "ForConditionalGeneration", "ForSeq2SeqLM",
    )):
        # class ids, masked tokens or target tokens in 'labels', -100 where no term
        meta["loss"] = "cross_entropy"
    notes = [
        f"HuggingFace {name} from {folder} (transformers {transformers.__version__}), "
        "attention switched to the eager implementation (double backward)."
    ]
    return LoadedModel(
        model, folder, "huggingface", digest, {"type": name}, meta, notes, files=files
    )
