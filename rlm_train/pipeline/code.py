"""The code a stage depends on, and its hash (part of the stage's fingerprint).

The code is the stage's module and every rlm_train module it imports, at any depth and at any
level (command modules import their work inside functions), with the `__init__.py` of each
package on the way (of which only what importing the package runs: its module-level imports), plus the data files of those packages (chat templates, page assets: files in
the package's own directory or in sub-directories that are not packages).

The hash is of each module's syntax tree with its docstrings dropped (`ast.dump` keeps no
comments, line numbers or formatting) and of the data files' bytes: a comment or docstring edit
reruns nothing, any change to code or to a template reruns the stages that import it.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
from pathlib import Path

import rlm_train
from rlm_train.stage import Stage

PACKAGE = "rlm_train"
PACKAGE_ROOT = Path(rlm_train.__file__).resolve().parent
_SKIP_DIRS = {"__pycache__"}
_cache: dict[tuple[str, int, int], tuple[str, list[str]]] = {}  # file -> (normalized source, imports it follows)


def _module_file(name: str, root: Path) -> Path | None:
    """The file of `rlm_train.a.b` under `root` (a module or a package's __init__.py)."""
    parts = name.split(".")[1:]
    base = root.joinpath(*parts)
    candidates = [base.with_suffix(".py"), base / "__init__.py"] if parts else [root / "__init__.py"]
    return next((candidate for candidate in candidates if candidate.is_file()), None)


def _without_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
    return tree


def _imports(tree: ast.Module, module: str, is_package: bool) -> list[str]:
    """The rlm_train modules `tree` imports (relative imports resolved; `from pkg import name`
    counts pkg.name too, which is a module when such a file exists): every import of a module,
    the module-level ones of a package's __init__."""
    package = module if is_package else module.rpartition(".")[0]
    found: list[str] = []
    for node in (tree.body if is_package else ast.walk(tree)):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            found.append(source)
            found += [f"{source}.{alias.name}" for alias in node.names]
    return [name for name in found if name == PACKAGE or name.startswith(PACKAGE + ".")]


def _parsed(path: Path, module: str) -> tuple[str, list[str]]:
    """(normalized source, imports) of one file, cached by path, size and mtime."""
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _cache:
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        imports = _imports(tree, module, path.name == "__init__.py")
        _cache[key] = (ast.dump(_without_docstrings(tree)), imports)
    return _cache[key]


def _parents(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def module_closure(module: str, root: Path | None = None) -> dict[str, Path]:
    """Module name -> file, for `module` and everything it imports within rlm_train (the start
    module may live outside the package: a plugin stage)."""
    root = root or PACKAGE_ROOT
    start = _module_file(module, root) if module.startswith(PACKAGE + ".") else None
    if start is None:
        spec = importlib.util.find_spec(module)
        start = Path(spec.origin) if spec is not None and spec.origin else None
    if start is None:
        return {}
    found: dict[str, Path] = {module: start}
    todo = [module]
    while todo:
        name = todo.pop()
        _, imports = _parsed(found[name], name)
        for target in [*imports, *_parents(name)]:
            if target in found or not target.startswith(PACKAGE):
                continue
            path = _module_file(target, root)
            if path is not None:
                found[target] = path
                todo.append(target)
    return found


def data_files(modules: dict[str, Path]) -> list[Path]:
    """The non-Python files of the packages those modules belong to (a package's own directory and its
    sub-directories that are not packages: models/templates/, viewer/assets/)."""
    directories = {path.parent for path in modules.values()}
    out: set[Path] = set()
    for directory in directories:
        todo = [directory]
        while todo:
            current = todo.pop()
            for entry in current.iterdir():
                if entry.is_dir():
                    if entry.name not in _SKIP_DIRS and not (entry / "__init__.py").exists():
                        todo.append(entry)
                elif entry.suffix not in (".py", ".pyc"):
                    out.add(entry)
    return sorted(out)


def code_digest(stage: Stage, root: Path | None = None) -> str:
    """The hash of the code `stage` depends on (see the module docstring)."""
    root = root or PACKAGE_ROOT
    modules = module_closure(stage.module, root)
    digest = hashlib.sha256()
    for name in sorted(modules):
        digest.update(name.encode() + b"\0" + _parsed(modules[name], name)[0].encode() + b"\0")
    for path in data_files(modules):
        label = path.relative_to(root) if path.is_relative_to(root) else path.name
        digest.update(str(label).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]
