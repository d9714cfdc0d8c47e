"""Properties of the code as a whole: importing it changes nothing, and the layers import downwards only."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("fsad_core", "flows", "infra")


def _modules(package: str) -> list[str]:
    return sorted(".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
                  for p in (ROOT / package).rglob("*.py"))


def test_importing_any_module_leaves_the_environment_as_it_was(tmp_path):
    modules = [m for package in PACKAGES for m in _modules(package)]
    # The libraries set variables of their own when imported (torch's KMP_*): they are imported first.
    script = ("import importlib, json, os, sys, torch, timm, mlflow, prefect, boto3, pandas, sklearn, matplotlib\n"
              "before = dict(os.environ)\n"
              "for m in sys.argv[1:]: importlib.import_module(m)\n"
              "print(json.dumps(sorted(k for k in {*before, *os.environ} if before.get(k) != os.environ.get(k))))")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}  # telemetry switches unset, so setting one would show
    out = subprocess.run([sys.executable, "-c", script, *modules], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300, check=True)
    assert json.loads(out.stdout.splitlines()[-1]) == []


def _imported(path: Path, whole: bool = False) -> set[str]:
    """The modules ``path`` imports, as top-level packages or, ``whole``, as written."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return names if whole else {name.split(".")[0] for name in names}


@pytest.mark.parametrize("package, below", [("fsad_core", set()), ("infra", set()), ("flows", {"fsad_core", "infra"})])
def test_each_layer_imports_only_the_layers_below_it(package, below):
    upward = {str(p.relative_to(ROOT)): sorted((_imported(p) & set(PACKAGES)) - below - {package})
              for p in (ROOT / package).rglob("*.py")}
    assert {path: names for path, names in upward.items() if names} == {}


@pytest.mark.parametrize("room, above", [("cli", set()), ("review", {"cli"})])
def test_nothing_below_the_command_line_and_the_review_page_imports_them(room, above):
    importers = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "flows").rglob("*.py")
                       if p.relative_to(ROOT / "flows").parts[0] not in {room, *above}
                       and any(name.startswith(f"flows.{room}") for name in _imported(p, whole=True)))
    assert importers == []
