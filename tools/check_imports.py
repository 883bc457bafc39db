#!/usr/bin/env python3
"""Check the import structure of ``megatron/``: no circles, and every edge points down the layers.

Every ``import`` / ``from ... import`` of a ``megatron`` module is an edge, function-local ones
included (a local import must not hide an upward edge). ``from megatron.a import b`` is an edge to
``megatron.a.b`` when that is a module, else to ``megatron.a``; importing a package is an edge to
its ``__init__``. Three rules:

1. no import circle between modules (strongly connected components of size > 1, or self edges);
2. ``megatron.model`` never imports ``megatron.parallel`` (the model holds no communication);
3. a module imports only packages of its own layer or below (``LAYERS``, lowest first).

Exit status 0 when the tree passes, 1 with one line per violation otherwise.
``--graph`` prints the package-level edges instead.
"""
from __future__ import annotations

import argparse
import ast
import sys
from collections import defaultdict
from pathlib import Path

# Lowest first. A package may import its own layer and every layer before it.
LAYERS: list[tuple[str, ...]] = [
    ("errors",),
    ("config",),
    ("tokenizer", "data"),
    ("model",),
    ("parallel",),
    ("optim",),
    ("checkpoint",),
    ("planning",),
    ("inference", "hf"),
    ("training", "evaluation"),
]
FORBIDDEN = [("megatron.model", "megatron.parallel")]  # (importer prefix, imported prefix)


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def collect(root: Path) -> tuple[dict[str, Path], dict[str, set[tuple[str, int]]]]:
    files = {module_name(root, p): p for p in sorted(root.rglob("*.py"))}
    edges: dict[str, set[tuple[str, int]]] = defaultdict(set)
    for mod, path in files.items():
        is_pkg = path.name == "__init__.py"
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    pkg = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    pkg = pkg[: len(pkg) - (node.level - 1)]
                    base = ".".join(pkg + ([base] if base else []))
                for a in node.names:
                    sub = f"{base}.{a.name}"
                    targets.append(sub if sub in files else base)
            for t in targets:
                if t.split(".")[0] != root.name:
                    continue
                while t not in files and "." in t:
                    t = t.rsplit(".", 1)[0]
                if t != mod or not is_pkg:
                    edges[mod].add((t, node.lineno))
    return files, edges


def package_of(mod: str) -> str:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else ""


def layer_of(pkg: str) -> int | None:
    for i, names in enumerate(LAYERS):
        if pkg in names:
            return i
    return None


def cycles(nodes, edges) -> list[list[str]]:
    """Tarjan's strongly connected components of size > 1 (or with a self edge)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]
    sys.setrecursionlimit(10000)

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w, _ in edges.get(v, ()):
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
            if len(comp) > 1 or any(t == v for t, _ in edges.get(v, ())):
                out.append(sorted(comp))

    for v in sorted(nodes):
        if v not in index:
            visit(v)
    return out


def violations(root: Path) -> list[str]:
    files, edges = collect(root)
    problems = []
    for comp in cycles(files, edges):
        problems.append("import circle: " + " <-> ".join(comp))
    top_modules = [m for m, p in files.items() if m.count(".") == 1 and p.name != "__init__.py"]
    for m in top_modules:
        if m != f"{root.name}.errors":
            problems.append(f"{files[m]}: a module at the top of {root.name}/ (only packages and errors.py belong there)")
    for mod, targets in sorted(edges.items()):
        src_pkg = package_of(mod)
        src_layer = layer_of(src_pkg)
        for t, line in sorted(targets):
            where = f"{files[mod]}:{line}"
            for a, b in FORBIDDEN:
                if (mod == a or mod.startswith(a + ".")) and (t == b or t.startswith(b + ".")):
                    problems.append(f"{where}: {mod} imports {t} ({a} must not import {b})")
            dst_pkg = package_of(t)
            if not src_pkg or not dst_pkg or src_pkg == dst_pkg:
                continue
            dst_layer = layer_of(dst_pkg)
            if src_layer is None or dst_layer is None:
                name = src_pkg if src_layer is None else dst_pkg
                problems.append(f"{where}: package {root.name}.{name} has no layer in tools/check_imports.py LAYERS")
            elif dst_layer > src_layer:
                problems.append(f"{where}: {mod} imports {t}, which is above it "
                                f"({src_pkg} is layer {src_layer}, {dst_pkg} layer {dst_layer})")
    return sorted(set(problems))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default=str(Path(__file__).resolve().parents[1] / "megatron"))
    ap.add_argument("--graph", action="store_true", help="print the package-level import edges")
    args = ap.parse_args(argv)
    root = Path(args.root).resolve()
    if args.graph:
        files, edges = collect(root)
        pk = defaultdict(set)
        for mod, targets in edges.items():
            for t, _ in targets:
                a, b = package_of(mod) or mod, package_of(t) or t
                if a != b:
                    pk[a].add(b)
        for a in sorted(pk):
            print(f"{a} -> {', '.join(sorted(pk[a]))}")
        return 0
    problems = violations(root)
    for p in problems:
        print(p)
    if problems:
        print(f"{len(problems)} import-structure problems", file=sys.stderr)
        return 1
    print("imports: no circles, every edge points down")
    return 0


if __name__ == "__main__":
    sys.exit(main())
