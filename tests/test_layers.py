"""The library's layers: no module imports one that sits above it (lazy imports inside functions included), the
library never imports the service, and the CLI and the service's workers reach the engine through one function."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Lowest first. A module may import modules of its own layer or below.
LAYERS = [
    {"__init__", "paths", "atomic", "special_tokens", "features"},  # no torch model, no file format
    {"models", "transcoders", "formats", "encoder", "generate"},  # models; dictionaries on disk, their encoders
    {"windows", "templates"},  # text: token windows, templates
    {"activation", "objective", "output_tokens", "similar"},  # measuring a feature on tokens
    {"maxima", "maxima_checkpoint", "engine"},  # the maxima pass, the search (the engine package)
    {"dream_cache", "dashboard"},  # dream results on disk; the feature page
    {"bundle"},  # model + transcoder + corpus + maxima in one directory
    {"maxima_ray"},  # the maxima pass sharded over Ray actors
    {"explorer"},  # the Python API over a bundle
    {"exports"},  # dashboards for other tools
    {"build"},  # building: corpus, training, evaluation, the default bundle, bundle create (the package)
    {"cli"},  # the command
]
RANK = {module: rank for rank, layer in enumerate(LAYERS) for module in layer}


def imports(path: Path) -> set[str]:
    """The top-level packages and `dreaming.X` modules (or packages) a module imports, anywhere in it (but for type
    checkers alone); a package's modules count as one."""
    if path.is_dir():
        return set().union(*(imports(file) for file in sorted(path.glob("*.py"))))
    tree = ast.parse(path.read_text())
    typing_only = {id(inner) for node in ast.walk(tree) if isinstance(node, ast.If)
                   and getattr(node.test, "id", None) == "TYPE_CHECKING" for inner in ast.walk(node)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] if node.module != "dreaming" else [f"dreaming.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        found |= {".".join(name.split(".")[:2]) if name.startswith("dreaming.") else name.split(".")[0]
                  for name in names}
    return found


def library_modules() -> dict[str, Path]:
    """The library's modules and packages (a package is one unit of the layers, like a module)."""
    return {path.stem: path for path in sorted((ROOT / "dreaming").iterdir())
            if path.suffix == ".py" or (path / "__init__.py").exists()}


def test_every_library_module_has_a_layer():
    assert set(library_modules()) <= set(RANK), f"place these in LAYERS: {set(library_modules()) - set(RANK)}"


def test_no_library_module_imports_one_above_it_or_the_service():
    for module, path in library_modules().items():
        for imported in imports(path):
            assert imported != "service", f"dreaming/{module}.py imports the service"
            if imported.startswith("dreaming."):
                other = imported.removeprefix("dreaming.")
                assert RANK[other] <= RANK[module], (f"dreaming/{module}.py (layer {RANK[module]}) imports "
                                                     f"{other} (layer {RANK[other]}), which sits above it")


def test_no_import_cycle_within_a_layer():
    graph = {module: {i.removeprefix("dreaming.") for i in imports(path) if i.startswith("dreaming.")} - {module}
             for module, path in library_modules().items()}

    def reaches(start: str, goal: str, seen: set) -> bool:
        return any(nxt == goal or (nxt not in seen and reaches(nxt, goal, seen | {nxt})) for nxt in graph[start])

    assert not [module for module in graph if reaches(module, module, {module})]


def calls_engine(path: Path) -> bool:
    """Does the file call the engine's `dreaming.engine.dream_many` (by that name)?"""
    tree = ast.parse(path.read_text())
    from_engine = any(isinstance(n, ast.ImportFrom) and n.module in ("dreaming.engine", "dreaming.engine.run") and
                      any(a.name == "dream_many" for a in n.names) for n in ast.walk(tree))
    attribute = any(isinstance(n, ast.Attribute) and n.attr == "dream_many" and isinstance(n.value, ast.Name)
                    and n.value.id in ("engine", "run") for n in ast.walk(tree))
    return from_engine or attribute


def test_the_cli_and_the_workers_reach_the_engine_through_one_function():
    callers = {path.relative_to(ROOT).as_posix() for folder in ("dreaming", "service")
               for path in (ROOT / folder).rglob("*.py") if calls_engine(path)
               and not path.is_relative_to(ROOT / "dreaming" / "engine")}
    assert callers == {"dreaming/explorer.py"}
    for path in (ROOT / "dreaming/cli.py", ROOT / "service/workers.py"):
        assert ".dream_many(" in path.read_text(), f"{path.name} dreams through Explorer.dream_many"


def test_the_read_path_never_imports_the_build_package():
    """Serving never loads the training code: no module of the service (its app, routes and Ray workers) imports
    `dreaming.build` or the CLI (which may), anywhere in it, and the layers keep every library module it reaches
    below `build`; importing the app, the workers and the explorer leaves `dreaming.build` unloaded."""
    for path in sorted((ROOT / "service").rglob("*.py")):
        assert not {"dreaming.build", "dreaming.cli"} & imports(path), f"{path.relative_to(ROOT)} imports building"
    loaded = subprocess.run(
        [sys.executable, "-c", "import sys, service.app, service.workers, dreaming.explorer, dreaming.exports; "
         "print(sorted(m for m in sys.modules if m.startswith('dreaming.build')))"],
        cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"
