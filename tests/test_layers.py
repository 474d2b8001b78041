"""The layers, read from the source: components/ and model/ run with no knowledge of Kubeflow
(no import of the KFP SDK, kfp-kubernetes, the Kubernetes client, the Kubeflow SDK or the
project's pipeline/ package, at module level or inside a function), and no KFP-shaped
helpers (a function named kfp_*)."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KUBEFLOW_ONLY = {"kfp", "kubernetes", "kubeflow", "pipeline"}  # kfp-kubernetes is kfp.kubernetes


def imported_modules(source: str) -> set[str]:
    """The top-level names of every module an `import` or `from ... import` statement names
    (relative imports stay inside their package, so they are left out)."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return names


def test_the_scan_sees_imports_at_any_depth():
    source = ("import os\nfrom kfp import dsl\n"
              "def f():\n    import kubernetes.client\n    from pipeline.data import x\n")
    assert imported_modules(source) == {"os", "kfp", "kubernetes", "pipeline"}


def test_no_kubeflow_import_under_components_or_model():
    found = [f"{path.relative_to(ROOT)} imports {name}"
             for package in ("components", "model") for path in sorted((ROOT / package).rglob("*.py"))
             for name in sorted(imported_modules(path.read_text()) & KUBEFLOW_ONLY)]
    assert found == []


def test_no_kfp_helpers_under_components():
    found = [f"{path.relative_to(ROOT)}: {node.name}"
             for path in sorted((ROOT / "components").rglob("*.py"))
             for node in ast.walk(ast.parse(path.read_text()))
             if isinstance(node, ast.FunctionDef) and node.name.startswith("kfp")]
    assert found == []
