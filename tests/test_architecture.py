"""The house's rules, checked on the source: layers import only from below, no cycles, small modules, one method
protocol.

ARCHITECTURE.md states these rules; this file keeps them true as the code changes."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "polypeft"
# Bottom-up: a module may import from its own layer's package and from any layer listed before it.
LAYERS = ["core", "data", "training", "methods", "model", "backbones", "interventions", "tasks", "experiments", "cli"]
MAX_LINES = 450


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def runtime_nodes(tree: ast.AST):
    """Every node that runs, at top level or inside functions: `if TYPE_CHECKING:` blocks only name types."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", getattr(node.test, "attr", None)) == "TYPE_CHECKING":
            yield from (n for child in node.orelse for n in [child, *runtime_nodes(child)])
            continue
        yield node
        yield from runtime_nodes(node)


def imported_modules(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """Every polypeft module `name` imports at run time, at top level or inside functions (the package root
    only holds `__version__` and the lazy public API, so importing it for the version is no dependency)."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in runtime_nodes(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            target = ".".join(base + (node.module.split(".") if node.module else []))
            for alias in node.names:
                candidate = f"{target}.{alias.name}"
                found.add(candidate if candidate in known else target)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m in known and m not in (name, "polypeft")}


def string_imports(path: Path) -> list[int]:
    """Places that load a module by name at run time (importlib.import_module, __import__): an import the
    statement-reading checks above cannot see, so a layer could depend on one above it unnoticed."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not isinstance(node, ast.Call):
            continue
        function = node.func
        name = function.attr if isinstance(function, ast.Attribute) else getattr(function, "id", "")
        if name in ("import_module", "__import__"):
            found.append(node.lineno)
    return found


def layer_of(name: str) -> int | None:
    parts = name.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else None


def test_layers_import_only_from_below():
    known = modules()
    wrong = []
    for name, path in known.items():
        own = layer_of(name)
        if own is None:
            continue  # polypeft/__init__.py: the public API may gather from every layer
        for target in imported_modules(name, path, known):
            theirs = layer_of(target)
            if theirs is None or theirs > own:
                wrong.append(f"{name} imports {target}")
    assert not wrong, "imports against the layering of ARCHITECTURE.md:\n" + "\n".join(sorted(wrong))


def test_no_module_imports_by_string():
    """Only the package root loads its public names lazily by string; every other import is a statement."""
    found = [f"{path.relative_to(PACKAGE)}:{line}" for path in PACKAGE.rglob("*.py") if path != PACKAGE / "__init__.py"
             for line in string_imports(path)]
    assert not found, "modules imported by string (write an import statement instead):\n" + "\n".join(found)


def test_the_string_import_check_sees_both_spellings(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("import importlib\nimportlib.import_module('polypeft.methods')\nx = __import__('polypeft')\n")
    assert string_imports(probe) == [2, 3]


def test_core_names_no_method():
    """The core knows no method: no string in it is a registered method's name (the registry lives above)."""
    from polypeft.methods.registry import registered_methods

    names = set(registered_methods())
    found = [f"{path.relative_to(PACKAGE)}:{node.lineno} {node.value!r}" for path in (PACKAGE / "core").rglob("*.py")
             for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
             if isinstance(node, ast.Constant) and node.value in names]
    assert not found, "core/ names methods (declare a trait on the config or layer instead):\n" + "\n".join(found)


def protocol_breaks(layer_classes) -> list[str]:
    """Routed layers that step outside the one protocol: a layer implements `routed_delta` and leaves `forward`
    (routes, merge state, bypass, torch.compile) to `RoutedLinear`."""
    from polypeft.core.routed import RoutedLinear

    return [f"{cls.__module__}.{cls.__name__}: " + ("overrides forward" if "forward" in vars(cls)
                                                   else "has no routed_delta") for cls in layer_classes
            if "forward" in vars(cls) or cls.routed_delta is RoutedLinear.routed_delta]


def routed_layer_classes(base: type) -> list[type]:
    return [found for cls in base.__subclasses__() for found in (cls, *routed_layer_classes(cls))]


def test_every_method_is_one_config_and_one_routed_layer():
    """Each registered method: a config on MethodConfig, and layers that implement only the routed delta."""
    from polypeft.core.method_config import MethodConfig
    from polypeft.core.routed import RoutedLinear
    from polypeft.methods.registry import registered_methods

    configs = [name for name, entry in registered_methods().items() if not issubclass(entry.config_class, MethodConfig)]
    assert not configs, f"methods whose config is not a MethodConfig: {configs}"
    layers = [cls for cls in routed_layer_classes(RoutedLinear) if cls.__module__.startswith("polypeft.methods")]
    assert len(layers) >= len(registered_methods())
    assert not protocol_breaks(layers), "routed layers outside the protocol:\n" + "\n".join(protocol_breaks(layers))


def test_the_protocol_check_sees_a_forward_of_its_own():
    from polypeft.core.routed import RoutedLinear

    class OwnForward(RoutedLinear):
        def forward(self, x):
            return x

    class NoDelta(RoutedLinear):
        pass

    assert protocol_breaks([OwnForward, NoDelta]) == [f"{__name__}.OwnForward: overrides forward",
                                                      f"{__name__}.NoDelta: has no routed_delta"]


def test_no_import_cycle():
    known = modules()
    graph = {name: imported_modules(name, path, known) - {"polypeft"} for name, path in known.items()}
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for target in graph[node]:
            if state.get(target) == 1:
                raise AssertionError("import cycle: " + " -> ".join(trail[trail.index(target):] + [node, target]))
            if target not in state:
                visit(target, trail + [node])
        state[node] = 2

    for name in graph:
        if name not in state:
            visit(name, [])


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_modules_stay_small(path):
    lines = len(path.read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(PACKAGE)} has {lines} lines; split it by job (at most {MAX_LINES})"


def test_one_place_calls_backward():
    calls = [f"{p.relative_to(PACKAGE)}:{node.lineno}" for p in PACKAGE.rglob("*.py")
             for node in ast.walk(ast.parse(p.read_text(encoding="utf-8")))
             if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "backward"]
    assert len(calls) == 1, f"backward() is called in {calls}: the one training loop should be the only place"


def test_public_api_is_an_explicit_list():
    tree = ast.parse((PACKAGE / "__init__.py").read_text(encoding="utf-8"))
    assigned = [node.value for node in tree.body if isinstance(node, ast.Assign)
                and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets)]
    assert len(assigned) == 1 and isinstance(assigned[0], ast.List), "__all__ must be one literal list"
    names = [element.value for element in assigned[0].elts]
    import polypeft

    assert len(names) == len(set(names)), "__all__ lists a name twice"
    missing = [n for n in names if not hasattr(polypeft, n)]
    assert not missing, f"__all__ names what polypeft does not define: {missing}"
    unlisted = sorted((set(polypeft._WHERE) | set(polypeft._MODULES)) - set(names))
    assert not unlisted, f"the lazy import table exports names __all__ does not list: {unlisted}"


# The project's own experiments and their material: importable from their modules, never the library's API.
EXPERIMENT_MODULES = (".experiments", ".data.bible")
EXPERIMENT_NAMES = ("BibleCorpus", "BibleSplit", "BIBLE_VERSIONS", "bible_spm", "QUERY_PREFIX", "PASSAGE_PREFIX",
                    "run_recipe", "FLARE_RECIPES")


def test_the_public_api_is_the_library():
    import polypeft

    from_experiments = sorted(name for name, (module, _) in polypeft._WHERE.items()
                              if module.startswith(EXPERIMENT_MODULES))
    assert not from_experiments, f"polypeft.__all__ exports the project's experiments: {from_experiments}"
    assert not set(EXPERIMENT_NAMES) & set(polypeft.__all__)


@pytest.mark.parametrize("name", EXPERIMENT_NAMES)
def test_names_moved_to_the_experiments_still_import_with_a_warning(name):
    import polypeft

    with pytest.warns(DeprecationWarning, match=rf"polypeft\.{name} is part of the project's experiments"):
        assert getattr(polypeft, name) is not None
