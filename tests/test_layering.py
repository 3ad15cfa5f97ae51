"""The import layering of the tree, read from the source with `ast` (module-level and function-level imports).

Contracts, top to bottom (a module imports only its own component or what lies below it):
- packages: scripts -> finetune -> quant (quant never imports finetune or scripts; finetune never imports scripts);
- inside quant: the CLI -> the commands (export, eval, peft_support) -> the format plug-ins (quant.formats) ->
  the methods (quant.gptq, quant.awq, quant.ggml: none imports another) -> the shared core;
- no import circles among the modules of finetune, quant and scripts.
quant/__init__.py is the lazy public face (it names modules of every layer in strings) and is not a node.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("scripts", "finetune", "quant")  # top to bottom
QUANT_LAYERS = (  # top to bottom; each entry is a component (a module or a package)
    ("quant.__main__",),
    ("quant.cli",),
    ("quant.export", "quant.eval", "quant.peft_support"),
    ("quant.formats",),
    ("quant.gptq", "quant.awq", "quant.ggml"),
    ("quant.blocks", "quant.arch", "quant.moe", "quant.feedback", "quant.packed", "quant.grid", "quant.settings",
     "quant.calibration", "quant.loading", "quant.model_checks", "quant.records", "quant.files", "quant.tensorfiles",
     "quant.replace", "quant.errors"),
)
CORE = len(QUANT_LAYERS) - 1  # the shared core's modules may import one another
FACES = ("quant",)


def modules(root: Path) -> dict[str, Path]:
    """Dotted name -> file of every module of the checked packages under `root`."""
    found = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            if name not in FACES:
                found[name] = path
    return found


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules `name` imports anywhere in its file (relative imports resolved; `from a import b` is an
    import of the module a.b when there is one, else of a)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            submodules = {f"{base}.{alias.name}" for alias in node.names} & known
            targets.update(submodules if len(submodules) == len(node.names) else submodules | {base})
    return {t for t in targets if t in known and t != name}


def graph(root: Path) -> dict[str, set[str]]:
    found = modules(root)
    return {name: imports(name, path, set(found)) for name, path in found.items()}


def quant_place(module: str) -> tuple[int, str]:
    """(layer index, component) of a quant module; KeyError for a module no layer names."""
    for i, layer in enumerate(QUANT_LAYERS):
        for component in layer:
            if module == component or module.startswith(component + "."):
                return i, component
    raise KeyError(module)


def violations(edges: dict[str, set[str]]) -> list[str]:
    """Every import that breaks a contract, as 'a -> b: why'."""
    place = {}
    for module in edges:
        try:
            place[module] = quant_place(module) if module.startswith("quant.") else None
        except KeyError:
            place[module] = None
    found = [f"{m}: in no layer of QUANT_LAYERS (place it)" for m in sorted(edges)
             if m.startswith("quant.") and place[m] is None]
    for src, targets in sorted(edges.items()):
        top = src.split(".")[0]
        for dst in sorted(targets):
            dst_top = dst.split(".")[0]
            if PACKAGES.index(dst_top) < PACKAGES.index(top):
                found.append(f"{src} -> {dst}: {top} may not import {dst_top}")
            elif place.get(src) and place.get(dst):
                (i, a), (j, b) = place[src], place[dst]
                if a != b and not j > i and not i == j == CORE:
                    found.append(f"{src} -> {dst}: {a} may not import {b} (same layer or above it)")
    return found


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The import circles (strongly connected components of more than one module, or a module importing itself)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
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
            if len(comp) > 1 or v in edges.get(v, ()):
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_the_tree_keeps_its_layers_and_has_no_circles():
    edges = graph(ROOT)
    assert {"quant.gptq.model", "quant.formats.registry", "finetune.model"} <= set(edges)
    assert violations(edges) == []
    assert circles(edges) == []


def plant(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


@pytest.mark.parametrize("files,expected", [
    # a method importing another method, inside a function
    ({"quant/awq/blocks.py": "def f():\n    from quant.gptq.solver import GPTQConfig\n",
      "quant/gptq/solver.py": ""}, ["quant.awq.blocks -> quant.gptq.solver: quant.awq may not import quant.gptq"]),
    # the shared core reaching up to a method, and quant reaching up to finetune
    ({"quant/blocks.py": "from quant.gptq import nn\n", "quant/gptq/nn.py": "",
      "quant/errors.py": "import finetune.model\n", "finetune/model.py": ""},
     ["quant.blocks -> quant.gptq.nn: quant.blocks may not import quant.gptq",
      "quant.errors -> finetune.model: quant may not import finetune"]),
    # a method reaching up to the format plug-ins through a relative import
    ({"quant/gptq/model.py": "from ..formats import registry\n", "quant/formats/registry.py": ""},
     ["quant.gptq.model -> quant.formats.registry: quant.gptq may not import quant.formats"]),
    # a module placed in no layer
    ({"quant/stray.py": ""}, ["quant.stray: in no layer of QUANT_LAYERS (place it)"]),
])
def test_the_checker_finds_a_planted_violation(tmp_path, files, expected):
    edges = graph(plant(tmp_path, files))
    assert [v.split(" (")[0] for v in violations(edges)] == [e.split(" (")[0] for e in expected]


def test_the_checker_finds_a_planted_circle(tmp_path):
    root = plant(tmp_path, {"finetune/a.py": "import finetune.b\n", "finetune/b.py": "def f():\n    import finetune.a\n",
                            "finetune/c.py": "import finetune.a\n"})
    assert circles(graph(root)) == [["finetune.a", "finetune.b"]]
