"""The house rules of issue 24, checked on the source (no import of the project needed):

- no import cycle among the project's modules, counting imports inside functions as well as top-level ones;
- no ``from x import _private`` of a project module's private name in another module;
- relative imports nowhere in mesh_head/ and trainers/ (they are installed inside nnunet_topo, so ``..`` would read
  differently in the repository and installed): absolute ``nnunet_topo.`` imports only;
- library modules (not commands, not tests) at most 800 lines; those over 600 named in documentation/architecture.md;
- library modules never import the command package ``nnunet_topo.cli``.
"""
import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
#: repository folder -> installed package (setup.cfg's package_dir)
ROOTS = {"nnunet_topo": "nnunet_topo", "trainers": "nnunet_topo.trainers", "mesh_head": "nnunet_topo.mesh_head"}


def project_modules():
    """{dotted module name: path} of every project source file, named as installed."""
    mods = {}
    for folder, pkg in ROOTS.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            rel = path.relative_to(REPO / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            mods[".".join([pkg] + parts)] = path
    return mods


MODULES = project_modules()


def _is_package(name):
    return MODULES[name].name == "__init__.py"


def _resolve(module, node):
    """The absolute module a ``from ... import`` names (relative levels resolved)."""
    if node.level == 0:
        return node.module
    base = module.split(".")
    base = base if _is_package(module) else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(module):
    """[(imported project module, imported name or None, line, relative?)] of every import in the file, anywhere."""
    tree = ast.parse(MODULES[module].read_text(), filename=str(MODULES[module]))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name in MODULES:
                    out.append((a.name, None, node.lineno, False))
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, node)
            for a in node.names:
                sub = f"{target}.{a.name}"
                if sub in MODULES:  # ``from pkg import submodule``
                    out.append((sub, None, node.lineno, node.level > 0))
                elif target in MODULES:
                    out.append((target, a.name, node.lineno, node.level > 0))
    return out


def import_graph():
    return {m: sorted({t for t, _, _, _ in imports_of(m) if t != m}) for m in MODULES}


def cycles(graph):
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_the_checker_sees_the_project():
    assert "nnunet_topo.occupancy" in MODULES and "nnunet_topo.trainers.nnUNetTrainerTPM" in MODULES
    assert "nnunet_topo.mesh_head.head" in MODULES
    # the cycle finder finds a planted cycle and accepts a chain
    assert cycles({"a": ["b"], "b": ["c"], "c": ["a"], "d": ["a"]}) == [["a", "b", "c"]]
    assert cycles({"a": ["b"], "b": [], "c": ["a"]}) == []


def test_no_import_cycles_counting_function_level_imports():
    found = cycles(import_graph())
    assert not found, "import cycles (function-level imports count):\n" + "\n".join(" <-> ".join(c) for c in found)


def test_no_private_name_imported_across_modules():
    bad = sorted({f"{MODULES[m].relative_to(REPO)}:{line}: from {t} import {name}"
                  for m in MODULES for t, name, line, _ in imports_of(m)
                  if name is not None and name.startswith("_") and not name.startswith("__") and t != m})
    assert not bad, "private names imported across modules:\n" + "\n".join(bad)


def test_absolute_imports_in_mesh_head_and_trainers():
    bad = sorted({f"{MODULES[m].relative_to(REPO)}:{line}"
           for m in MODULES if m.startswith(("nnunet_topo.mesh_head", "nnunet_topo.trainers"))
           for _, _, line, relative in imports_of(m) if relative})
    assert not bad, "relative imports (use nnunet_topo.…):\n" + "\n".join(bad)


def test_library_modules_never_import_the_commands():
    bad = sorted({f"{MODULES[m].relative_to(REPO)}:{line}: {t}" for m in MODULES if not m.startswith("nnunet_topo.cli")
                  for t, _, line, _ in imports_of(m) if t == "nnunet_topo.cli" or t.startswith("nnunet_topo.cli.")})
    assert not bad, "library modules importing nnunet_topo.cli:\n" + "\n".join(bad)


def test_module_sizes():
    arch = (REPO / "documentation" / "architecture.md").read_text()
    too_long, unnamed = [], []
    for m, path in MODULES.items():
        n = len(path.read_text().splitlines())
        rel = str(path.relative_to(REPO))
        if n > 800:
            too_long.append(f"{rel}: {n} lines")
        elif n > 600 and rel not in arch:
            unnamed.append(f"{rel}: {n} lines")
    assert not too_long, "library modules over 800 lines:\n" + "\n".join(too_long)
    assert not unnamed, "modules over 600 lines not named in documentation/architecture.md:\n" + "\n".join(unnamed)
