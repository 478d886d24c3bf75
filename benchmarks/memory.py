"""Peak memory against the estimate the command line prints (issue 12 item 2).

Runs the command line in fresh processes and compares the peak resident set (the
document's ``memory.peak_bytes``: ``ru_maxrss`` of the process) with the estimate it printed
before its first product (``memory.total_bytes``):

  (a) ``spectrum --top 5`` on a ResNet-18-shaped CNN for CIFAR (11.2M parameters, BatchNorm
      in eval mode, benchmarks/gpu.py's ``ResNet18``), 256 synthetic 3x32x32 samples in batches
      of 128, float32. The run is capped at ``--max-matvecs`` products with a 20-vector basis:
      the peak comes once the basis is full and the first restart has formed its Ritz
      vectors, so the cap measures the peak of a whole run at a fraction of its time (a
      whole top-5 run is about 80 products of 30 s each on this 2-core machine);
  (b) ``report --preset quick --budget-s 120`` on a 389k-parameter CNN (three conv layers,
      two linear), 32 synthetic samples: every part of the report in one process;
  (c) the same CNN's spectrum with the basis that fits (issue 24 item 2): ``-shrunk`` under a
      ``--max-memory`` 60% of the default basis below its estimate (the plan shrinks the
      basis), ``-disk`` with ``--basis-device disk:DIR`` (the basis in a mapped file). Peak
      anon is the anonymous resident set, sampled: mapped file pages count in the RSS as page
      cache the kernel may drop, so for the disk row that is the figure to read;
  (d) the same CNN's ``density`` (20 probes x 30 steps, 30 trace probes): all probes' SLQ
      bases at once, then ``-blocks`` under a ``--max-memory`` that leaves room for 40% of
      them (the plan runs the probes in smaller blocks).

Usage:  OMP_NUM_THREADS=1 python benchmarks/memory.py [--cases resnet18,cnn389k] [--quick]
Prints a markdown table; a command that fails makes the benchmark fail (exit 1) after it.
--quick: only ``spectrum --top 2 --max-matvecs 6`` on the 389k CNN with 16 samples, for a
check that it runs (seconds; the figure means little then).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

HERE = Path(__file__).resolve().parent


class CNN389k(nn.Module):
    """Three 3x3 conv layers (32, 64, 128 channels), two poolings, two linear layers."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(64, 128, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(128 * 8 * 8, 36), nn.Tanh(), nn.Linear(36, 10)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def cnn389k() -> nn.Module:
    torch.manual_seed(0)
    return CNN389k()


def resnet18() -> nn.Module:
    sys.path.insert(0, str(HERE))
    from gpu import ResNet18

    torch.manual_seed(0)
    return ResNet18()


def _write(folder: Path, name: str, n: int) -> tuple[Path, Path, int]:
    model = {"resnet18": resnet18, "cnn389k": cnn389k}[name]()
    ckpt = folder / f"{name}.pt"
    torch.save(model.state_dict(), ckpt)
    g = np.random.default_rng(0)
    data = folder / f"{name}-data.npz"
    np.savez(data, x=g.normal(size=(n, 3, 32, 32)).astype(np.float32), y=g.integers(0, 10, size=n))
    return ckpt, data, sum(p.numel() for p in model.parameters())


