"""Check that megatron_sr's imports respect its floors and form no cycles.

Every .py file under megatron_sr/, tools/*.py and pretrain_gpt.py is parsed with ast; ALL
imports count (top level, lazy ones inside functions, `if TYPE_CHECKING:` blocks), absolute
and relative. Only imports of megatron_sr modules matter. Rules:
  1. A module's unit is the longest prefix in FLOORS that matches it; a module on no floor is
     a violation (place new packages in FLOORS). A unit may import itself and units on strictly
     lower floors; upward imports and imports of a sibling unit on the same floor (unless the
     pair is in ALLOWED_SIBLINGS) are violations. megatron_sr/__init__.py may import nothing.
  2. No cycles in the module graph (the imports as written; `from p import n` is an edge to
     p.n when n is a submodule, else to p). Each cycle is reported once, one line per edge.
Run: python3 tools/check_layers.py [--repo DIR] [--list]. Exit 0 when clean, 1 otherwise.
"""
from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

ROOT = "megatron_sr"  # the package itself: may import nothing from the package, so anyone may import it
FLOORS: list[tuple[str, tuple[str, ...]]] = [  # bottom to top; (floor name, units)
    ("numerics", ("megatron_sr.numerics",)),  # the Philox stream and the low-bit formats: torch only
    # dtypes, process groups, TP layers, the entry points' error boundary
    # and the table of Megatron-LM's flags
    ("primitives", ("megatron_sr.precision", "megatron_sr.parallel", "megatron_sr.cli", "megatron_sr.megatron_flags")),
    ("config", ("megatron_sr.config",)),  # the parsed run configuration
    ("data", ("megatron_sr.data",)),  # tokenizers, indexed datasets, samplers
    ("model/pipeline/optimizer", ("megatron_sr.model", "megatron_sr.pipeline", "megatron_sr.optimizer")),  # peers
    ("distributed", ("megatron_sr.distributed",)),  # DDP grad buffers, distributed optimizer
    ("checkpoint", ("megatron_sr.checkpoint",)),  # saving / loading / converting state
    ("training", ("megatron_sr.training",)),  # the training loop that ties it all together
    ("tools", ("tools", "pretrain_gpt")),  # entry points
]
ALLOWED_SIBLINGS: set[tuple[str, str]] = set()  # (importer unit, imported unit) pairs allowed on one floor

Import = tuple[str, str, int]  # (importing module, imported module, line number)


def unit_of(module: str) -> tuple[int, str] | None:
    """(floor index, unit) by longest matching prefix; the bare root package is floor -1."""
    if module == ROOT:
        return -1, ROOT
    hits = [(len(u), i, u) for i, (_, units) in enumerate(FLOORS) for u in units
            if module == u or module.startswith(u + ".")]
    return max(hits)[1:] if hits else None


def find_modules(repo: Path) -> dict[str, Path]:
    files = sorted((repo / ROOT).rglob("*.py")) + sorted((repo / "tools").glob("*.py"))
    files += [repo / "pretrain_gpt.py"] if (repo / "pretrain_gpt.py").is_file() else []
    mods: dict[str, Path] = {}
    for f in files:
        parts = list(f.relative_to(repo).with_suffix("").parts)
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return mods


def resolve(repo: Path, pkg: str, name: str) -> str:
    """`from pkg import name`: the submodule pkg.name if it exists on disk, else pkg itself."""
    base = repo.joinpath(*pkg.split("."), name)
    return f"{pkg}.{name}" if base.with_suffix(".py").is_file() or base.is_dir() else pkg


