"""Every module of both packages imports on its own, no import cycle hides behind a function-level import, and
every import follows the layers: a module imports only from its own package and from lower layers."""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("wm_trainer", "extensions")


def module_files() -> dict[str, Path]:
    """Dotted module name -> source file, for every module of ``PACKAGES`` (packages as their ``__init__``)."""
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


MODULES = module_files()


def _package_of(name: str) -> str:
    """The package a relative import in module ``name`` is resolved against."""
    return name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]


def _resolve(name: str, node: ast.ImportFrom) -> str:
    """The absolute module an ``ImportFrom`` in module ``name`` names (before its imported names)."""
    if not node.level:
        return node.module or ""
    base = _package_of(name)
    for _ in range(node.level - 1):
        base = base.rpartition(".")[0]
    return f"{base}.{node.module}" if node.module else base


def _nearest_module(target: str) -> str | None:
    """``target`` or its nearest enclosing module among ours (``a.b.fn`` -> ``a.b``); None if not ours."""
    while target:
        if target in MODULES:
            return target
        target = target.rpartition(".")[0]
    return None


def imports_of(name: str) -> set[str]:
    """Our modules that module ``name`` imports anywhere in its source: at the top, in functions, in classes."""
    tree = ast.parse(MODULES[name].read_text(), str(MODULES[name]))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            source = _resolve(name, node)
            # ``from pkg import sub`` imports the submodule when ``sub`` is one; otherwise it names an attribute.
            targets = [f"{source}.{alias.name}" if f"{source}.{alias.name}" in MODULES else source
                       for alias in node.names]
        else:
            continue
        found.update(m for m in map(_nearest_module, targets) if m is not None and m != name)
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the modules of ours it imports (a package's ``__init__`` importing its own modules included)."""
    return {name: imports_of(name) for name in MODULES}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as [a, b, ..., a], or None when it is acyclic."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_every_module_is_found():
    assert {"wm_trainer", "wm_trainer.ops", "wm_trainer.ops.links", "wm_trainer.models.mdn", "extensions",
            "extensions.updater"} <= set(MODULES)


def test_finder_sees_function_level_imports(tmp_path):
    src = "import os\n\ndef f():\n    from ..ops import links\n    from . import mdn\n    from .. import ops\n"
    tree = ast.parse(src)
    nodes = [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    resolved = {_resolve("wm_trainer.models.vision", n) for n in nodes}
    assert resolved == {"wm_trainer.ops", "wm_trainer.models", "wm_trainer"}
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_even_through_function_level_imports():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_ops_imports_nothing_of_wm_trainer_outside_ops():
    for name, deps in import_graph().items():
        if name.startswith("wm_trainer.ops"):
            above = {d for d in deps if d.startswith("wm_trainer") and not d.startswith("wm_trainer.ops")}
            assert above <= {"wm_trainer"}, f"{name} imports {sorted(above)}: ops is the layer below the models"


ISOLATED_IMPORTS = """
import importlib, json, sys, traceback
failed = {}
for name in sys.argv[1:]:
    for loaded in [m for m in sys.modules if m.split(".")[0] in %r]:
        del sys.modules[loaded]  # each module starts from none of ours imported, as in a fresh interpreter
    try:
        importlib.import_module(name)
    except BaseException:
        failed[name] = traceback.format_exc(limit=-4)
print(json.dumps(failed))
"""


def test_every_module_imports_on_its_own_in_a_fresh_interpreter():
    code = ISOLATED_IMPORTS % (PACKAGES,)
    proc = subprocess.run([sys.executable, "-c", code, *sorted(MODULES)], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    failed = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not failed, "\n".join(f"import {name}:\n{tb}" for name, tb in failed.items())


# The layers (issue 21): a module imports only from its own package and from packages of a lower layer.
LAYERS = {
    "extensions": 0,
    "wm_trainer.base": 1, "wm_trainer.ops": 1,
    "wm_trainer.data": 2, "wm_trainer.games": 2,
    "wm_trainer.models": 3,
    "wm_trainer.sim": 4, "wm_trainer.training": 4,
    "wm_trainer": 5,  # the stage modules, config and cli at the top of the package
}


def package_of(module: str) -> str:
    """The layered package ``module`` belongs to: its longest prefix in ``LAYERS``."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in LAYERS:
            return ".".join(parts[:n])
    raise AssertionError(f"{module} belongs to no layered package; add it to LAYERS")


def allowed(importer: str, imported: str) -> bool:
    """Whether module ``importer`` may import module ``imported``."""
    if imported == "wm_trainer":  # the package's __init__ (the CuPy shim, then the toolkit) runs before any of it
        return True
    if importer in LAYERS and MODULES[importer].name == "__init__.py" and imported.startswith(importer + "."):
        return True  # a package's __init__ importing its own modules
    src, dst = package_of(importer), package_of(imported)
    return src == dst or LAYERS[dst] < LAYERS[src]


def test_layer_table_covers_every_package():
    packages = {name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0] for name in MODULES}
    assert packages <= set(LAYERS), f"packages missing from LAYERS: {sorted(packages - set(LAYERS))}"
    assert allowed("wm_trainer.models.controller", "wm_trainer.games.spec")
    assert not allowed("wm_trainer.games.spec", "wm_trainer.models.controller")
    assert not allowed("wm_trainer.sim.rollout", "wm_trainer.training.cmaes")  # same layer, other package
    assert not allowed("extensions.updater", "wm_trainer.base.errors")


def test_every_import_follows_the_layers():
    bad = [f"{name} -> {dep} ({package_of(name)} is layer {LAYERS[package_of(name)]}, "
           f"{package_of(dep)} layer {LAYERS[package_of(dep)]})"
           for name, deps in sorted(import_graph().items()) for dep in sorted(deps) if not allowed(name, dep)]
    assert not bad, "imports against the layers:\n" + "\n".join(bad)