def run(name: str, folder: Path, quick: bool = False, extra: list[str] | None = None,
        label: str | None = None, density: bool = False) -> dict:
    """One command in a fresh process: its document's estimate and its peak RSS.

    ``extra``: more flags (the basis rows); ``label``: the row's name; ``density``: the
    ``density`` command (20 probes x 30 steps, 30 trace probes) instead of the case's own.
    """
    if density:  # --quick: 8 probes x 6 steps, 6 trace probes on 16 samples (seconds)
        ckpt, data, P = _write(folder, name, 16 if quick else 32)
        args = ["density", str(ckpt), "--batch-size", "16" if quick else "32",
                "--probes", "8" if quick else "20", "--lanczos-steps", "6" if quick else "30",
                "--trace-probes", "6" if quick else "30"]
        command = "density"
    elif quick:
        ckpt, data, P = _write(folder, name, 16)
        args = ["spectrum", str(ckpt), "--top", "2", "--bottom", "0", "--batch-size", "16"]
        args += ["--max-matvecs", "6"]
        command = "spectrum"
    elif name == "resnet18":
        ckpt, data, P = _write(folder, name, 256)
        args = [
            "spectrum",
            str(ckpt),
            "--top",
            "5",
            "--bottom",
            "0",
            "--batch-size",
            "128",
            "--basis-size",
            "20",
            "--max-matvecs",
            "24",
        ]
        command = "spectrum"
    else:
        ckpt, data, P = _write(folder, name, 32)
        args = ["report", str(ckpt), "--preset", "quick", "--budget-s", "120", "--batch-size", "32"]
        command = "spectrum"  # every report document carries the report's plan
    args += extra or []
    out = folder / f"out-{label or name}"
    cmd = [
        sys.executable,
        "-m",
        "curvscope",
        *args,
        "--model",
        f"{Path(__file__).resolve()}:{name}",
        "--data",
        str(data),
        "--loss",
        "cross_entropy",
        "--threads",
        "1",
        "--out",
        str(out),
    ]
    # a wrapper process reports its one child's peak RSS (RUSAGE_CHILDREN of a fresh process)
    # and its peak anonymous RSS, sampled every 5 ms (a disk basis's mapped file pages count
    # in the RSS as page cache, which the kernel may drop; RssAnon is what the run holds)
    wrapper = (
        "import resource, subprocess, sys, time\n"
        "p = subprocess.Popen(sys.argv[1:]); anon = 0\n"
        "while p.poll() is None:\n"
        "    try:\n"
        "        for ln in open(f'/proc/{p.pid}/status'):\n"
        "            if ln.startswith('RssAnon:'): anon = max(anon, int(ln.split()[1]) * 1024)\n"
        "    except OSError: pass\n"
        "    time.sleep(0.005)\n"
        "print('PEAK', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)\n"
        "print('ANON', anon); sys.exit(p.returncode)"
    )
    t0 = time.perf_counter()
    res = subprocess.run(
        [sys.executable, "-c", wrapper, *cmd],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        return {"case": name, "failed": res.stderr[-2000:]}
    docs = sorted(out.glob("*.json"))
    doc = json.loads((out / f"{command}.json").read_text())
    peak = int(res.stdout.rsplit("PEAK", 1)[1].split()[0])
    memory = doc.get("memory") or {"total_bytes": doc["settings"]["memory_estimate_bytes"]}
    memory["peak_bytes"] = peak
    memory["peak_anon_bytes"] = int(res.stdout.rsplit("ANON", 1)[1].split()[0])
    return {
        "case": label or name,
        "command": args[0],
        "params": P,
        "wall_s": wall,
        "memory": memory,
        "documents": [d.name for d in docs],
        "estimate_line": next(
            (ln for ln in res.stderr.splitlines() if ln.startswith("memory:")), ""
        ),
        "basis_line": next((ln for ln in res.stderr.splitlines() if ln.startswith("basis:")), ""),
        "products": sum(s.get("num_matvecs", 0) for s in doc["results"].get("spectra", [])[:1]),
    }


def basis_rows(name: str, folder: Path, quick: bool, plain: dict) -> list[dict]:
    """The basis that fits (issue 24 item 2): auto-shrunk under a --max-memory, and on disk.

    ``plain``: the row of the same case with its default basis. The limit takes away 60% of
    its basis part, so the plan shrinks the basis; the matvec cap lets it restart (the peak
    of a restart's block). The disk row keeps the default basis in a file in ``folder``.
    """
    if "failed" in plain:
        return []
    if plain.get("command") == "report":
        # the full run's cnn389k row is a report (no spectrum flags): the basis rows run the
        # quick spectrum of the same network
        quick = True
        plain = run(name, folder, True)
        if "failed" in plain:
            return [plain]
    mem = plain["memory"]
    basis = mem["parts_bytes"].get("Lanczos basis", 0)
    limit = mem["total_bytes"] - 0.6 * basis
    cap = ["--max-matvecs", "40"]
    scratch = folder / "scratch"
    scratch.mkdir(exist_ok=True)
    rows = [
        run(name, folder, quick, [*cap, "--max-memory", f"{limit:.0f}"], f"{name}-shrunk"),
        run(name, folder, quick, [*cap, "--basis-device", f"disk:{scratch}"], f"{name}-disk"),
    ]
    left = list(scratch.iterdir())
    if left:
        rows[-1] = {"case": f"{name}-disk", "failed": f"basis file left behind: {left}"}
    # SLQ's bases: all 20 probes at once, then under a limit that leaves room for 40% of them
    # (the plan runs the probes in smaller blocks)
    whole = run(name, folder, quick, [], f"{name}-density", density=True)
    rows.append(whole)
    if "failed" not in whole:
        m = whole["memory"]
        limit = m["total_bytes"] - 0.6 * m["parts_bytes"]["SLQ basis"]
        rows.append(run(name, folder, quick, ["--max-memory", f"{limit:.0f}"],
                        f"{name}-density-blocks", density=True))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default=None, help="default resnet18,cnn389k (--quick: cnn389k)")
    ap.add_argument("--quick", action="store_true", help="one tiny spectrum run (seconds)")
    args = ap.parse_args()
    cases = args.cases or ("cnn389k" if args.quick else "resnet18,cnn389k")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in cases.split(","):
            row = run(name, Path(tmp), args.quick)
            rows.append(row)
            print(json.dumps(row, indent=1, default=str), flush=True)
            if name == "cnn389k":
                for extra in basis_rows(name, Path(tmp), args.quick, row):
                    rows.append(extra)
                    print(json.dumps(extra, indent=1, default=str), flush=True)
    print("\n| case | parameters | basis | estimate | peak RSS | peak / estimate | peak anon |"
          " products | wall |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        if "failed" in r:
            print(f"| {r['case']} | failed | | | | |")
            continue
        m = r["memory"]
        est = m.get("total_bytes")
        peak = m["peak_bytes"]
        ratio = f"{peak / est:.2f}" if est else ""
        est_s = f"{est / 1e9:.2f} GB"
        b = m.get("basis") or {}
        where = b.get("device") or "device"
        basis = f"{b.get('size', '')} on {where}" if b.get("size") else ""
        if m.get("disk_bytes"):
            basis += f" ({m['disk_bytes'] / 1e6:.0f} MB file)"
        if r.get("command") == "density":
            block = m.get("slq_probe_block")
            basis = f"SLQ probes {block} at once" if block else "SLQ probes all at once"
        elif m.get("largest_part"):
            basis = f"largest part: {m['largest_part']}"
        print(
            f"| {r['case']} | {r['params']} | {basis} | {est_s} | {peak / 1e9:.2f} GB | {ratio} "
            f"| {m['peak_anon_bytes'] / 1e9:.2f} GB | {r.get('products', '')} | "
            f"{r['wall_s']:.0f} s |"
        )
    failed = [r["case"] for r in rows if "failed" in r]
    if failed:
        sys.exit(f"memory benchmark: the command failed for {', '.join(failed)} (stderr above)")


if __name__ == "__main__":
    main()
