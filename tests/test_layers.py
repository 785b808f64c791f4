"""The layer contract, checked on the real import graph: every ``import`` in launcher/, at module level,
under TYPE_CHECKING or inside a function body (ast, nothing is imported).

- Packages depend only in the allowed directions (ALLOWED below): spec <- plan <- submit <- commands;
  plan and train read data; backends, train, collect and submit read and write run directories through
  rundir; rundir imports nothing above itself; collect reads run directories only; a rank (train) never
  imports plan, submit, backends or collect.
- No import circle, between packages or between modules.
- At most six modules at launcher's top level.
- No function in launcher/ longer than 120 lines.
"""

from __future__ import annotations

import ast
import functools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

LAUNCHER = Path(__file__).resolve().parent.parent / "launcher"

# What each package (or top-level module) may import besides itself. A package is launcher/<name>/, a
# top-level module launcher/<name>.py.
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "fit_table": set(),
    "launcher": set(),  # launcher/__init__.py: the version only
    "spec": {"errors"},
    # rundir: the run directory's files, one layer above the spec's typed field models. It may import
    # launcher.spec.schema (a leaf: pydantic, yaml, errors) for run.yaml's sections and nothing else of
    # spec (MODULE_RULES below).
    "rundir": {"errors", "spec"},
    "model": {"errors"},
    "data": {"errors"},
    # builtins writes its build manifest with the run directory's atomic writer.
    "builtins": {"errors", "rundir"},
    # convert caches what it converts through the built-in cache helper.
    "convert": {"errors", "builtins"},
    "plan": {"errors", "spec", "rundir", "data", "model", "builtins", "convert"},
    # backends: the container mounts the built-in cache (launcher.builtins.cache, a leaf).
    "backends": {"errors", "spec", "rundir", "builtins"},
    "train": {"errors", "spec", "rundir", "data", "model", "builtins"},
    "collect": {"errors", "rundir", "fit_table"},
    "submit": {"errors", "spec", "rundir", "plan", "backends", "collect", "fit_table"},
    "commands": {
        "errors",
        "fit_table",
        "spec",
        "rundir",
        "data",
        "model",
        "builtins",
        "convert",
        "plan",
        "backends",
        "train",
        "collect",
        "submit",
    },
    "cli": {"launcher", "errors", "commands"},
    "__main__": {"cli"},
}

# Finer rules where a package may import only some modules of another.
MODULE_RULES: dict[str, set[str]] = {
    # rundir may use the spec's typed field models, never its loader, checks or overrides.
    "rundir": {"launcher.spec.schema"},
}

# Leaf modules: what they may import of the launcher (rundir builds run.yaml from the spec's typed field
# models, so those import nothing of the launcher).
LEAF_MODULES: dict[str, set[str]] = {"launcher.spec.schema": set()}

# Named exceptions, each an (importing module, imported module) pair with its reason.
EXCEPTIONS: dict[tuple[str, str], str] = {
    # What a Slurm task runs on a compute node: the process entry there is the rank entrypoint and the
    # collector job, which submitit pickles by reference. Imported inside the task (torch, matplotlib).
    ("launcher.backends.slurm_task", "launcher.train.entry"): "the Slurm task's rank entrypoint",
    ("launcher.backends.slurm_task", "launcher.collect"): "the Slurm collector job",
    # The plan's truncation shares and eval set must be the rank's own, so it runs the rank's encoding
    # (imported inside a function, only when the data is on this machine).
    ("launcher.plan.data_facts", "launcher.train.data"): "the plan encodes the data as the rank does",
}

TOP_LEVEL_MODULES_MAX = 6

MAX_FUNCTION_LINES = 120


@dataclass(frozen=True)
class Import:
    importer: str
    imported: str
    line: int


def shown(path: Path) -> str:
    return str(path.relative_to(LAUNCHER.parent)) if path.is_relative_to(LAUNCHER.parent) else str(path)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(LAUNCHER.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def launcher_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(LAUNCHER.rglob("*.py"))}


