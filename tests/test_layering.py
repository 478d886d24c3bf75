"""The structure is a test (STYLE.md section 1): imports go one way, and no private name
crosses a package boundary. Every ``import`` statement of the package is read with ``ast``
(function-level imports included) and checked against the rules below; a violation names the
file, the line and the rule.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "curvscope"

BASE = {"_errors", "_sampling", "_losses", "_device", "_options", "_signs", "_meter"}
"""Modules every layer may use: errors, the one subset routine, losses, device memory, the
shared options and their flag-string parsers."""

LAYERS: dict[str, set[str]] = {
    "_errors": set(),
    "_sampling": {"_errors"},
    "_losses": {"_errors"},
    "_device": set(),
    "_options": {"_errors"},
    "_signs": set(),
    "_meter": set(),
    "_precision": set(),
    "models": {"_errors"},
    "linalg": BASE,
    "io": BASE | {"models"},
    # data parallelism sits under the problem, which splits its batches over the ranks
    "_distributed": {"_errors"},
    "_sharded": {"_errors"},
    # the parts Problem is composed of (parameters, data loop, checks, counters): below it,
    # and imported by nothing but problem (NEVER below says so)
    "_problem": BASE,
    "problem": BASE | {"_distributed", "_precision", "_problem", "_sharded"},
    "_load": BASE | {"io", "problem", "models", "_distributed"},
    "operators": BASE | {"linalg", "problem", "_distributed", "_sharded"},
    # diagnostics read no files: eigenvector and direction files are read by io, for the
    # command line, the report and the flat curvscope.surface
    "diagnostics": BASE | {"linalg", "operators", "problem", "_distributed"},
    "solvers": BASE | {"linalg", "operators", "problem", "_distributed"},
    "report": BASE | {"io"},
    "_examples": BASE | {"io", "models"},
    "app": BASE
    | {"io", "problem", "_load", "linalg", "operators", "diagnostics", "solvers", "report"}
    | {"_examples", "_distributed", "models"},
    "_api": BASE | {"io", "problem", "_load", "linalg", "operators", "diagnostics", "app"},
    # the engine (app) builds the problem and the operators: a command declares options,
    # calls the engine or a library function, and prints
    "cli": BASE
    | {"io", "_load", "linalg", "diagnostics", "solvers", "report"}
    | {"app", "_examples", "_api", "models", "_distributed"},
    "__main__": {"cli"},
    "__init__": set(),  # names are resolved lazily (PEP 562): importing curvscope is cheap
}
"""Which first-level modules or packages each one may import."""

NEVER = [
    ("report", {"linalg", "operators", "diagnostics", "solvers", "problem", "app", "_load"}),
    ("linalg", {"problem", "operators", "diagnostics"}),
    ("io", {"operators", "linalg", "diagnostics", "solvers", "problem"}),
    ("*", {"cli"}),  # but __main__, the entry point of ``python -m curvscope``
    ("*", {"_problem"}),  # but problem, which puts Problem together from it
]
"""Pairs that must never appear, stated apart so a change of LAYERS cannot allow them."""


def _unit(path: Path) -> str:
    rel = path.relative_to(ROOT)
    return rel.parts[0].removesuffix(".py") if rel.parts else ""


def _imports(path: Path):
    """``(line, target unit, imported module path, imported names)`` of every import."""
    tree = ast.parse(path.read_text(), str(path))
    rel = path.relative_to(ROOT)
    package = ["curvscope", *rel.parts[:-1]]
    if rel.name != "__init__.py":
        pass
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = [*base, *(node.module.split(".") if node.module else [])]
            else:
                module = (node.module or "").split(".")
            if module[0] != "curvscope":
                continue
            names = [a.name for a in node.names]
            if len(module) == 1:  # from curvscope import x / from .. import x
                for n in names:
                    yield node.lineno, n, [*module, n], []
            else:
                yield node.lineno, module[1], module, names
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "curvscope" and len(parts) > 1:
                    yield node.lineno, parts[1], parts, []


def _files():
    return sorted(p for p in ROOT.rglob("*.py") if "__pycache__" not in p.parts)


def test_every_unit_has_a_rule():
    units = {_unit(p) for p in _files()}
    missing = sorted(units - set(LAYERS))
    assert not missing, f"add layer rules for {missing} to tests/test_layering.py"


def test_imports_follow_the_layer_rules():
    violations = []
    for path in _files():
        unit = _unit(path)
        allowed = LAYERS[unit]
        for line, target, module, _names in _imports(path):
            if target == unit or target == "__version__":
                continue
            where = f"{path.relative_to(ROOT.parent)}:{line}"
            for src, forbidden in NEVER:
                exempt = {"cli": "__main__", "_problem": "problem"}.get(target)
                if (src == unit or (src == "*" and unit != exempt)) and target in forbidden:
                    violations.append(f"{where}: {unit} -> {target} is never allowed")
            if target not in allowed:
                violations.append(
                    f"{where}: {unit} imports {'.'.join(module)}, but {unit} may import only "
                    f"{', '.join(sorted(allowed)) or 'nothing of curvscope'}"
                )
    assert not violations, "\n".join(violations)


def test_no_private_name_crosses_a_package():
    violations = []
    for path in _files():
        unit = _unit(path)
        for line, target, module, names in _imports(path):
            if target == unit:
                continue
            where = f"{path.relative_to(ROOT.parent)}:{line}"
            deep = [m for m in module[2:] if m.startswith("_")]
            if deep:
                violations.append(f"{where}: imports the private module {'.'.join(module)}")
            private = [n for n in names if n.startswith("_") and n != "__version__"]
            if private:
                violations.append(f"{where}: imports private names {private} from {target}")
    assert not violations, "\n".join(violations)


def test_library_messages_name_no_command_line_flag():
    """Library errors name arguments (``arg('top')``); only cli/ writes ``--flags``."""
    import re

    flag = re.compile(r"(?<![\w-])--[a-z][a-z-]*")
    violations = []
    for path in _files():
        if _unit(path) == "cli":
            continue
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            name = getattr(node.func, "id", getattr(node.func, "attr", ""))
            if not name.endswith("Error"):
                continue
            for sub in ast.walk(node):
                if isinstance(sub, ast.Constant) and isinstance(sub.value, str):
                    m = flag.search(sub.value)
                    if m:
                        violations.append(
                            f"{path.relative_to(ROOT.parent)}:{sub.lineno}: {m.group(0)} in "
                            f"{name}: {sub.value.strip()[:70]!r}"
                        )
    assert not violations, "\n".join(violations)


BLOCKED = ["matplotlib", "plotly", "typer", "rich", "jinja2"]

SCRIPT = f"""
import sys
class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {BLOCKED!r}:
            raise ImportError('blocked ' + name)
