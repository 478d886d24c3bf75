"""Make curvscope/io/data/digits.npz once from scikit-learn's bundled copy of the UCI digits.

scikit-learn is never a dependency: this script downloads its wheel with pip (no install)
and reads sklearn/datasets/data/digits.csv.gz from the zip. Run:

    python scripts/make_digits_data.py [--wheel-dir DIR] [--out FILE]

``--quick`` needs no network: it packs the committed digits.npz into a stand-in wheel (the
one file the script reads, in scikit-learn's CSV layout), converts that into ``--out`` or a
temporary folder (never into the repository) and checks that the result equals the
committed file (seconds).
"""

import argparse
import gzip
import io
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parents[1] / "curvscope" / "io" / "data" / "digits.npz"


def stand_in_wheel(folder: Path) -> Path:
    """A zip named like scikit-learn's wheel holding digits.csv.gz made from the committed npz."""
    d = np.load(OUT)
    table = np.concatenate([d["x"], d["y"][:, None]], axis=1).astype(np.float64)
    buf = io.StringIO()
    np.savetxt(buf, table, fmt="%.1f", delimiter=",")
    wheel = folder / "scikit_learn-0-stand-in.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("sklearn/datasets/data/digits.csv.gz", gzip.compress(buf.getvalue().encode()))
    return wheel


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--wheel-dir", type=Path, default=None, help="folder with a scikit-learn wheel")
    ap.add_argument("--out", type=Path, default=None, help=f"default {OUT}")
    ap.add_argument("--quick", action="store_true", help="offline check with a stand-in wheel")
    args = ap.parse_args()
    out = args.out or (Path(tempfile.mkdtemp()) / "digits.npz" if args.quick else OUT)
    wheel_dir = args.wheel_dir
    if wheel_dir is None and args.quick:
        wheel_dir = Path(tempfile.mkdtemp())
        stand_in_wheel(wheel_dir)
    if wheel_dir is None:
        wheel_dir = Path(tempfile.mkdtemp())
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--only-binary=:all:",
                "scikit-learn",
                "-d",
                str(wheel_dir),
            ],
            check=True,
        )
    wheel = next(wheel_dir.glob("scikit_learn-*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        raw = zf.read("sklearn/datasets/data/digits.csv.gz")
    table = np.loadtxt(io.TextIOWrapper(gzip.GzipFile(fileobj=io.BytesIO(raw))), delimiter=",")
    x = table[:, :64].astype(np.uint8)
    y = table[:, 64].astype(np.uint8)
    assert x.shape == (1797, 64) and set(np.unique(y)) == set(range(10))
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, x=x, y=y)
    print(f"wrote {out} ({out.stat().st_size} bytes) from {wheel.name}")
    if args.quick:
        ref, new = np.load(OUT), np.load(out)
        if not all(np.array_equal(ref[k], new[k]) for k in ("x", "y")):
            raise SystemExit(f"{out} differs from the committed {OUT}")
        print(f"same arrays as the committed {OUT.name}")


if __name__ == "__main__":
    main()
