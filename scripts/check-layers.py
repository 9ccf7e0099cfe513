#!/usr/bin/env python3
"""Checks that imports inside src/ run one way: from the top layer down, never back up,
and that no files import each other in a circle.

Usage: python3 scripts/check-layers.py [--graph]
Exit 0 when the graph is clean; 1 with every upward import and cycle listed otherwise.
It reads `crate::` and `super::` paths as text (test modules, from `#[cfg(test)]` on, are
left out): a hit is a place to look, named by file and line.
"""
import os
import re
import sys

# Top-level modules of src/, lowest layer first. A module may import its own layer and
# the layers below it. Keep in step with the table in src/lib.rs.
LAYERS = [
    ["error", "units", "schedule", "progress", "systemd"],  # base
    ["codec", "verify", "config"],                           # core
    ["store", "etcd"],                                       # edges: all network I/O
    ["backup", "restore", "retention", "defrag", "continuous"],  # one operation each
    ["daemon"],                                              # the service
    ["commands"],                                            # the entry points
]
# Within a layer, these pairs are ordered too: (lower, higher).
ORDER_IN_LAYER = [("codec", "config"), ("verify", "config"), ("units", "progress")]

SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")
RANK = {m: i for i, layer in enumerate(LAYERS) for m in layer}


def module_path(path):
    rel = os.path.relpath(path, SRC)[:-3].split(os.sep)
    if rel[-1] in ("mod", "lib", "main"):
        rel = rel[:-1]
    return rel


def imports(path):
    """(line number, top-level module, full path) of every crate-relative reference."""
    here = module_path(path)
    out = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if line.strip().startswith("#[cfg(test)]"):
                break
            line = re.sub(r"//.*", "", line)
            for m in re.finditer(r"\bcrate::\{([^}]*)", line):
                for item in m.group(1).split(","):
                    name = item.strip().split("::")[0].split(" ")[0]
                    if name:
                        out.append((n, name, [name]))
            for m in re.finditer(r"\bcrate::(\w+(?:::\w+)*)", line):
                p = m.group(1).split("::")
                out.append((n, p[0], p))
            for m in re.finditer(r"\b((?:super::)+)(\w+(?:::\w+)*)", line):
                up = m.group(1).count("super::")
                full = here[: max(0, len(here) - up)] + m.group(2).split("::")
                if full:
                    out.append((n, full[0], full))
    return out


def main():
    problems = []
    graph = {}
    files = []
    for root, _, names in os.walk(SRC):
        for name in sorted(names):
            if name.endswith(".rs") and name != "tests.rs":
                files.append(os.path.join(root, name))
    known = {tuple(module_path(p)): p for p in files}
    for path in sorted(files):
        mod = module_path(path)
        rel = os.path.relpath(path, os.path.join(SRC, ".."))
        top = mod[0] if mod else None
        for line, target, full in imports(path):
            if target not in RANK:
                continue
            # file-level edge for the cycle check
            for k in range(len(full), 0, -1):
                if tuple(full[:k]) in known:
                    dst = known[tuple(full[:k])]
                    if dst != path:
                        graph.setdefault(path, set()).add(dst)
                    break
            if top is None or top not in RANK or target == top:
                continue
            up = RANK[target] > RANK[top] or (top, target) in ORDER_IN_LAYER
            if up:
                problems.append(f"{rel}:{line}: {top} (layer {RANK[top]}) imports {'::'.join(full)} (layer {RANK[target]}): runs back up")
    for top in {module_path(p)[0] for p in files if module_path(p)}:
        if top not in RANK:
            problems.append(f"src/{top}: not in any layer of scripts/check-layers.py")
    # cycles between files (Tarjan)
    index, low, stack, on, sccs, counter = {}, {}, [], set(), [], [0]

    def strong(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                strong(w)
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
                sccs.append(comp)

    sys.setrecursionlimit(10000)
    for v in sorted(files):
        if v not in index:
            strong(v)
    for comp in sccs:
        names = ", ".join(sorted(os.path.relpath(p, os.path.join(SRC, "..")) for p in comp))
        problems.append(f"import cycle: {names}")
    if "--graph" in sys.argv:
        for src in sorted(graph):
            for dst in sorted(graph[src]):
                print(f"{os.path.relpath(src, SRC)} -> {os.path.relpath(dst, SRC)}")
    for p in problems:
        print(p)
    if problems:
        print(f"check-layers: {len(problems)} problem(s)")
        return 1
    print(f"check-layers: {len(files)} files, {sum(len(v) for v in graph.values())} imports, no cycle, none runs back up")
    return 0


if __name__ == "__main__":
    sys.exit(main())
