"""Import rules: data flows down, nothing below imports what is above it.

The package's import graph is read from the source (module-level and function-level imports alike, since a
function-level import is still a dependency): it has no cycle and follows the layers below. `dynamic-llava ask`
loads no benchmark, demo or training code; the CLI imports a subcommand's module only when it is chosen.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import json
import subprocess
import sys
from pathlib import Path

import dynamic_llava
from dynamic_llava.cli import _LazyParser, build_parser

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "dynamic_llava"

# Layers, bottom first, by the first name under dynamic_llava/: a module imports only from its own layer or
# lower ones (the cycle test rules out loops inside a layer). Every module of the package must be placed here.
LAYERS: list[tuple[str, ...]] = [
    ("errors", "constants"),  # import nothing from the package
    ("cpu_features", "conversation", "mm_utils"),
    ("model",),
    ("generation", "prompting", "sparsity_options", "model_options", "visualize", "tiny"),  # the inference API
    ("ask", "train", "tools", "eval", "serve", "data", "bench"),  # commands and applications
    ("demo",),  # the end-to-end chain: data, training, evaluation, benchmarks
    ("cli",),  # the `dynamic-llava` command: registers the commands above
    ("__init__",),  # the package namespace: lazy exports for Python users
]
# Beyond the layers: `ask`, the core command, never reaches these, even through a function-level import.
ASK_NEVER_IMPORTS = ("dynamic_llava.bench", "dynamic_llava.demo", "dynamic_llava.train", "dynamic_llava.eval",
                     "dynamic_llava.serve")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement, at any depth, except those under `if TYPE_CHECKING:` (never run)."""
    found: list[ast.Import | ast.ImportFrom] = []
    pending: list[ast.AST] = [tree]
    while pending:
        node = pending.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            pending.extend(node.orelse)
            continue
        pending.extend(ast.iter_child_nodes(node))
    return found


def import_graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(module -> the package's modules it imports, module -> the other modules and names it imports)."""
    files = {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}
    internal: dict[str, set[str]] = {}
    external: dict[str, set[str]] = {}
    for name, path in files.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        targets: set[str] = set()
        for node in _imports(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
                continue
            base = node.module or ""
            if node.level:  # relative: `from ..x import y` from a.b.c is a.x
                base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else []))
            targets.update(f"{base}.{alias.name}" for alias in node.names)
        internal[name] = set()
        external[name] = set()
        for target in targets:
            if target.split(".")[0] != "dynamic_llava":
                external[name].add(target)
                continue
            while target not in files:  # `from .module import function`: the module (a package: its __init__)
                target = target.rsplit(".", 1)[0]
            if target != name:
                internal[name].add(target)
    return internal, external