sys.meta_path.insert(0, Blocker())
import curvscope, curvscope.io, curvscope.operators, curvscope.linalg
import curvscope.diagnostics, curvscope.solvers, curvscope.problem
print('ok')
"""


def test_library_layers_import_without_plotting_or_cli_libraries():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_importing_curvscope_imports_no_torch():
    code = "import sys, curvscope; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("name", ["load", "hessian", "spectrum", "lanczos", "document"])
def test_flat_api_names_resolve(name):
    import curvscope

    assert callable(getattr(curvscope, name))


MAX_BODY_LINES = 80
"""Issue 21: no function of the command line or the engine is longer than this (its body
without the docstring; a command's option declarations sit in its signature, not counted)."""


def _body_lines(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    body = fn.body
    first = body[0]
    if (
        isinstance(first, ast.Expr)
        and isinstance(first.value, ast.Constant)
        and isinstance(first.value.value, str)
    ):
        body = body[1:]
    return body[-1].end_lineno - body[0].lineno + 1 if body else 0


def test_no_long_function_in_cli_or_app():
    """Split a function over the limit by responsibility into named helpers."""
    long = []
    for path in _files():
        if _unit(path) not in ("cli", "app"):
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = _body_lines(node)
                if n > MAX_BODY_LINES:
                    long.append(f"{path.relative_to(ROOT.parent)}:{node.lineno}: {node.name} {n}")
    assert not long, f"functions over {MAX_BODY_LINES} lines:\n" + "\n".join(long)


PROBLEM_MAKERS = ("Problem", "load", "load_like", "recorded", "subsample", "distributed", "alone")
"""Calls whose result is a problem (besides any function whose name ends in ``problem``)."""


def _problem_names(scope: ast.AST) -> set[str]:
    """Names bound to a problem in ``scope``: ``problem``/``prob``, ``x: Problem``,
    ``p = session.problem``, or the result of a call that makes one (``Problem(...)``,
    ``load(...)``, ``p.subsample(...)``...)."""
    names = {"problem", "prob"}
    for node in ast.walk(scope):
        if isinstance(node, ast.arg) and node.annotation is not None:
            if "Problem" in ast.unparse(node.annotation):
                names.add(node.arg)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if "Problem" in ast.unparse(node.annotation):
                names.add(node.target.id)
        elif isinstance(node, ast.Assign) and _is_problem(node.value, set()):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.Assign) and isinstance(node.value, ast.Call):
            func = node.value.func
            called = getattr(func, "id", getattr(func, "attr", ""))
            if called in PROBLEM_MAKERS or called.lower().endswith("problem"):
                names.update(t.id for t in node.targets if isinstance(t, ast.Name))
    return names


def _is_problem(node: ast.AST, names: set[str]) -> bool:
    """``node`` is a problem: a problem name, or ``<anything>.problem``."""
    return (isinstance(node, ast.Name) and node.id in names) or (
        isinstance(node, ast.Attribute) and node.attr in ("problem", "_problem")
    )


def _problem_assignments(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    scopes = [tree] + [
        n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
    ]
    found = set()
    for scope in scopes:
        names = _problem_names(scope)
        for node in ast.walk(scope):
            targets = []
            if isinstance(node, ast.Assign):
                targets = node.targets
            elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
                targets = [node.target]
            elif (
                isinstance(node, ast.Call)
                and getattr(node.func, "id", None) in ("setattr", "delattr")
                and node.args
                and _is_problem(node.args[0], names)
            ):
                found.add(f"{path}:{node.lineno}: {ast.unparse(node)[:60]}")
            while targets:  # unpacking: a, problem.x = ... names the problem too
                t = targets.pop()
                if isinstance(t, (ast.Tuple, ast.List)):
                    targets += t.elts
                elif isinstance(t, ast.Starred):
                    targets.append(t.value)
                elif isinstance(t, ast.Attribute) and _is_problem(t.value, names):
                    found.add(f"{path}:{t.lineno}: {ast.unparse(t)[:60]} = ...")
    return sorted(found)


def test_nothing_outside_problem_sets_attributes_on_a_problem():
    """Issue 21: a problem gets what it keeps at construction (its input record with
    ``Problem(record=...)`` / ``Problem.recorded``); the Hessian's kept-graph account lives
    on the operator side (``curvscope.operators.graph_account``), not on the problem."""
    repo = ROOT.parent
    paths = [p for p in _files() if _unit(p) not in ("problem", "_problem")]
    for extra in ("benchmarks", "scripts", "examples"):
        paths += sorted((repo / extra).rglob("*.py"))
    found = [v for p in paths for v in _problem_assignments(p)]
    assert not found, "attributes set on a Problem outside curvscope/problem.py:\n" + "\n".join(
        found
    )


def test_the_problem_assignment_check_can_fail(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(
        "def f(session, path):\n"
        "    p = load(path)\n"
        "    p.input_info = {}\n"
        "    session.problem.graph_cache = 0\n"
        "    q = session.problem\n"
        "    q.hvp_record = {}\n"
        "    setattr(p, 'notes', [])\n"
        "    for w in p.model.parameters():\n"
        "        w.grad = None\n"
    )
    found = _problem_assignments(bad)
    assert len(found) == 4 and not any("grad" in f for f in found), found
