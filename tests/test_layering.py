"""Imports go one way (STYLE.md section 1): no plotting or CLI libraries below report/."""

import subprocess
import sys

BLOCKED = ["matplotlib", "plotly", "typer", "rich", "jinja2"]

SCRIPT = f"""
import sys
class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {BLOCKED!r}:
            raise ImportError('blocked ' + name)
sys.meta_path.insert(0, Blocker())
import curvscope, curvscope.io, curvscope.operators, curvscope.linalg
import curvscope.diagnostics, curvscope.solvers
print('ok')
"""


def test_library_layers_import_without_plotting_or_cli_libraries():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