def imports_of(repo: Path, module: str, path: Path) -> list[Import]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[Import] = []
    for node in ast.walk(tree):  # walk, not body: lazy and TYPE_CHECKING imports count too
        if isinstance(node, ast.Import):
            found += [(module, a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: climb level-1 packages up from this file's package
                up = package.split(".") if package else []
                if node.level > len(up):
                    continue  # beyond the top-level package: python would refuse it too
                up = up[: len(up) - node.level + 1]
                base = ".".join(up + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            found += [(module, base if a.name == "*" else resolve(repo, base, a.name), node.lineno)
                      for a in node.names]
    return [i for i in found if i[1] == ROOT or i[1].startswith(ROOT + ".")]


def layer_reason(src: str, dst: str) -> str | None:
    s, d = unit_of(src), unit_of(dst)
    if s is None:
        return None  # already reported once as "not on any floor"
    if d is None:
        return "target is not on any floor (add its package to FLOORS)"
    if s[1] == ROOT:
        return "megatron_sr/__init__.py may import nothing from the package"
    if s[1] == d[1] or d[0] < s[0] or (d[0] == s[0] and (s[1], d[1]) in ALLOWED_SIBLINGS):
        return None  # the root (floor -1) lands here too: it imports nothing, so anyone may import it
    if d[0] > s[0]:
        return f"imports upward: floor {s[0]} {FLOORS[s[0]][0]} -> floor {d[0]} {FLOORS[d[0]][0]}"
    return f"imports a sibling on the same floor ({s[1]} -> {d[1]})"


def cycles(edges: dict[tuple[str, str], int]) -> list[list[str]]:
    """Strongly connected components on a cycle (size > 1, or a self-import); the graph is small."""
    graph: dict[str, set[str]] = {}
    for a, b in edges:
        graph.setdefault(a, set()).add(b)
    reach: dict[str, set[str]] = {}
    for v in graph:  # plain DFS from every node: O(n * e) is nothing at ~100 modules
        seen, todo = set(), [v]
        while todo:
            new = graph.get(todo.pop(), set()) - seen
            seen |= new
            todo += new
        reach[v] = seen
    comps = {tuple(sorted(w for w in reach[v] if v in reach.get(w, ()))) for v in graph if v in reach[v]}
    return sorted(list(c) for c in comps)


def check(repo: Path) -> tuple[list[str], int, int]:
    """Return (violation lines, module count, import count) for the repository at `repo`."""
    mods = find_modules(repo)
    rel = {m: p.relative_to(repo).as_posix() for m, p in mods.items()}
    out: list[str] = []
    found: list[Import] = []
    for m, p in mods.items():
        if unit_of(m) is None:
            out.append(f"{rel[m]}:1: {m}: not on any floor (add its package to FLOORS)")
        try:
            found += imports_of(repo, m, p)
        except SyntaxError as e:
            out.append(f"{rel[m]}:{e.lineno or 1}: {m}: cannot parse: {e.msg}")
    edges: dict[tuple[str, str], int] = {}
    for src, dst, line in sorted(set(found), key=lambda i: (rel[i[0]], i[2], i[1])):
        if (reason := layer_reason(src, dst)) is not None:
            out.append(f"{rel[src]}:{line}: {src} imports {dst}: {reason}")
        if dst in mods:  # the graph holds only modules that exist; first line per edge
            edges.setdefault((src, dst), line)
    for comp in cycles(edges):
        members = set(comp)
        out += [f"{rel[a]}:{line}: {a} imports {b}: import cycle among {', '.join(comp)}"
                for (a, b), line in sorted(edges.items()) if a in members and b in members]
    return out, len(mods), len(set(found))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repo", type=Path, default=Path(__file__).resolve().parent.parent)
    ap.add_argument("--list", action="store_true", help="print each module with its floor")
    args = ap.parse_args(argv)
    if args.list:
        for m in sorted(find_modules(args.repo)):
            u = unit_of(m)
            print(f"{m}: " + ("not on any floor" if u is None else
                              "package root" if u[0] < 0 else f"floor {u[0]} {FLOORS[u[0]][0]}"))
        return 0
    violations, n_mods, n_imports = check(args.repo)
    for line in violations:
        print(line)
    print(f"layers {'ok' if not violations else 'FAILED'}: {n_mods} modules, {n_imports} imports, "
          f"{len(violations)} violations")
    return 1 if violations else 0


if __name__ == "__main__":
    sys.exit(main())
