"""The architecture's rules that import-linter cannot state: light start-up and reasons for lazy imports.

import-linter (`make lint`, contracts in pyproject.toml) checks the layers and the families' independence. These tests
check what a process pays for importing vidgen: `vidgen --help`, config loading and the registry load no heavy
library, and Ray Data's read tasks (vidgen.data.worker) never load torch. Every import left inside a function says
why (`# lazy: <reason>`), so a new one is a decision, not an accident.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "ray", "diffusers", "transformers", "deepspeed", "peft", "mlflow", "pyarrow", "av", "matplotlib",
         "safetensors", "scipy")


def loaded_by(module: str) -> list[str]:
    """The heavy libraries a fresh interpreter has loaded after importing `module`."""
    code = (f"import sys, json, importlib; importlib.import_module({module!r}); "
            f"print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout)


@pytest.mark.parametrize("module, allowed", [
    ("vidgen.cli", []),  # `vidgen --help`, and the CLI before it knows which job runs
    ("vidgen.config", []),
    ("vidgen.models.registry", []),  # configs are checked against the families without loading any
    ("vidgen.faults", []),
    ("vidgen.data.worker", []),  # Ray Data read tasks: decode with PIL/av on demand, never torch
    ("vidgen.data.pipeline", []),
    ("vidgen.diffusion.objectives", ["torch"]),  # the pure core: tensors, nothing else
])
def test_importing_a_light_module_loads_no_heavy_library(module, allowed):
    assert loaded_by(module) == allowed


def lazy_import_runs(path: Path) -> list[tuple[int, bool]]:
    """(first line, has a `lazy:` reason) of each run of consecutive import statements inside a function."""
    lines = path.read_text().splitlines()
    runs = []
    for node in ast.walk(ast.parse("\n".join(lines))):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        for block in (getattr(sub, field, None) for sub in ast.walk(node) for field in ("body", "orelse",
                                                                                         "finalbody", "handlers")):
            if not isinstance(block, list):  # a lambda's or an if-expression's body is one expression
                continue
            prev_end = None
            for stmt in block:
                if not isinstance(stmt, ast.Import | ast.ImportFrom):
                    prev_end = None
                    continue
                if prev_end is None or stmt.lineno != prev_end + 1:
                    runs.append((stmt.lineno, "lazy:" in lines[stmt.lineno - 1]))
                prev_end = stmt.end_lineno
    return sorted(set(runs))


def test_every_import_inside_a_function_says_why_it_is_lazy():
    missing = [f"{p.relative_to(ROOT)}:{line}" for p in sorted((ROOT / "vidgen").rglob("*.py"))
               for line, ok in lazy_import_runs(p) if not ok]
    assert not missing, f"imports inside functions without a `# lazy: <reason>` comment: {missing}"


def test_the_lazy_import_check_sees_runs_and_their_reasons(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("def f():\n    import os  # lazy: a reason\n    import re\n    x = 1\n    import json\n"
                   "    try:\n        import yaml\n    except ImportError:\n        pass\n")
    assert lazy_import_runs(src) == [(2, True), (5, False), (7, False)]


def test_the_import_contracts_cover_every_registered_family():
    """import-linter lists modules by name: a family registered without joining the independence and
    "only the registry knows" contracts would go unchecked."""
    import tomllib

    from vidgen.models.registry import FAMILIES

    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    independent = next(c for c in contracts if c["type"] == "independence")["modules"]
    forbidden = next(c for c in contracts if "vidgen.models.registry" in c.get("source_modules", []))
    families = {e.module for e in FAMILIES.values()}
    assert families == set(independent) == set(forbidden["forbidden_modules"])
