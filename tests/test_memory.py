"""The memory policy: an estimate before any product, a refusal over --max-memory."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from curvscope import OptionError, Problem
from curvscope.app import estimate_memory, parse_memory, refuse_if_too_large
from curvscope.app._memory import activation_bytes, largest_graph_bytes
from curvscope.cli import app
from curvscope.linalg._restarted import RESTART_BLOCK
from curvscope.operators import graph_account

from .test_cli_spectrum import tiny  # noqa: F401  (fixture)


def _problem(batch: int, width: int = 32) -> Problem:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4 * batch, 10, generator=g)
    y = torch.randint(0, 3, (4 * batch,), generator=g)
    model = nn.Sequential(nn.Linear(10, width), nn.Tanh(), nn.Linear(width, 3))
    data = [(x[i : i + batch], y[i : i + batch]) for i in range(0, 4 * batch, batch)]
    return Problem(model, "cross_entropy", data)


def test_activations_are_measured_and_grow_with_the_batch():
    small, large = activation_bytes(_problem(64)), activation_bytes(_problem(256))
    # what the forward saves: the input of the first layer and the tanh output at least
    assert small >= 64 * (10 + 32) * 4
    assert 3.5 <= large / small <= 4.5


def test_measuring_is_not_counted_as_a_pass():
    p = _problem(16)
    before = (p.data_passes, p.work_done)
    activation_bytes(p)
    assert (p.data_passes, p.work_done) == before


def test_estimate_parts_and_basis_off_the_device():
    p = _problem(16)
    est = estimate_memory(p, matrices=["hessian"], vectors=4, basis=30)
    P = p.num_params
    # 31 columns (the next vector too); a basis smaller than P restarts: the kept Ritz
    # vectors are formed a block of rows at a time beside it (here the block is all rows)
    assert est.parts["Lanczos basis"] == pytest.approx(31 * P * 4 + min(RESTART_BLOCK, 30 * P * 4))
    assert est.parts["vectors"] == (4 + 6) * P * 4
    # a Hessian product over kept graphs holds three forwards' activations or one first-order
    # graph, whichever is more; a streamed one two graphs where those are more (here: the
    # graph is 1.8 forwards)
    graph = largest_graph_bytes(p)
    assert graph > 1.5 * activation_bytes(p)
    assert est.parts["activations"] == max(3 * activation_bytes(p), graph)
    graph_account(p).budget = 0
    streamed = estimate_memory(p, matrices=["hessian"], vectors=4, basis=30)
    assert "kept graphs" not in streamed.parts
    assert streamed.parts["activations"] == max(3 * activation_bytes(p), 2 * graph)
    graph_account(p).budget = None
    assert est.parts["in use"] > 0 and est.total == pytest.approx(sum(est.parts.values()))
    off = estimate_memory(p, matrices=["ggn"], basis=30, basis_device="meta")
    assert "Lanczos basis" not in off.parts and "kept on meta" in off.notes["Lanczos basis"]
    assert off.parts["activations"] == 2 * activation_bytes(p)


def test_refusal_advises_only_what_fits():
    p = _problem(16)
    est = estimate_memory(p, basis=10**6)  # a basis far beyond anything else
    held = est.parts["in use"]
    # the estimate alone (no basis to move): the --max-memory that holds it, nothing vaguer
    with pytest.raises(OptionError, match=r"it fits with max_memory [0-9.]+GB\.$") as err:
        refuse_if_too_large(est, held + 1)
    (option, value), = err.value.advice
    assert option == "max_memory" and parse_memory(value) >= est.total
    with pytest.raises(OptionError, match="already holds"):
        refuse_if_too_large(est, held / 2)
    refuse_if_too_large(est, est.total + 1)  # fits: no error
    refuse_if_too_large(est, None)


@pytest.mark.parametrize(
    "text, value", [("8GB", 8e9), ("512MiB", 512 * 2**20), ("2e9", 2e9), ("1.5 g", 1.5e9)]
)
def test_parse_memory(text, value):
    assert parse_memory(text) == value


@pytest.mark.parametrize("text", ["lots", "-1GB", "0", "5 parsecs"])
def test_parse_memory_refuses_text(text):
    with pytest.raises(OptionError, match="not an amount of memory"):
        parse_memory(text)


def test_cli_prints_the_estimate_records_it_and_refuses_before_any_product(tiny):  # noqa: F811
    runner = CliRunner()
    res = runner.invoke(app, ["spectrum", str(tiny / "model.pt"), "--out", str(tiny / "o")])
    assert res.exit_code == 0, res.output
    assert "memory: about" in res.output
    doc = json.loads((tiny / "o" / "spectrum.json").read_text())
    mem = doc["memory"]
    assert mem["total_bytes"] == sum(mem["parts_bytes"].values())
    assert mem["peak_bytes"] > 0 and mem["limit_bytes"] > mem["total_bytes"]
    res = runner.invoke(
        app, ["spectrum", str(tiny / "model.pt"), "--out", str(tiny / "r"), "--max-memory",
              "1MB"]
    )
    assert res.exit_code == 1
    assert "--max-memory" in res.output and "Traceback" not in res.output
    assert not (tiny / "r" / "spectrum.json").exists()
    res = runner.invoke(
        app, ["spectrum", str(tiny / "model.pt"), "--out", str(tiny / "r"), "--max-memory",
              "lots"]
    )
    assert res.exit_code == 1 and "--max-memory 'lots' is not an amount" in res.output


def test_kept_graphs_are_estimated_and_bounded_by_the_budget():
    from curvscope.app._memory import kept_graph_bytes
    from curvscope.operators import HessianOperator

    p = _problem(16)
    wanted = kept_graph_bytes(p)
    H = HessianOperator(p)
    H @ torch.randn(p.num_params, 1)
    # every batch has the same shape here: the estimate is the measurement
    assert H.info["kept_graphs"]["bytes"] == pytest.approx(wanted, rel=0.02)
    est = estimate_memory(p, matrices=["hessian"], limit=1e12)
    assert est.parts["kept graphs"] == wanted and est.graph_budget >= wanted
    # auto: half of what the limit leaves beside the rest of the run, priced streamed (its
    # activations are then two first-order graphs: the budget may keep none)
    graph_account(p).budget = 0
    rest = estimate_memory(p, matrices=["hessian"], limit=1e12).total
    graph_account(p).budget = None
    tight = estimate_memory(p, matrices=["hessian"], limit=rest + wanted)
    assert tight.graph_budget == pytest.approx(wanted / 2)
    assert tight.parts["kept graphs"] == pytest.approx(wanted / 2)
    assert "streamed" in tight.notes["kept graphs"]
    assert "kept graphs" not in estimate_memory(p, matrices=["ggn"]).parts
    graph_account(p).budget = 0
    assert "kept graphs" not in estimate_memory(p, matrices=["hessian"]).parts
    graph_account(p).budget = 100.0
    est = estimate_memory(p, basis=10**2, matrices=["hessian"])
    assert est.parts["kept graphs"] == 100.0 and est.graph_budget == 100.0


def test_cli_hvp_cache_sizes_the_kept_graphs_and_records_them(tiny):  # noqa: F811
    runner = CliRunner()
    model = str(tiny / "model.pt")
    res = runner.invoke(app, ["spectrum", model, "--top", "2", "--out", str(tiny / "a")])
    assert res.exit_code == 0, res.output
    doc = json.loads((tiny / "a" / "spectrum.json").read_text())
    assert doc["hvp"]["hvp"] == "auto"
    kept = doc["hvp"]["kept_graphs"]
    assert kept["batches"] == kept["of_batches"] >= 1 and kept["bytes"] > 0
    assert doc["memory"]["parts_bytes"]["kept graphs"] > 0
    res = runner.invoke(
        app, ["spectrum", model, "--top", "2", "--hvp-cache", "off", "--out", str(tiny / "b")]
    )
    assert res.exit_code == 0, res.output
    off = json.loads((tiny / "b" / "spectrum.json").read_text())
    assert "kept_graphs" not in off["hvp"] and "kept graphs" not in off["memory"]["parts_bytes"]
    assert off["counts"]["data_passes"] > doc["counts"]["data_passes"]
    res = runner.invoke(
        app, ["spectrum", model, "--hvp-cache", "plenty", "--out", str(tiny / "c")]
    )
    assert res.exit_code == 1 and "--hvp-cache 'plenty' is not auto, off" in res.output
    assert "Traceback" not in res.output and not (tiny / "c" / "spectrum.json").exists()
    res = runner.invoke(
        app, ["spectrum", model, "--top", "1", "--hvp", "finite-difference", "--dtype",
              "float64", "--out", str(tiny / "d")]
    )
    assert res.exit_code == 0, res.output
    fd = json.loads((tiny / "d" / "spectrum.json").read_text())["hvp"]
    assert fd["hvp"] == "finite-difference" and fd["step"] > 0
    assert 0 <= fd["truncation_estimate"] < 1e-3 and 0 <= fd["roundoff_estimate"] < 1e-3


def test_cgroup_limits_are_read_from_v2_and_v1_trees(tmp_path):
    from curvscope._device import cgroup_free

    proc = tmp_path / "cgroup"
    v2 = tmp_path / "fs" / "job"
    v2.mkdir(parents=True)
    (v2 / "memory.max").write_text("8000000000\n")
    (v2 / "memory.current").write_text("3000000000\n")
    proc.write_text("0::/job\n")
    assert cgroup_free(str(proc), str(tmp_path / "fs")) == 5_000_000_000
    (v2 / "memory.max").write_text("max\n")
    assert cgroup_free(str(proc), str(tmp_path / "fs")) is None  # no limit
    v1 = tmp_path / "fs" / "memory" / "slurm" / "job_7"
    v1.mkdir(parents=True)
    (v1 / "memory.limit_in_bytes").write_text("4000000000")
    (v1 / "memory.usage_in_bytes").write_text("4500000000")
    proc.write_text("9:cpu:/\n4:memory:/slurm/job_7\n")
    assert cgroup_free(str(proc), str(tmp_path / "fs")) == 0  # over its limit: nothing free
    (v1 / "memory.limit_in_bytes").write_text(str(2**63 - 4096))
    assert cgroup_free(str(proc), str(tmp_path / "fs")) is None
    assert cgroup_free(str(tmp_path / "missing")) is None


def test_slq_bases_are_estimated_per_probe_and_shrunk_to_a_block_that_fits():
    """SLQ holds every probe's basis at once (20 probes x (30 steps + work rows)); where that
    does not fit, the plan runs the probes in the largest block that does, and says so."""
    from curvscope.app._memory import SLQ_WORK, fit_memory

    p = _problem(16, width=2000)
    P = p.num_params
    whole, choice = fit_memory(p, matrices=["hessian"], vectors=2, slq_steps=30, slq_probes=20)
    assert whole.parts["SLQ basis"] == 20 * (30 + SLQ_WORK) * P * 4
    assert choice.probe_block is None and choice.line is None
    per_probe = (30 + SLQ_WORK) * P * 4
    limit = whole.total - 12.5 * per_probe  # room for 7 probes' bases, not 8
    est, choice = fit_memory(
        p, matrices=["hessian"], vectors=2, slq_steps=30, slq_probes=20, limit=limit
    )
    assert choice.probe_block == 7
    assert est.total <= limit and est.parts["SLQ basis"] == 7 * per_probe
    assert "blocks of 7 instead of all 20" in choice.line
    # the traces draw their probes at once after SLQ: the larger of the two is planned
    est = estimate_memory(p, matrices=["hessian"], slq_steps=30, slq_probes=1, trace_probes=100)
    # Hutch++'s 33 sketch and 34 Gaussian columns with the sketch's products, their float64
    # copy, Q and its workspace, and Q in float32
    assert est.parts["SLQ basis"] == ((3 * 33 + 34) * 4 + 24 * 33) * P
    assert "traces" in est.notes["SLQ basis"]
    # nothing fits below one probe's basis: a refusal, not a block of 0
    with pytest.raises(OptionError, match="more than max_memory"):
        fit_memory(p, matrices=["hessian"], slq_steps=30, slq_probes=20,
                   limit=whole.total - 19.9 * per_probe)


def test_check_plans_its_float64_copy():
    p = _problem(16, width=2000)
    P = p.num_params
    f32 = estimate_memory(p, matrices=["hessian"], vectors=4, basis=20)
    f64 = estimate_memory(p, matrices=["hessian"], vectors=4, basis=20, float64=True)
    assert f64.parts["float64 copy"] == P * 8
    assert f64.parts["vectors"] == 2 * f32.parts["vectors"]
    assert f64.parts["activations"] == pytest.approx(2 * f32.parts["activations"])


def test_report_prints_its_largest_part_and_records_the_plan_in_every_document(tiny):  # noqa: F811
    """The report's parts run one after another: the printed estimate is the largest
    (density's 20 SLQ bases on this model, more than the spectrum's basis), and every
    document carries that plan beside the peak when its part ended."""
    runner = CliRunner()
    out = tiny / "rep"
    res = runner.invoke(app, ["report", str(tiny / "model.pt"), "--out", str(out),
                              "--budget-s", "600"])
    assert res.exit_code == 0, res.output
    assert "in its largest part, density" in res.output
    spectrum = json.loads((out / "spectrum.json").read_text())
    density = json.loads((out / "density.json").read_text())
    mem = spectrum["memory"]
    assert mem["largest_part"] == "density" and "SLQ basis" in mem["parts_bytes"]
    assert density["memory"]["total_bytes"] == mem["total_bytes"]
    assert density["memory"]["peak_bytes"] >= mem["peak_bytes"] > 0
