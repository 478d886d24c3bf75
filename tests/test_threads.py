"""Threads: the default follows the CPUs the process may use, and contention is noticed."""

from __future__ import annotations

import json
import os

import pytest
import torch
from typer.testing import CliRunner

from curvscope import _device
from curvscope.cli import app

from .test_cli_spectrum import tiny  # noqa: F401 - the fixture


@pytest.fixture
def tiny_checkpoint(tiny):  # noqa: F811
    return tiny / "model.pt"


def test_cgroup_cpu_quota_from_v2_and_v1_trees(tmp_path):
    proc = tmp_path / "cgroup"
    v2 = tmp_path / "fs" / "job"
    v2.mkdir(parents=True)
    (v2 / "cpu.max").write_text("150000 100000\n")
    proc.write_text("0::/job\n")
    assert _device.cgroup_cpus(str(proc), str(tmp_path / "fs")) == 1.5
    (v2 / "cpu.max").write_text("max 100000\n")
    assert _device.cgroup_cpus(str(proc), str(tmp_path / "fs")) is None  # no quota
    v1 = tmp_path / "fs" / "cpu,cpuacct" / "slurm"
    v1.mkdir(parents=True)
    (v1 / "cpu.cfs_quota_us").write_text("400000")
    (v1 / "cpu.cfs_period_us").write_text("100000")
    proc.write_text("4:memory:/x\n3:cpu,cpuacct:/slurm\n")
    assert _device.cgroup_cpus(str(proc), str(tmp_path / "fs")) == 4.0
    (v1 / "cpu.cfs_quota_us").write_text("-1")
    assert _device.cgroup_cpus(str(proc), str(tmp_path / "fs")) is None
    assert _device.cgroup_cpus(str(tmp_path / "missing")) is None


def test_usable_cpus_is_capped_by_affinity_and_quota(monkeypatch):
    assert 1 <= _device.usable_cpus() <= len(os.sched_getaffinity(0))
    monkeypatch.setattr(_device, "cgroup_cpus", lambda: 1.0)
    assert _device.usable_cpus() == 1


def test_probe_restores_threads_and_one_thread_is_never_contended():
    before = torch.get_num_threads()
    assert _device.contended(1) is False
    _device.contended(2)
    assert torch.get_num_threads() == before


def test_default_threads_follow_the_probe(monkeypatch, tiny_checkpoint, tmp_path):
    """Without --threads or OMP_NUM_THREADS a contended machine runs one thread and says so;
    --threads is honoured as given (the document records what ran)."""
    import curvscope.cli._common as common

    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(_device, "usable_cpus", lambda: 2)
    monkeypatch.setattr(_device, "contended", lambda n: True)
    monkeypatch.setattr(common, "RANK_STATE", {"main": True})
    try:
        res = CliRunner().invoke(app, ["spectrum", str(tiny_checkpoint), "--top", "1",
                                       "--bottom", "0", "--out", str(tmp_path / "a")])
        assert res.exit_code == 0, res.output
        assert "running with --threads 1" in " ".join(res.output.split())
        doc = json.loads((tmp_path / "a" / "spectrum.json").read_text())
        assert doc["settings"]["threads"] == 1
        res = CliRunner().invoke(app, ["spectrum", str(tiny_checkpoint), "--top", "1",
                                       "--bottom", "0", "--threads", "2", "--out",
                                       str(tmp_path / "b")])
        assert res.exit_code == 0, res.output
        assert "running with --threads 1" not in res.output
        doc = json.loads((tmp_path / "b" / "spectrum.json").read_text())
        assert doc["settings"]["threads"] == 2
    finally:
        torch.set_num_threads(before)


def test_diff_to_a_file_never_cuts_a_number(tiny_checkpoint, tmp_path, monkeypatch):
    """`curvscope diff a b > file`, even at COLUMNS=40: every number and verdict whole."""
    for name, tol in (("a", "1e-3"), ("b", "1e-9")):
        res = CliRunner().invoke(app, ["spectrum", str(tiny_checkpoint), "--top", "2",
                                       "--bottom", "1", "--tol", tol, "--threads", "1",
                                       "--out", str(tmp_path / name)])
        assert res.exit_code == 0, res.output
    monkeypatch.setenv("COLUMNS", "40")
    res = CliRunner().invoke(app, ["diff", str(tmp_path / "a" / "spectrum.json"),
                                   str(tmp_path / "b" / "spectrum.json"), "--all"])
    assert res.exit_code == 0, res.output
    assert "…" not in res.output
    doc = json.loads((tmp_path / "b" / "spectrum.json").read_text())
    for s in doc["results"]["spectra"]:
        for v in s["eigenvalues"]:
            assert f"{v:.6g}" in res.output


def test_a_quiet_console_prints_no_table(capsys):
    """Under torchrun ranks other than 0 are quiet: their tables, printed through a wider
    twin console off a terminal, stay unprinted too."""
    from rich.console import Console

    from curvscope.cli._common import print_table, table

    t = table("t", ["name", "value"], numbers=["value"])
    t.add_row("x", "1.234567")
    print_table(t, Console(file=None, quiet=True, force_terminal=False))
    print_table(t, Console(force_terminal=False))
    out = capsys.readouterr().out
    assert out.count("1.234567") == 1
