"""The house rules, checked from the source: one-way layers, no import cycles, the CLI a thin skin.

Every import statement in src/refusal_atlas is read with ``ast`` (module level, inside functions
and under ``TYPE_CHECKING`` alike: a lazy import is still a dependency), resolved to the module it
names, and checked against :data:`LAYERS`. docs/architecture.md explains the layers; a new module
goes into the layer of what it does, and this test fails until it has one.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"
PACKAGE = "refusal_atlas"

# Lowest first. A module may import its own layer and the layers before it, never a later one.
# An entry names a module or a package (which then covers every module under it); the longest
# entry that names a module decides its layer.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("core", ("refusal_atlas", "core")),
    ("data", ("data",)),
    ("model", ("model",)),
    # the edits: hooks and weight changes over a loaded model; evaluation measures models under them
    ("edits", ("edits",)),
    # below directions: selection and training score candidates with the refusal score and KL
    ("evaluation", ("evaluation",)),
    ("directions", ("directions",)),
    ("search", ("search",)),
    # formats people run, the reproducibility bundle, vLLM generation from an edited copy of the weights
    ("export", ("export",)),
    ("report", ("report",)),
    # the jobs and what they share: settings, fail-fast input checks, the notebook API
    ("workflows", ("workflows", "settings", "api")),
    ("cli", ("cli",)),
]
RANK = {name: rank for rank, (name, _) in enumerate(LAYERS)}
# Libraries that make a command line: only the cli layer may import them.
CLI_LIBRARIES = ("typer", "click", "rich")
# The estimators know nothing of jobs or run directories: they take tensors, a model and prompts.
NOT_FROM_DIRECTIONS = ("core.rundir", "workflows", "cli", "settings", "api")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted((SRC / PACKAGE).rglob("*.py"))}


def layer_of(module: str) -> str | None:
    """The layer of a dotted module name (``refusal_atlas.x.y``), or None when LAYERS misses it."""
    rel = module.removeprefix(PACKAGE).removeprefix(".")
    best, best_len = None, -1
    for layer, entries in LAYERS:
        for entry in entries:
            if entry == PACKAGE:
                matched = rel == ""
                length = 0
            else:
                matched = rel == entry or rel.startswith(entry + ".")
                length = entry.count(".") + 1
            if matched and length > best_len:
                best, best_len = layer, length
    return best


def imports_of(module: str, path: Path, known: set[str]) -> tuple[set[str], set[str]]:
    """(refusal_atlas modules, top-level third-party names) that ``path`` imports anywhere in it."""
    is_package = path.name == "__init__.py"
    package = module if is_package else module.rpartition(".")[0]
    internal, external = set(), set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                (internal if alias.name.split(".")[0] == PACKAGE else external).add(
                    alias.name if alias.name.split(".")[0] == PACKAGE else alias.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != PACKAGE:
                external.add(target.split(".")[0])
                continue
            for alias in node.names:  # `from pkg import sub` imports the module pkg.sub when there is one
                sub = f"{target}.{alias.name}"
                internal.add(sub if sub in known else target)
    internal.discard(module)
    return internal, external


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {m: imports_of(m, p, known)[0] for m, p in modules.items()}


def test_every_module_has_a_layer():
    missing = sorted(m for m in _modules() if layer_of(m) is None)
    assert not missing, f"add these modules to LAYERS in {Path(__file__).name} (and docs/architecture.md): {missing}"


def test_layer_lookup():
    """The lookup itself: longest entry wins, packages cover their modules, unknown names have none."""
    assert layer_of("refusal_atlas") == "core"
    assert layer_of("refusal_atlas.directions.select") == "directions"
    assert layer_of("refusal_atlas.workflows.run") == "workflows"
    assert layer_of("refusal_atlas.report.sections") == "report"
    assert layer_of("refusal_atlas.searcher") is None  # a prefix of a name is not the name
    assert layer_of("refusal_atlas.no_such_module") is None


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for module, deps in sorted(graph.items()):
        for dep in sorted(deps):
            if dep not in graph:
                bad.append(f"{module} imports {dep}, which does not exist")
            elif layer_of(dep) is None or layer_of(module) is None:
                continue  # test_every_module_has_a_layer names it
            elif RANK[layer_of(dep)] > RANK[layer_of(module)]:
                bad.append(f"{module} ({layer_of(module)}) imports {dep} ({layer_of(dep)})")
    return bad


def test_no_module_imports_a_higher_layer(graph):
    bad = upward_imports(graph)
    assert not bad, "imports against the flow:\n" + "\n".join(bad)


def test_upward_import_is_caught():
    """The check fails on a violation: a direction estimator importing the run job."""
    fake = {"refusal_atlas.directions.dim": {"refusal_atlas.workflows.run"}, "refusal_atlas.workflows.run": set()}
    assert upward_imports(fake) == ["refusal_atlas.directions.dim (directions) imports refusal_atlas.workflows.run "
                                    "(workflows)"]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
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
    return sorted(found)


def test_no_import_cycles(graph):
    found = cycles(graph)
    assert not found, "import cycles (lazy imports count):\n" + "\n".join(" <-> ".join(c) for c in found)


def test_cycle_is_caught():
    fake = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(fake) == [["a", "b", "c"]]


def test_only_the_cli_imports_cli_libraries():
    modules = _modules()
    known = set(modules)
    bad = sorted(f"{m} imports {lib}" for m, p in modules.items() if layer_of(m) != "cli"
                 for lib in imports_of(m, p, known)[1] if lib in CLI_LIBRARIES)
    assert not bad, "\n".join(bad)


def test_directions_know_no_jobs(graph):
    prefixes = tuple(f"{PACKAGE}.{name}" for name in NOT_FROM_DIRECTIONS)
    bad = sorted(f"{m} imports {d}" for m, deps in graph.items() if m.startswith(f"{PACKAGE}.directions")
                 for d in deps if any(d == p or d.startswith(p + ".") for p in prefixes))
    assert not bad, "\n".join(bad)


def test_cli_is_a_package_without_a_cycle_to_its_parent(graph):
    """Verb modules import shared helpers from cli.common, never the package that registers them."""
    cli_modules = [m for m in graph if m.startswith(f"{PACKAGE}.cli.")]
    assert f"{PACKAGE}.cli.app" in cli_modules and f"{PACKAGE}.cli.__main__" in cli_modules
    bad = sorted(f"{m} imports {d}" for m in cli_modules for d in graph[m]
                 if d == f"{PACKAGE}.cli" or (d == f"{PACKAGE}.cli.app" and m != f"{PACKAGE}.cli.__main__"))
    assert not bad, "\n".join(bad)


# Forward hooks are registered only through model/hooks.py, whose handle removes them together (on error too).
HOOK_REGISTRATIONS = ("register_forward_hook", "register_forward_pre_hook")
HOOKS_MODULE = f"{PACKAGE}.model.hooks"


def direct_hook_registrations(source: str, filename: str = "<source>") -> list[int]:
    """Lines of ``source`` that call a module's forward-hook registration directly (``x.register_forward_hook``)."""
    return sorted(node.lineno for node in ast.walk(ast.parse(source, filename))
                  if isinstance(node, ast.Attribute) and node.attr in HOOK_REGISTRATIONS)


def test_forward_hooks_are_registered_only_through_model_hooks():
    bad = sorted(f"{m}:{line}" for m, p in _modules().items() if m != HOOKS_MODULE
                 for line in direct_hook_registrations(p.read_text(), str(p)))
    assert not bad, "register forward hooks through refusal_atlas.model.hooks (Hooks / hook_inputs / hook_outputs):\n" \
                    + "\n".join(bad)
    assert direct_hook_registrations((SRC / PACKAGE / "model" / "hooks.py").read_text())  # the one place that does


def test_direct_hook_registration_is_caught():
    src = ("h = layer.register_forward_pre_hook(fn, with_kwargs=True)\nx = 1\n"
           "g = getattr(m, 'x').register_forward_hook(f)\n")
    assert direct_hook_registrations(src) == [1, 3]