def _resolved(node: ast.ImportFrom, importer: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = importer.split(".") if is_package else importer.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


@functools.cache
def parsed(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"))


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> Iterator[Import]:
    """Every launcher module ``name`` imports, wherever the import statement is."""
    tree = parsed(path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolved(node, name, path.name == "__init__.py")
            # `from launcher.collect import significance` imports the module launcher.collect.significance
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for target in targets:
            if target == "launcher" or target.startswith("launcher."):
                yield Import(name, target, node.lineno)


def layer_of(module: str) -> str:
    """The package (``plan``) or top-level module (``cli``) a launcher module belongs to."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "launcher"


def _module_rule_allows(src: str, dst: str, imported: str) -> bool:
    rules = MODULE_RULES.get(src, set())
    if dst not in {layer_of(m) for m in rules}:
        return True
    return any(imported == m or imported.startswith(m + ".") for m in rules)


def _module_rule_allows(src: str, dst: str, imported: str) -> bool:
    rules = MODULE_RULES.get(src, set())
    if dst not in {layer_of(m) for m in rules}:
        return True
    return any(imported == m or imported.startswith(m + ".") for m in rules)


def layer_violations(modules: dict[str, Path]) -> list[str]:
    found = []
    for name, path in modules.items():
        for imp in imports_of(name, path, modules):
            src, dst = layer_of(imp.importer), layer_of(imp.imported)
            if src == dst or (imp.importer, imp.imported) in EXCEPTIONS:
                continue
            where = f"{shown(path)}:{imp.line}: {imp.importer} imports {imp.imported}"
            if dst not in ALLOWED[src]:
                allowed = ", ".join(sorted(ALLOWED[src])) or "nothing"
                found.append(f"{where} ({src} may import only {allowed})")
            elif not _module_rule_allows(src, dst, imp.imported):
                found.append(
                    f"{where} ({src} may import only {', '.join(sorted(MODULE_RULES[src]))} of {dst})"
                )
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one node (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def module_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for imp in imports_of(name, path, modules):
            # a package's __init__ re-exporting its modules is not a circle of its own
            if imp.imported != name and not name.startswith(imp.imported + "."):
                graph[name].add(imp.imported)
    return graph


def package_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for name, targets in module_graph(modules).items():
        for target in targets:
            if layer_of(name) != layer_of(target) and (name, target) not in EXCEPTIONS:
                graph.setdefault(layer_of(name), set()).add(layer_of(target))
    return graph


def long_functions(modules: dict[str, Path]) -> list[str]:
    found = []
    for path in modules.values():
        for node in ast.walk(parsed(path)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = (node.end_lineno or node.lineno) - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    found.append(f"{shown(path)}:{node.lineno}: {node.name} ({lines} lines)")
    return found


def test_packages_import_only_in_the_allowed_directions() -> None:
    modules = launcher_modules()
    unknown = {layer_of(m) for m in modules} - set(ALLOWED)
    assert not unknown, f"packages without a place in the layer contract: {sorted(unknown)}"
    assert layer_violations(modules) == []


def test_leaf_modules_stay_leaves() -> None:
    modules = launcher_modules()
    for leaf, allowed in LEAF_MODULES.items():
        imported = {imp.imported for imp in imports_of(leaf, modules[leaf], modules)}
        assert imported <= allowed, f"{leaf} imports {sorted(imported - allowed)}"


def test_no_import_circle() -> None:
    modules = launcher_modules()
    assert cycles(package_graph(modules)) == []
    assert cycles(module_graph(modules)) == []


def test_at_most_six_modules_at_the_top_level() -> None:
    top = sorted(p.name for p in LAUNCHER.glob("*.py"))
    assert len(top) <= TOP_LEVEL_MODULES_MAX, top


def test_no_function_over_120_lines() -> None:
    assert long_functions(launcher_modules()) == []


@pytest.mark.parametrize(
    ("importer", "source", "expected"),
    [
        ("launcher.train._probe", "from launcher.plan.archs import ArchInfo\n", "train may import only"),
        ("launcher.rundir._probe", "def f():\n    from launcher.spec.check import did_you_mean\n", "of spec"),
        ("launcher.collect._probe", "if True:\n    import launcher.train.entry\n", "collect may import only"),
        ("launcher.backends._probe", "from launcher.submit import progress\n", "backends may import only"),
    ],
)
def test_the_contract_catches_a_violating_import(
    importer: str, source: str, expected: str, tmp_path: Path
) -> None:
    """A violation is found wherever the import sits: a probe module added to the real graph."""
    probe = tmp_path / "_probe.py"
    probe.write_text(source, encoding="utf-8")
    modules = {**launcher_modules(), importer: probe}
    assert any(expected in v for v in layer_violations(modules))


def test_the_contract_catches_a_circle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
