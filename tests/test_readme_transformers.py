"""Every command of the README's "Transformers" section runs as a user types it.

The block is read from README.md, so the test follows the README. The files the commands name
are made here, tiny: the two `curvscope example` models (their training shortened: the
commands and flags are the README's), a HuggingFace GPT2 folder saved with `save_pretrained`
whose context fits the README's `--block-size 128`, a token file, and a state dict with its
`net.py:build`, `data.py:batches` and `loss.py:my_loss`. Each command must exit 0 and write a
spectrum whose pairs all converged.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from curvscope import _examples
from curvscope.cli import app

README = Path(__file__).resolve().parents[1] / "README.md"
SECTION = README.read_text().split("## Transformers", 1)[1]
BLOCK = re.search(r"```\n(.*?)```", SECTION, flags=re.S).group(1)


def _commands() -> list[list[str]]:
    text = BLOCK.replace("\\\n", " ")
    lines = [ln.split("  #")[0].strip() for ln in text.splitlines()]
    return [shlex.split(ln)[1:] for ln in lines if ln.startswith("curvscope ")]


NET = '''
import torch
from torch import nn


def build():
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
'''
DATA = '''
import torch


def batches():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20, 6, generator=g)
    y = torch.randint(0, 3, (20,), generator=g)
    return [(x[:12], y[:12]), (x[12:], y[12:])]
'''
LOSS = '''
import torch.nn.functional as F


def my_loss(output, target):
    return F.cross_entropy(output, target)
'''


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    transformers = pytest.importorskip("transformers")
    monkeypatch.chdir(tmp_path)
    for name in ("tiny-gpt", "lstm"):  # the README's example commands, trained briefly
        monkeypatch.setitem(_examples._TEXT_SPECS[name], "steps", 30)
    cfg = transformers.GPT2Config(vocab_size=16, n_positions=128, n_embd=8, n_layer=1,
                                  n_head=2, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "my-gpt2")
    ids = np.random.default_rng(0).integers(0, 16, 4000).astype("<u2")
    (tmp_path / "tokens.bin").write_bytes(ids.tobytes())
    (tmp_path / "net.py").write_text(NET)
    (tmp_path / "data.py").write_text(DATA)
    (tmp_path / "loss.py").write_text(LOSS)
    import importlib.util

    spec = importlib.util.spec_from_file_location("readme_net", tmp_path / "net.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    torch.save(mod.build().state_dict(), tmp_path / "model.pt")
    return tmp_path


def test_the_block_has_the_commands_we_expect():
    cmds = _commands()
    assert [c[0] for c in cmds] == ["example", "example", "spectrum", "spectrum", "spectrum"]


def test_every_transformers_command_of_the_readme_runs(workdir):
    for args in _commands():
        res = CliRunner().invoke(app, args)
        assert res.exit_code == 0, (args, res.output[-2000:])
        if args[0] != "spectrum":
            continue
        doc = json.loads((workdir / "curvscope-out" / "spectrum.json").read_text())
        assert doc["results"]["spectra"], args
        for s in doc["results"]["spectra"]:
            assert all(s["converged"]), (args, s["block"], s["residual_norms"])
        if "tokens.bin" in args:  # the README's GPT2 folder command: one shift, all terms
            assert doc["input"]["data"]["num_terms"] == 64 * 128
            assert "t[i+1:i+T+1]" in doc["input"]["data"]["targets"]
