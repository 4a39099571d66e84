"""Imports run one way (DESIGN.md): the import graph of ``sora_jax`` and ``data_pipelines``, read from the source
(function-local imports included), has no cycle and no upward edge.

Layers, lowest first: ``errors`` <- ``config`` <- ``models``, ``text``, ``diffusion``, ``parallel`` <- ``data`` <-
``train``, ``sample``, ``eval``, ``export``, ``safety``, ``loading`` <- ``api``, ``cli``, ``demo``; and
``data_pipelines`` above the whole library (it uses ``sora_jax``; ``sora_jax`` never imports it).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("sora_jax", "data_pipelines")

# rank of each area: a module may import its own area and lower ranks, never a higher one
RANKS = {
    "sora_jax.errors": -1,  # UserError: the bottom, imports nothing
    "sora_jax": 0,  # the package's __init__: a docstring and the version
    "sora_jax.config": 0,
    "sora_jax.config_safety": 0,  # config.safety's sections: rules, defaults, validation
    "sora_jax.choices": 0,
    "sora_jax.host_malloc": 0,  # the process's C allocator (a re-execution with a glibc tunable): no JAX
    "sora_jax.models": 1,
    "sora_jax.text": 1,
    "sora_jax.diffusion": 1,
    "sora_jax.parallel": 1,
    "sora_jax.data": 2,
    "sora_jax.factory": 2,  # builds models, text inputs and processes from a config: no loading, no training
    "sora_jax.train.checkpoint": 2,  # the checkpoint format (orbax), read by the loaders and the trainer
    "sora_jax.train": 3,
    "sora_jax.sample": 3,
    "sora_jax.eval": 3,
    "sora_jax.export": 3,
    "sora_jax.safety": 3,
    "sora_jax.loading": 3,
    "sora_jax.api": 4,
    "sora_jax.commands": 4,
    "sora_jax.demo": 4,
    "sora_jax.cli": 5,
    "data_pipelines": 6,
}
# areas of equal rank that may not import one another (train/sample/eval stay independent of each other,
# except through a lower layer); pairs listed are allowed
SIDEWAYS_ALLOWED = {
    ("sora_jax.models", "sora_jax.parallel"),  # logical-axis constraints on activations
    ("sora_jax.text", "sora_jax.models"),  # the text encoders reuse the attention blocks
    ("sora_jax.models", "sora_jax.text"),  # the text-to-video model holds its text encoder (no module cycle)
    ("sora_jax.config", "sora_jax.choices"),
    ("sora_jax.config", "sora_jax.config_safety"),
    ("sora_jax.commands", "sora_jax.api"),
    ("sora_jax.demo", "sora_jax.api"),
    ("sora_jax.text", "sora_jax.parallel"),
    ("sora_jax.diffusion", "sora_jax.models"),
    ("sora_jax.eval", "sora_jax.sample"),  # evaluators sample videos
    ("sora_jax.eval", "sora_jax.loading"),
    ("sora_jax.sample", "sora_jax.loading"),
    ("sora_jax.export", "sora_jax.loading"),
    (
        "sora_jax.export",
        "sora_jax.train",
    ),  # import writes a train state (fresh optimizer) the trainer resumes
    ("sora_jax.safety", "sora_jax.sample"),
    ("sora_jax.export", "sora_jax.safety"),  # an export carries the safeguards (watermark.json, policy.json)
    ("sora_jax.train", "sora_jax.loading"),
    # evaluation during training (config.eval): the loop runs the evaluator on the EMA weights; eval never
    # imports train (sora_jax.train.checkpoint is a lower layer)
    ("sora_jax.train", "sora_jax.eval"),
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def area(module: str) -> str:
    """The longest key of RANKS that ``module`` falls under."""
    best = ""
    for key in RANKS:
        if (module == key or module.startswith(key + ".")) and len(key) > len(best):
            best = key
    if not best:
        raise AssertionError(f"{module}: no layer in tests/test_layering.py RANKS; add one")
    return best


def imports_of(path: Path, module: str, modules: set[str]) -> list[tuple[str, int]]:
    """Every project module that ``path`` imports (any depth in the file, function-local imports included),
    with the line number. ``from pkg import name`` counts ``pkg.name`` when that is a module, else ``pkg``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_pkg = path.name == "__init__.py"
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_pkg else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            names = [f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in modules else prefix for a in node.names]
        else:
            continue
        for name in names:
            if name.split(".")[0] not in PACKAGES:
                continue
            while name and name not in modules:  # an attribute of a module: keep the module
                name = name.rpartition(".")[0]
            if name and name != module:
                out.append((name, node.lineno))
    return out


def build_graph() -> dict[str, list[tuple[str, int]]]:
    files = {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    return {mod: imports_of(path, mod, set(files)) for mod, path in files.items()}


def upward_edges(graph: dict[str, list[tuple[str, int]]]) -> list[str]:
    bad = set()
    for mod, edges in graph.items():
        a = area(mod)
        for target, line in edges:
            b = area(target)
            if a == b or mod.startswith(target + ".") or target == "sora_jax":
                continue
            if RANKS[b] > RANKS[a] or (RANKS[b] == RANKS[a] and (a, b) not in SIDEWAYS_ALLOWED):
                bad.add(f"{mod}:{line} imports {target} ({a} rank {RANKS[a]} -> {b} rank {RANKS[b]})")
    return sorted(bad)


def cycles(graph: dict[str, list[tuple[str, int]]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w, _ in graph.get(v, []):
            if w not in graph:
                continue
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_upward_imports():
    bad = upward_edges(build_graph())
    assert not bad, "imports against the layering (DESIGN.md):\n" + "\n".join(bad)


def test_no_import_cycles():
    graph = {m: [(t, n) for t, n in e if not m.startswith(t + ".")] for m, e in build_graph().items()}
    found = cycles(graph)
    assert not found, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_the_checker_catches_an_upward_import_and_a_cycle(tmp_path):
    graph = {
        "sora_jax.models.dit": [("sora_jax.train.loop", 3)],
        "sora_jax.train.loop": [("sora_jax.models.dit", 1)],
    }
    assert upward_edges(graph) == [
        "sora_jax.models.dit:3 imports sora_jax.train.loop (sora_jax.models rank 1 -> sora_jax.train rank 3)"
    ]
    assert cycles(graph) == [["sora_jax.models.dit", "sora_jax.train.loop"]]
    with pytest.raises(AssertionError, match="no layer"):
        area("sora_jax_other.x")
