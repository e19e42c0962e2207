"""The packages' layering: the model library never imports the worker, and the shipped worker never imports the
benchmarks (a source checkout's, not shipped)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports by absolute name, function-level imports included (a relative import stays
    inside its own package, so it cannot reach another one)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_ppl_model_imports_nothing_from_worker_or_benchmarks():
    files = sorted((REPO_ROOT / "ppl_model").rglob("*.py"))
    assert len(files) > 10
    offending = {f"{path.relative_to(REPO_ROOT)}: {name}" for path in files for name in imported_modules(path)
                 if name.split(".")[0] in {"worker", "benchmarks"}}
    assert not offending, offending


def test_the_worker_package_does_not_import_the_benchmarks():
    offending = {f"{path.relative_to(REPO_ROOT)}: {name}" for path in sorted((REPO_ROOT / "worker").rglob("*.py"))
                 for name in imported_modules(path) if name.split(".")[0] == "benchmarks"}
    assert not offending, offending


def test_the_worker_command_line_loads_without_the_benchmarks():
    # In a fresh interpreter started in the checkout, where benchmarks/ would import if anything asked for it.
    code = ("import sys, worker.cli; worker.cli.build_parser(); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('benchmarks', 'tests')))")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
                          check=True)
    assert done.stdout.strip() == "[]", done.stdout


def test_the_benchmarks_are_not_in_the_shipped_packages():
    import tomllib

    found = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    assert found["include"] == ["ppl_model*", "worker*"]


def test_inference_does_not_import_the_training_data_package():
    """data → inference only (training reuses inference's preprocessing); the other way would be a cycle."""
    files = sorted((REPO_ROOT / "ppl_model" / "inference").rglob("*.py"))
    offending = {f"{path.relative_to(REPO_ROOT)}: {name}" for path in files for name in imported_modules(path)
                 if name == "ppl_model.data" or name.startswith("ppl_model.data.")}
    assert not offending, offending


def test_operations_commands_load_no_model_stack():
    """`ppl-worker submit`, `rescan` and their --help read at most a model's JSON description: no torch,
    transformers or peft (seconds of start-up and hundreds of MB on a host that runs no model)."""
    code = ("import contextlib, io, sys\n"
            "from worker import cli\n"
            "import worker.rescan, worker.app\n"
            "for command in ('rescan', 'submit', 'verdicts', 'dead-letters'):\n"
            "    with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
            "        cli.main([command, '--help'])\n"
            "cli.source_uris([sys.argv[1]])\n"
            "print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", code, str(REPO_ROOT / "demo" / "photos")], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", done.stdout
