"""The package's module graph: layers, import circles, up-arrows, and line counts.

    uv run python benchmarks/module_graph.py                # this checkout -> benchmarks/results/module_graph.json
    uv run python benchmarks/module_graph.py --root /tmp/old --out old.json   # another checkout (before/after)

The same functions back ``tests/test_import_graph.py``: imports inside functions count (they
only hide a circle until the day someone moves them), ``TYPE_CHECKING`` imports do not, and a
package counts as imported with any of its modules (Python runs its ``__init__``).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "wsol_core"
CORE = ("wsol_core.methods", "wsol_core.models", "wsol_core.metrics")


def _module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_only(tree: ast.AST) -> set[int]:
    """ids of the import nodes under ``if TYPE_CHECKING:`` (never executed)."""
    hidden: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            hidden |= {id(sub) for stmt in node.body for sub in ast.walk(stmt)}
    return hidden


def import_graph(package: Path = PACKAGE) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """``module -> project modules it imports`` (a package counts as imported with any of its
    modules, as Python runs its ``__init__``), and ``module -> top-level outside packages``."""
    modules = {_module_name(p, package): p for p in package.rglob("*.py")}

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
        "wsol_core.extraction",
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


def layer_or_none(module: str) -> int | None:
    try:
        return layer_of(module)
    except AssertionError:
        return None


#: The files issue 18 named, before (one file each) and after (their packages).
NAMED = (
    "wsol_core/search.py",
    "wsol_core/sweep.py",
    "wsol_core/reporting.py",
    "wsol_core/train/driver.py",
    "wsol_core/config.py",
    "cluster/ray_on_slurm.py",
    "wsol_core/experiments",
    "wsol_core/reporting",
    "wsol_core/train/trainer.py",
    "wsol_core/train/preflight.py",
)


def report(root: Path) -> dict:
    """The graph of the checkout at ``root``: modules per layer (``null``: in no layer of LAYERS),
    circles, up-arrows, core modules importing Ray or MLflow, files building a TorchTrainer, and
    line counts of the named files."""
    package = root / "wsol_core"
    inside, outside = import_graph(package)
    per_layer: dict[str, int] = {}
    for module in inside:
        key = str(layer_or_none(module))
        per_layer[key] = per_layer.get(key, 0) + 1
    arrows = sorted(
        (m, t)
        for m, ts in inside.items()
        for t in ts
        if t != "wsol_core" and None not in (layer_or_none(m), layer_or_none(t)) and layer_or_none(t) > layer_or_none(m)
    )
    lines = {}
    for name in NAMED:
        path = root / name
        files = sorted(path.rglob("*.py")) if path.is_dir() else [path] if path.is_file() else []
        if files:
            lines[name] = sum(len(f.read_text().splitlines()) for f in files)
    return {
        "modules": len(inside),
        "modules_per_layer": per_layer,
        "circles": circles(inside),
        "up_arrows": [list(a) for a in arrows],
        "core_importing_ray_or_mlflow": sorted(
            m for m in inside if m.startswith(CORE) and outside[m] & {"ray", "mlflow"}
        ),
        "torch_trainer_built_in": sorted(
            str(p.relative_to(root))
            for p in list(package.rglob("*.py")) + list((root / "jobs").glob("*.py"))
            if "TorchTrainer(" in p.read_text()
        ),
        "lines": lines,
    }


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=str(PACKAGE.parent), help="a checkout of this repository")
    parser.add_argument("--out", default=str(PACKAGE.parent / "benchmarks" / "results" / "module_graph.json"))
    args = parser.parse_args(argv)
    result = report(Path(args.root).resolve())
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
