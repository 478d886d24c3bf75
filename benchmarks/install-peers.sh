#!/usr/bin/env bash
# Install the peer libraries the benchmarks compare against, into the environment of PYTHON,
# without touching the pinned torch (shared/peer-baselines.md):
# curvlinops needs BackPACK, which asks for torchvision, which would replace torch 2.13.0 with
# another multi-GB build. So every peer goes in with --no-deps, plus the light packages they
# really import. The test suite never needs any of them.
set -euo pipefail
PY=${1:-.venv/bin/python}
before=$("$PY" -c 'import torch; print(torch.__version__)')
"$PY" -m pip install --quiet --no-deps \
  pyhessian==0.1 \
  hessian-eigenthings==1.0.0a5 \
  curvlinops-for-pytorch \
  backpack-for-pytorch \
  einconv unfoldNd linear_operator
# what they import at run time (all pure Python, no torch requirement of their own)
"$PY" -m pip install --quiet --no-deps einops opt-einsum tqdm jaxtyping wadler-lindig mpmath
after=$("$PY" -c 'import torch; print(torch.__version__)')
if [ "$before" != "$after" ]; then
  echo "install-peers: torch changed from $before to $after; reinstall torch==2.13.0" >&2
  exit 1
fi
"$PY" - <<'PYEOF'
import importlib
for name in ("pyhessian", "hessian_eigenthings", "curvlinops", "backpack"):
    try:
        importlib.import_module(name)
        print(f"  {name}: ok")
    except Exception as exc:  # report, do not fail: the benchmark records missing peers
        print(f"  {name}: FAILED to import ({type(exc).__name__}: {exc})")
PYEOF
echo "install-peers: peers installed, torch still $after"
