"""The house rules of docs/design.md ("Rooms and rules"), checked on the import graph of the source.

Every import counts, at the top of a module or inside a function: a lazy import is still a
dependency. Shims of old module paths (``featcache.pipeline.shim.moved``) are left out.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"api": "featcache", "cache": "featcache.cache", "pipeline": "featcache.pipeline", "cli": "featcache.cli"}
STAGE_ONE = ("data", "extract")
STAGE_TWO = ("features", "select", "train", "evaluate")  # each may import only those before it


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT)
    parts = [FOLDERS[rel.parts[0]], *rel.parts[1:]]
    parts[-1] = parts[-1].removesuffix(".py")
    return ".".join(p for p in parts if p != "__init__")


def is_shim(text: str) -> bool:
    return "featcache.pipeline.shim import moved" in text


def sources() -> dict[str, tuple[Path, ast.Module]]:
    out = {}
    for folder in FOLDERS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            text = path.read_text()
            if not is_shim(text):
                out[module_name(path)] = (path, ast.parse(text))
    return out


def imports(tree: ast.Module) -> list[tuple[str, list[str], int]]:
    """(module, names, line) of every featcache import in the file, top level or not."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("featcache"):
            out.append((node.module, [a.name for a in node.names], node.lineno))
        elif isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names if a.name.startswith("featcache")]
    return out


def room(module: str) -> str:
    """cache, cli, app, common, data, extract, features, select, train, evaluate, or root."""
    if module.startswith("featcache.cache"):
        return "cache"
    if module.startswith("featcache.cli"):
        return "cli"
    parts = module.split(".")
    return parts[2] if len(parts) > 2 else "root"


def edges(modules: dict) -> list[tuple[str, str, int]]:
    """(importer, imported module, line); ``from pkg import submodule`` names the submodule."""
    out = []
    for name, (_, tree) in modules.items():
        for target, names, line in imports(tree):
            subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in modules]
            for t in subs or [target]:
                out.append((name, t, line))
    return out


def violations(graph: list[tuple[str, str, int]]) -> list[str]:
    bad = []
    for src, dst, line in graph:
        a, b = room(src), room(dst)
        why = None
        if a == "cache" and b != "cache":
            why = "the cache imports nothing from pipeline or cli"
        elif a == "common" and b not in ("common", "cache"):
            why = "common imports only common and the cache"
        elif (a in STAGE_ONE and b in STAGE_TWO) or (a in STAGE_TWO and b in STAGE_ONE):
            why = "stage one and stage two never import each other"
        elif a in STAGE_TWO and b in STAGE_TWO and STAGE_TWO.index(b) > STAGE_TWO.index(a):
            why = f"stage two imports only earlier rooms ({' <- '.join(STAGE_TWO)})"
        elif a not in ("root", "app", "cli", "model") and b == "model":
            why = "only the app and the CLI use the aligned model"
        elif a not in ("app", "cli") and b in ("app", "cli"):
            why = "the library never imports the app or the CLI"
        elif a == "app" and b == "cli":
            why = "the app never imports the CLI"
        if why:
            bad.append(f"{src}:{line} imports {dst}: {why}")
    return bad


def cycles(graph: list[tuple[str, str, int]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan), package __init__s left out:
    a package re-exporting its own submodules is not a cycle."""
    nodes = {s for s, _, _ in graph} | {d for _, d, _ in graph}
    succ = {n: set() for n in nodes}
    for s, d, _ in graph:
        if not d.startswith(s + ".") and not s.startswith(d + "."):
            succ[s].add(d)
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in succ[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for n in sorted(nodes):
        if n not in index:
            visit(n)
    return out


MODULES = sources()
GRAPH = edges(MODULES)


def test_rooms_import_only_what_the_rules_allow():
    assert violations(GRAPH) == []


def test_no_import_cycles_eager_or_lazy():
    assert cycles(GRAPH) == []


def test_no_private_name_crosses_a_module():
    """Tests and benchmarks included: test through public names, or make the name public."""
    bad = []
    for folder in ("cache", "pipeline", "cli", "tests", "benchmarks"):
        for path in (ROOT / folder).rglob("*.py"):
            for target, names, line in imports(ast.parse(path.read_text())):
                bad += [f"{path.relative_to(ROOT)}:{line}: {target}.{n}" for n in names
                        if n.startswith("_") and not n.startswith("__")]
    assert bad == []


def test_one_builder_of_the_extract_command():
    pattern = re.compile(r"""["']featcache extract """)
    found = [str(p.relative_to(ROOT)) for folder in ("cache", "pipeline", "cli") for p in (ROOT / folder).rglob("*.py")
             if pattern.search(p.read_text())]
    assert found == ["cache/commands.py"]


@pytest.mark.parametrize("src, dst, rule", [
    ("featcache.cache.store", "featcache.pipeline.extract.run", "the cache imports nothing"),
    ("featcache.pipeline.common.names", "featcache.pipeline.data.catalog", "common imports only"),
    ("featcache.pipeline.features", "featcache.pipeline.data.catalog", "never import each other"),
    ("featcache.pipeline.extract.run", "featcache.pipeline.train.loop", "never import each other"),
    ("featcache.pipeline.train.plan", "featcache.pipeline.evaluate.metrics", "only earlier rooms"),
    ("featcache.pipeline.select.table", "featcache.pipeline.train.loop", "only earlier rooms"),
    ("featcache.pipeline.evaluate.retrieval", "featcache.pipeline.app.report", "never imports the app"),
    ("featcache.pipeline.evaluate.retrieval", "featcache.pipeline.model.aligned", "only the app and the CLI use"),
    ("featcache.pipeline.extract.run", "featcache.pipeline.model.pooled", "only the app and the CLI use"),
    ("featcache.pipeline.model.aligned", "featcache.pipeline.app.report", "never imports the app"),
    ("featcache.pipeline.app.study", "featcache.cli.app", "the app never imports the CLI"),
])
def test_a_forbidden_import_is_caught(src, dst, rule):
    """The checker itself: one forbidden edge added to the real graph is reported."""
    found = violations(GRAPH + [(src, dst, 1)])
    assert len(found) == 1 and rule in found[0]


def test_a_cycle_is_caught():
    graph = GRAPH + [("featcache.pipeline.common.names", "featcache.pipeline.common.listing", 1),
                     ("featcache.pipeline.common.listing", "featcache.pipeline.common.names", 1)]
    assert ["featcache.pipeline.common.listing", "featcache.pipeline.common.names"] in cycles(graph)
