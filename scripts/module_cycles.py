#!/usr/bin/env python3
"""Lists the module graph of a Rust crate's src/ (edges from `use crate::`, `use super::` and
`crate::x::` paths in each file) and reports every cycle among its modules (strongly connected
components of more than one module). Exit status 1 if any. Usage: module_cycles.py [SRC_DIR]"""

from __future__ import annotations

import re
import sys
from pathlib import Path


def module_of(src: Path, f: Path) -> str:
    parts = list(f.relative_to(src).with_suffix("").parts)
    if parts[-1] in ("mod", "lib"):
        parts = parts[:-1]
    return "::".join(parts) or "crate"


def resolve(mod: str, path: list[str], modules: set[str]) -> str | None:
    """The longest known module that `path` (already absolute) starts with."""
    for n in range(len(path), 0, -1):
        cand = "::".join(path[:n])
        if cand in modules:
            return cand
    return None


DEBUG = False


def absolute(here: list[str], is_dir_mod: bool, root: str, rest: list[str]) -> list[str] | None:
    """A path written in module `here` as an absolute module path (`self::` and a bare child
    name are relative to `here`, `super::` to its parent)."""
    if root == "crate":
        return rest
    if root == "super":
        return here[:-1] + rest
    if root == "self" or is_dir_mod:
        return here + rest
    return None


def main() -> int:
    src = Path(sys.argv[1] if len(sys.argv) > 1 else "rust/xconnector-core/src")
    files = {module_of(src, f): f for f in src.rglob("*.rs")}
    modules = set(files)
    edges: dict[str, set[str]] = {m: set() for m in modules}
    # `crate::a::b`, `super::a`, `self::a`, and in a directory module `use child::...`;
    # `use x::{a, b}` groups are split.
    use_pat = re.compile(
        r"\buse\s+([\w:]+?)::\{([^}]*)\}"
        r"|\b(crate|super|self)((?:::\w+)+)"
        r"|\buse\s+(?!crate\b|super\b|self\b)(\w+)::"
    )
    for mod, f in files.items():
        text = re.sub(r"//[^\n]*", "", f.read_text())
        # Tests inside a module depend on whatever they like; only the module's own code counts.
        text = text.split("#[cfg(test)]")[0]
        here = [] if mod == "crate" else mod.split("::")
        is_dir_mod = f.name in ("mod.rs", "lib.rs")
        for m in use_pat.finditer(text):
            targets: list[list[str]] = []
            if m.group(1):
                head = m.group(1).split("::")
                for item in m.group(2).split(","):
                    item = item.strip()
                    if item:
                        targets.append(head + item.split("::"))
            elif m.group(3):
                targets.append([m.group(3)] + [p for p in m.group(4).split("::") if p])
            else:
                targets.append([m.group(5)])
            for t in targets:
                if t[0] in ("crate", "super", "self"):
                    full = absolute(here, is_dir_mod, t[0], t[1:])
                else:
                    full = absolute(here, is_dir_mod, "", t)
                if full is None:
                    continue
                target = resolve(mod, full, modules)
                if target and target not in (mod, "crate"):
                    edges[mod].add(target)
                    if DEBUG:
                        print(f"  {mod}: {'::'.join(t)} -> {target}")
    # Tarjan's strongly connected components.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    sccs: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges[v]):
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
                sccs.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(modules):
        if v not in index:
            visit(v)
    for m in sorted(edges):
        print(f"{m} -> {', '.join(sorted(edges[m])) or '-'}")
    if sccs:
        for c in sccs:
            print("CYCLE:", " <-> ".join(c))
        return 1
    print(f"no cycles among {len(modules)} modules")
    return 0


if __name__ == "__main__":
    sys.exit(main())
