"""Every command honours the shared flags it accepts, or refuses them in one sentence.

Options are declared once (``curvscope._options.OPTIONS``): the typer options, the keyword
arguments of ``cs.load`` and the document's ``settings`` derive from that table. Each command
runs here on a tiny checkpoint with non-default values of the shared flags that change what a
run does, and its document must show each value, and its effect where the document has one
(the input's dtype, batch size, weight decay and seed; the threads that ran).
"""

from __future__ import annotations

import inspect
import json

import pytest
import torch
from typer.testing import CliRunner

import curvscope as cs
from curvscope._options import LOAD_OPTIONS, OPTIONS
from curvscope.cli import app

from .test_cli_spectrum import tiny  # noqa: F401 - the fixture

FLAGS = {
    "--threads": ("threads", "1", 1),
    "--seed": ("seed", "3", 3),
    "--dtype": ("dtype", "float64", "float64"),
    "--batch-size": ("batch_size", "7", 7),
    "--weight-decay": ("weight_decay", "0.001", 0.001),
    "--tol": ("tol", "1e-05", 1e-05),
    "--hvp-cache": ("hvp_cache", "off", "off"),
    "--basis-device": ("basis_device", "cpu", "cpu"),
}
COMMANDS = {
    "spectrum": ["--top", "1", "--bottom", "0"],
    "density": ["--probes", "3"],
    "check": [],
    "compare": ["--matrix", "ggn"],
    "surface": ["--dims", "1", "--steps", "3"],
    "solve": ["--solver", "gd", "--max-iter", "2"],
    "track": ["--top", "1"],
    "classes": ["--top", "2"],
    "report": ["--preset", "quick", "--budget-s", "30"],
}


def _args():
    out = []
    for flag, (_, value, _) in FLAGS.items():
        out += [flag, value]
    return out


@pytest.mark.parametrize("command", list(COMMANDS))
def test_each_command_honours_the_shared_flags(command, tiny, tmp_path):  # noqa: F811
    before = torch.get_num_threads()
    try:
        extra = list(COMMANDS[command])
        if command == "solve":
            extra = [a for a in extra if a != "--max-iter" and a != "2"] + ["--max-iter", "2"]
        res = CliRunner().invoke(
            app, [command, str(tiny / "model.pt"), *_args(), *extra, "--out", str(tmp_path)]
        )
    finally:
        torch.set_num_threads(before)
    assert res.exit_code == 0, res.output[-2000:]
    # the report writes the documents of its parts; the spectrum's stands for them
    name = "spectrum" if command == "report" else command
    doc = json.loads((tmp_path / f"{name}.json").read_text())
    for flag, (name, _, value) in FLAGS.items():
        assert doc["settings"][name] == value, (command, flag, doc["settings"].get(name))
    inp = doc["input"]
    assert inp["dtype"] == "float64"
    assert inp["data"]["batch_size"] == 7
    assert inp["weight_decay"] == 0.001
    assert inp["seed"] == 3


def test_track_refuses_max_memory_in_one_sentence(tiny, tmp_path):  # noqa: F811
    res = CliRunner().invoke(app, ["track", str(tiny / "model.pt"), "--max-memory", "8GB",
                                   "--out", str(tmp_path / "t")])
    assert res.exit_code == 1
    assert "--max-memory is not taken by track" in " ".join(res.output.split())
    assert "Traceback" not in res.output


def test_load_takes_the_options_under_their_flag_names(tiny):  # noqa: F811
    """cs.load's keywords are the shared options marked ``load``, named as the flags."""
    params = inspect.signature(cs.load).parameters
    for name in LOAD_OPTIONS:
        known = name in params or name in {"x_key", "y_key", "label_column", "split",
                                            "input_shape", "scale", "normalize",
                                            "block_size", "token_dtype"}
        assert known, name
    assert {o.flag.split("/")[0].lstrip("-").replace("-", "_") for o in OPTIONS} == {
        o.name for o in OPTIONS
    }
    # the builder is model=, as --model: a state dict with its builder loads
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))
    torch.save(net.state_dict(), tiny / "plain.pt")
    (tiny / "net.py").write_text(
        "from torch import nn\n\n\ndef build():\n"
        "    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))\n"
    )
    prob = cs.load(tiny / "plain.pt", tiny / "data.npz", model=f"{tiny / 'net.py'}:build",
                   loss="cross_entropy", group="first=0.*;last=2.*", hvp_cache="off",
                   forward_kwargs={})
    assert prob.num_params == 51
    assert set(prob.groups) == {"first", "last"}
    assert prob.graph_cache == 0.0
    # the names of earlier versions still work
    old = cs.load(tiny / "plain.pt", tiny / "data.npz", builder=f"{tiny / 'net.py'}:build",
                  loss="cross_entropy", groups={"first": ["0.*"]}, graph_cache=0)
    assert set(old.groups) == {"first"}


def test_problem_takes_a_loss_callable_as_load_does():
    """cs.Problem(model, fn, data) with fn(output, target), as cs.load(..., loss=fn)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(5, 3, generator=g), torch.randint(0, 2, (5,), generator=g)),
            (torch.randn(3, 3, generator=g), torch.randint(0, 2, (3,), generator=g))]

    def my_loss(out, target):
        return torch.nn.functional.cross_entropy(out, target)

    own = cs.Problem(net, my_loss, data)
    ref = cs.Problem(net, "cross_entropy", data)
    assert own.loss_name == "my_loss"
    assert torch.allclose(own.loss(), ref.loss(), rtol=1e-6)
    v = torch.randn(own.num_params, generator=g)
    assert torch.allclose(cs.hessian(own) @ v, cs.hessian(ref) @ v, rtol=1e-5, atol=1e-7)
    assert torch.allclose(cs.load(net, data, loss=my_loss).loss(), ref.loss(), rtol=1e-6)
