"""The package's import graph: no circles (counting imports inside functions, which only hide a
circle until the day someone moves them), and a core that knows nothing of Ray or MLflow."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "wsol_core"
CORE = ("wsol_core.methods", "wsol_core.models", "wsol_core.metrics")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_only(tree: ast.AST) -> set[int]:
    """ids of the import nodes under ``if TYPE_CHECKING:`` (never executed)."""
    hidden: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            hidden |= {id(sub) for stmt in node.body for sub in ast.walk(stmt)}
    return hidden


def import_graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """``module -> project modules it imports`` (a package counts as imported with any of its
    modules, as Python runs its ``__init__``), and ``module -> top-level outside packages``."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}

    def owner(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    inside: dict[str, set[str]] = {m: set() for m in modules}
    outside: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        tree = ast.parse(path.read_text())
        hidden = _type_checking_only(tree)
        for node in ast.walk(tree):
            if id(node) in hidden:
                continue
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                targets = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                continue
            for target in targets:
                if target.split(".")[0] != "wsol_core":
                    outside[module].add(target.split(".")[0])
                    continue
                found = owner(target)
                if found and found != module:
                    inside[module].add(found)
                    parts = found.split(".")
                    inside[module] |= {
                        ".".join(parts[:i])
                        for i in range(2, len(parts))
                        if ".".join(parts[:i]) in modules and not module.startswith(".".join(parts[:i]) + ".")
                    }
        inside[module].discard(module)
    return inside, outside


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_package_has_no_import_circles():
    inside, _ = import_graph()
    assert circles(inside) == []


def test_the_check_finds_a_circle():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_core_imports_no_ray_no_mlflow_and_nothing_above_it():
    inside, outside = import_graph()
    for module in inside:
        if module.startswith(CORE):
            assert not outside[module] & {"ray", "mlflow"}, (module, outside[module])
            above = {
                t
                for t in inside[module]
                if t.startswith(("wsol_core.train", "wsol_core.experiments", "wsol_core.commands"))
            }
            assert not above, (module, above)


#: The outer layers, bottom up (ARCHITECTURE.md): a module may import its own layer and those below.
LAYERS = (
    (
        "wsol_core.config",
        "wsol_core.config_fields",
        "wsol_core.checkpoint",
        "wsol_core.data",
        "wsol_core.models",
        "wsol_core.methods",
        "wsol_core.metrics",
        "wsol_core.viz",
        "wsol_core.localize",
        "wsol_core.cli",
        "wsol_core.presets",
    ),
    ("wsol_core.tracking", "wsol_core.reporting"),
    ("wsol_core.train",),
    ("wsol_core.experiments",),
    ("wsol_core.commands",),
)


def layer_of(module: str) -> int:
    for rank, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return rank
    raise AssertionError(f"{module} is in no layer of LAYERS: place it in ARCHITECTURE.md and here")


def up_arrows(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    return sorted(
        (m, t) for m, targets in graph.items() for t in targets if t != "wsol_core" and layer_of(t) > layer_of(m)
    )


def test_every_import_points_down_the_layers():
    inside, _ = import_graph()
    for module in inside:  # every module has its place
        if module != "wsol_core":
            layer_of(module)
    assert up_arrows(inside) == []


def test_the_layer_check_finds_an_up_arrow():
    assert up_arrows({"wsol_core.train.loop": {"wsol_core.experiments.trials", "wsol_core.config"}}) == [
        ("wsol_core.train.loop", "wsol_core.experiments.trials")
    ]


def test_ray_train_is_built_in_one_place():
    """``TorchTrainer`` is constructed only by wsol_core.train.trainer."""
    builders = sorted(
        str(p.relative_to(PACKAGE.parent)) for p in PACKAGE.rglob("*.py") if "TorchTrainer(" in p.read_text()
    )
    assert builders == ["wsol_core/train/trainer.py"]
