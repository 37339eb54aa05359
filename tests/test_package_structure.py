"""The package's rooms keep their rules: no import cycles, torch internals in one module, the facade unimported.

Read from the source (AST), so a rule broken by a lazy import inside a function is caught too. Imports
under ``if TYPE_CHECKING:`` do not run and are not counted.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_cp"
#: The one module allowed to use private torch names (Note in its docstring).
TORCH_INTERNALS = "lightning_cp.attention._torch"
#: The modules that may import Lightning: the strategies, the callbacks, and the public re-export.
LIGHTNING_ROOMS = ("lightning_cp.strategies", "lightning_cp.callbacks", "lightning_cp.fabric")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, ast.Module]:
    return {_module_name(path): ast.parse(path.read_text()) for path in sorted(PACKAGE.rglob("*.py"))}


def _runtime_nodes(tree: ast.Module) -> list[ast.AST]:
    """Every node of ``tree`` except those under ``if TYPE_CHECKING:``."""
    nodes, stack = [], [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            stack.extend(node.orelse)
            continue
        nodes.append(node)
        stack.extend(ast.iter_child_nodes(node))
    return nodes


def _imports(tree: ast.Module) -> list[tuple[str, list[str]]]:
    """``(module, imported names)`` for every runtime import statement."""
    found = []
    for node in _runtime_nodes(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, [alias.name for alias in node.names]))
    return found


def _package_edges(modules: dict[str, ast.Module]) -> dict[str, set[str]]:
    """Which package modules each package module imports (a name that is a submodule counts as one)."""
    edges: dict[str, set[str]] = {name: set() for name in modules}
    for name, tree in modules.items():
        for module, names in _imports(tree):
            if not module.startswith("lightning_cp"):
                continue
            submodules = {f"{module}.{n}" for n in names if f"{module}.{n}" in modules}
            edges[name].update(submodules)
            if not names or len(submodules) < len(names):  # a name from the module itself, not a submodule
                edges[name].add(module)
    return edges


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module, or a module importing itself (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in edges.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in edges.get(node, ()):
                components.append(sorted(component))

    for node in edges:
        if node not in index:
            visit(node)
    return components


def _private_torch_uses(tree: ast.Module) -> list[str]:
    """Private torch names a module uses: ``torch._x`` modules or names, and ``torch._x`` attributes."""
    found = []
    for module, names in _imports(tree):
        if module.split(".")[0] == "torch":
            if any(part.startswith("_") for part in module.split(".")):
                found.append(module)
            found += [f"{module}.{n}" for n in names if n.startswith("_")]
        package, private = TORCH_INTERNALS.rsplit(".", 1)
        if module == TORCH_INTERNALS or (module == package and private in names):
            found.append(TORCH_INTERNALS)
    for node in _runtime_nodes(tree):
        if isinstance(node, ast.Attribute):
            chain = ast.unparse(node)
            if chain.startswith("torch.") and any(part.startswith("_") for part in chain.split(".")[1:]):
                found.append(chain)
    return found


def test_no_module_takes_part_in_an_import_cycle():
    assert _cycles(_package_edges(_modules())) == []


def test_only_the_attention_room_touches_torch_internals():
    offenders = {
        name: uses
        for name, tree in _modules().items()
        if not name.startswith("lightning_cp.attention") and (uses := _private_torch_uses(tree))
    }
    assert offenders == {}


def test_the_nemo_facade_is_imported_by_no_module_inside_the_package():
    importers = [
        name
        for name, tree in _modules().items()
        if name != "lightning_cp" and any(module == "lightning_cp.functional" for module, _ in _imports(tree))
    ]
    assert importers == []


def test_only_strategies_and_callbacks_import_lightning():
    importers = [
        name
        for name, tree in _modules().items()
        if not name.startswith(LIGHTNING_ROOMS) and any(m.split(".")[0] == "lightning" for m, _ in _imports(tree))
    ]
    assert importers == []


def test_the_checks_catch_what_they_look_for():
    """Negative control: each rule fires on a small module that breaks it."""
    planted = ast.parse(
        "import torch\n"
        "from torch.distributed.tensor.experimental._context_parallel import _attention\n"
        "def f():\n    return torch._dynamo.disable\n"
    )
    uses = _private_torch_uses(planted)
    assert "torch.distributed.tensor.experimental._context_parallel" in uses and "torch._dynamo.disable" in uses
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _imports(ast.parse("def g():\n    from lightning_cp.functional import gather_cp_seq\n")) == [
        ("lightning_cp.functional", ["gather_cp_seq"])
    ]
    hidden = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import lightning\n")
    assert _imports(hidden) == [("typing", ["TYPE_CHECKING"])]


_IMPORTED_FIRST_THEN_LIGHTNING = """
import sys
import lightning_cp
print("lightning imported by lightning_cp:", "lightning" in sys.modules)
import lightning
from lightning.fabric.strategies import STRATEGY_REGISTRY
from lightning.pytorch.strategies import StrategyRegistry
print("registered:", "context_parallel" in STRATEGY_REGISTRY, "context_parallel" in StrategyRegistry)
print("strategy:", lightning_cp.ContextParallelStrategy.__name__)
"""


def test_lightning_is_imported_on_demand_and_the_strategy_names_still_registered():
    """``import lightning_cp`` leaves Lightning out (its ranks of the functional API and the doctor start about 5 s
    sooner), and a script that imports Lightning afterwards still finds ``strategy="context_parallel"``."""
    command = [sys.executable, "-c", _IMPORTED_FIRST_THEN_LIGHTNING]
    result = subprocess.run(command, capture_output=True, text=True, cwd=PACKAGE.parent, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "lightning imported by lightning_cp: False" in result.stdout, result.stdout
    assert "registered: True True" in result.stdout, result.stdout
    assert "strategy: ContextParallelStrategy" in result.stdout