def _cycles(graph: dict[str, set[str]]) -> list[tuple[list[str], list[str]]]:
    """(its modules, one shortest cycle) for each strongly connected component of more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    components: list[set[str]] = []

    def visit(node: str) -> None:  # Tarjan
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in graph[node]:
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = set()
            while not component or member != node:
                member = stack.pop()
                component.add(member)
            if len(component) > 1:
                components.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    found = []
    for component in components:  # breadth-first from the first module back to itself
        start = min(component)
        paths = {start: [start]}
        queue = [start]
        cycle: list[str] = []
        while not cycle:
            node = queue.pop(0)
            for other in sorted(graph[node] & component):
                if other == start:
                    cycle = paths[node] + [start]
                    break
                if other not in paths:
                    paths[other] = paths[node] + [other]
                    queue.append(other)
        found.append((sorted(component), cycle))
    return found


def _layer(module: str) -> int:
    top = module.split(".")[1] if "." in module else "__init__"
    return next(rank for rank, layer in enumerate(LAYERS) if top in layer)


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, pending = {start}, [start]
    while pending:
        for other in graph[pending.pop()] - seen:
            seen.add(other)
            pending.append(other)
    return seen


def _inside(module: str, packages: tuple[str, ...]) -> bool:
    return any(module == package or module.startswith(package + ".") for package in packages)


def test_the_import_graph_has_no_cycle() -> None:
    internal, _ = import_graph()
    assert "dynamic_llava.cli" in internal and "dynamic_llava.model.llava" in internal
    cycles = _cycles(internal)
    assert not cycles, "import cycles:\n" + "\n".join(
        f"{len(modules)} modules {modules}, e.g. {' -> '.join(cycle)}" for modules, cycle in cycles)


def test_the_cycle_finder_reports_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e"}}
    assert _cycles(graph) == [(["a", "b", "c"], ["a", "b", "c", "a"])]  # a self-import is no cycle


def test_modules_import_only_their_layer_or_lower_ones() -> None:
    internal, _ = import_graph()
    unplaced = sorted(module for module in internal
                      if not any((module.split(".")[1] if "." in module else "__init__") in layer
                                 for layer in LAYERS))
    assert not unplaced, f"place these modules in a layer of LAYERS: {unplaced}"
    upward = sorted(f"{module} -> {target}" for module, targets in internal.items() for target in targets
                    if _layer(target) > _layer(module))
    assert not upward, "imports from a higher layer:\n" + "\n".join(upward)


def test_ask_reaches_no_benchmark_demo_training_evaluation_or_serving_code() -> None:
    internal, external = import_graph()
    reached = _reachable(internal, "dynamic_llava.ask")
    assert "dynamic_llava.model.llava" in reached  # the graph follows function-level imports
    assert not sorted(module for module in reached if _inside(module, ASK_NEVER_IMPORTS))
    assert not sorted(name for module in reached for name in external[module]
                      if "LlavaForConditionalGeneration" in name or name.startswith("transformers.models.llava"))


_PROBE = """
import json, sys
NEVER = ("dynamic_llava.bench", "dynamic_llava.demo", "dynamic_llava.train", "dynamic_llava.data",
         "transformers.models.llava")
def loaded():
    return sorted(m for m in sys.modules if any(m == p or m.startswith(p + ".") for p in NEVER))
from dynamic_llava.cli import main
def help_of(argv):
    try:
        main(argv)
    except SystemExit as exit:
        return exit.code
seen = {"--help": [help_of(["--help"]), loaded(), "dynamic_llava.ask" in sys.modules]}
import dynamic_llava.ask
seen["import"] = [0, loaded(), True]
seen["ask --help"] = [help_of(["ask", "--help"]), loaded(), True]
print(json.dumps(seen))
"""


def test_ask_and_the_top_level_help_import_no_benchmark_demo_or_training_code() -> None:
    result = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "{ask,make-tiny,convert,train,bench,data,demo}" in result.stdout  # the top-level help ran
    assert "--vision-keep-rate" in result.stdout  # and ask's
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen["--help"] == [0, [], False], seen  # the top-level help imports no subcommand at all
    assert seen["import"] == [0, [], True], seen
    assert seen["ask --help"] == [0, [], True], seen


def test_every_lazy_subcommand_names_a_module_with_add_arguments_and_run() -> None:
    pending = [build_parser()]
    modules = []
    while pending:
        parser = pending.pop()
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                pending.extend(action.choices.values())
        if isinstance(parser, _LazyParser) and parser._module is not None:
            modules.append(parser._module)
    assert len(modules) == 10  # ask, 4 bench, 1 data, 4 demo
    for module in modules:
        command = importlib.import_module(module, "dynamic_llava")
        assert callable(command.add_arguments) and callable(command.run), module


def test_the_package_exports_its_entry_points_lazily() -> None:
    for name in dynamic_llava.__all__:
        assert getattr(dynamic_llava, name) is not None
    assert dynamic_llava.generate.__module__ == "dynamic_llava.generation"
    assert {"load_pretrained_model", "generate", "prepare_request"} <= set(dir(dynamic_llava))
    code = "import sys, dynamic_llava; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stderr
