"""Layering: `rlm_train.tasks` is the bottom layer for tasks, and computed policies
(scripted teacher, oracle, baselines) live in `rlm_train.policies`, above both it and
`rlm_train.models`. Checked two ways: by importing (what really gets loaded) and by
reading every import statement (what a lazy import would load later)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "rlm_train"

# Everything above tasks/: every other sub-package, and the CLI. The plain top-level
# modules (errors, formats, config, ...) are the shared foundations anyone may import.
HIGHER = tuple(sorted(
    f"rlm_train.{p.name}" for p in PACKAGE.iterdir() if (p / "__init__.py").exists() and p.name != "tasks"
)) + ("rlm_train.cli",)
# Lazy, function-level imports from tasks/ into a higher package, each with its reason.
# Neither side of these is reachable back from the package imported (no cycle).
TASK_LAZY_EDGES = {
    ("rlm_train.tasks.commands", "rlm_train.models.loading"),  # `tasks make --tokenizer DIR` loads a HF tokenizer
}


def _modules(package: str) -> list[str]:
    root = PACKAGE.parent
    return sorted(
        ".".join(p.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
        for p in (root / package.replace(".", "/")).rglob("*.py")
    )


def _project_imports(module: str) -> set[str]:
    """Every `rlm_train...` name the module's source imports, at any depth (lazy imports too)."""
    path = PACKAGE.parent / (module.replace(".", "/") + ".py")
    if not path.exists():
        path = PACKAGE.parent / module.replace(".", "/") / "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "rlm_train"}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.split(".")[0] == "rlm_train":
                found.add(node.module)
                # `from rlm_train.pkg import sub`: sub may be a module.
                found |= {f"{node.module}.{a.name}" for a in node.names
                          if (PACKAGE.parent / f"{node.module}.{a.name}".replace(".", "/")).exists()
                          or (PACKAGE.parent / (f"{node.module}.{a.name}".replace(".", "/") + ".py")).exists()}
    return found


def _package_of(module: str) -> str:
    """The top-level unit a module belongs to: rlm_train.<sub-package or module>."""
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else module


def test_importing_every_task_module_loads_nothing_from_models_or_policies():
    modules = _modules("rlm_train.tasks")
    assert "rlm_train.tasks.registry" in modules and "rlm_train.tasks.generate" in modules
    code = (
        "import importlib, json, sys\n"
        f"for m in {modules!r}:\n    importlib.import_module(m)\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('rlm_train'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=120)
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    assert {"rlm_train.models", "rlm_train.policies"} <= set(HIGHER)
    above = [m for m in loaded if _package_of(m) in HIGHER]
    assert above == [], f"importing rlm_train.tasks loaded higher layers: {above}"


def test_task_modules_import_only_foundations_even_lazily():
    for module in _modules("rlm_train.tasks"):
        for target in _project_imports(module):
            if _package_of(target) not in HIGHER:
                continue
            assert (module, target) in TASK_LAZY_EDGES, f"{module} imports {target}: tasks/ must stay at the bottom"


def test_no_project_module_imports_by_string_into_tasks_or_policies():
    # importlib by string hides an edge from every tool; tasks/ and policies/ use none.
    for package in ("rlm_train.tasks", "rlm_train.policies"):
        for module in _modules(package):
            path = PACKAGE.parent / (module.replace(".", "/") + ".py")
            if not path.exists():
                path = PACKAGE.parent / module.replace(".", "/") / "__init__.py"
            assert "import_module(" not in path.read_text(), f"{module} imports a module by string"


def test_no_package_level_import_cycle_through_tasks_or_policies():
    """The package graph from import statements (lazy ones included): nothing that tasks
    or policies imports leads back to them."""
    graph: dict[str, set[str]] = {}
    for module in _modules("rlm_train"):
        edges = graph.setdefault(_package_of(module), set())
        edges |= {_package_of(t) for t in _project_imports(module)} - {_package_of(module), "rlm_train"}

    def reachable(start: str) -> set[str]:
        seen, todo = set(), list(graph.get(start, ()))
        while todo:
            node = todo.pop()
            if node not in seen:
                seen.add(node)
                todo += graph.get(node, ())
        return seen

    for package in ("rlm_train.tasks", "rlm_train.policies"):
        assert package in graph
        back = [p for p in graph.get(package, ()) if package in reachable(p)]
        assert not back, f"{package} -> {back} -> ... -> {package}: a package import cycle"
    # The direction itself: models/ and tasks/ never import policies/.
    for package in ("rlm_train.models", "rlm_train.tasks"):
        assert "rlm_train.policies" not in graph.get(package, set()), package
    assert "rlm_train.tasks" not in graph.get("rlm_train.models", set())


def test_no_module_imports_the_cli():
    """`rlm_train.cli` is the top: commands, the pipeline and the launcher learn about stages from
    rlm_train/registry.py and run them as processes, never through the CLI's main(). A `__main__`
    script (`python -m rlm_train.bench`) is another way to start the CLI, not a module to import."""
    importers = [module for module in _modules("rlm_train") if module != "rlm_train.cli"
                 and not module.endswith(".__main__") and {"rlm_train.cli"} & _project_imports(module)]
    assert importers == []
    # `from rlm_train import cli` names it too.
    for module in _modules("rlm_train"):
        path = PACKAGE.parent / (module.replace(".", "/") + ".py")
        if not path.exists():
            path = PACKAGE.parent / module.replace(".", "/") / "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module == "rlm_train":
                assert "cli" not in {alias.name for alias in node.names}, module
