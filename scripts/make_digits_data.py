"""Make curvscope/io/data/digits.npz once from scikit-learn's bundled copy of the UCI digits.

scikit-learn is never a dependency: this script downloads its wheel with pip (no install)
and reads sklearn/datasets/data/digits.csv.gz from the zip. Run:

    python scripts/make_digits_data.py [--wheel-dir DIR]
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--wheel-dir", type=Path, default=None, help="folder with a scikit-learn wheel")
    args = ap.parse_args()
    wheel_dir = args.wheel_dir
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
    OUT.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(OUT, x=x, y=y)
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes) from {wheel.name}")


if __name__ == "__main__":
    main()
