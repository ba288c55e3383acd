"""House rules that keep the code easy to pick up: ruff's lint rules and its formatter (line length 110), and
the one-way imports of docs/design.md (no module imports a command module for a helper)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RUFF = Path(sys.executable).with_name("ruff")
SOURCES = ["lesionkit", "benchmarks", "tests"]


def test_ruff_lint_and_format_are_clean():
    lint = subprocess.run([RUFF, "check", *SOURCES], cwd=REPO, capture_output=True, text=True, check=False)
    assert lint.returncode == 0, lint.stdout[-3000:]
    fmt = subprocess.run(
        [RUFF, "format", "--check", *SOURCES], cwd=REPO, capture_output=True, text=True, check=False
    )
    assert fmt.returncode == 0, fmt.stdout[-3000:] + " (run `make format`)"


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_only_the_cli_imports_command_modules():
    offenders = [
        str(path.relative_to(REPO))
        for path in [*(REPO / "lesionkit").rglob("*.py"), *(REPO / "benchmarks").rglob("*.py")]
        if path.name != "cli.py" and any(m.startswith("lesionkit.commands") for m in _imports(path))
    ]
    assert offenders == [], offenders
