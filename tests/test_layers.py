"""The dependency direction of the packages, read from every import (lazy ones inside functions too).

core <- calibration <- reports <- runtimes <- convert <- serving <- sweep <- cli: a module may import its own
package and the packages to its left, never one to its right; and no two modules import each other,
directly or through others.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ["core", "calibration", "reports", "runtimes", "convert", "serving", "sweep", "cli"]


def _modules() -> dict[str, Path]:
    mods = {"cli": ROOT / "cli.py"}
    for pkg in LAYERS[:-1]:
        for path in sorted((ROOT / pkg).glob("*.py")):
            name = pkg if path.stem == "__init__" else f"{pkg}.{path.stem}"
            mods[name] = path
    return mods


def _imports(path: Path, known: set[str]) -> list[tuple[int, str]]:
    """(line, module) of every import of a project module in ``path``."""
    out: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from pkg import mod` imports the module pkg.mod when there is one
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module
                     for a in node.names]
        out += [(node.lineno, n) for n in names if n.split(".")[0] in LAYERS]
    return out


def _layer(module: str) -> int:
    return LAYERS.index(module.split(".")[0])


def test_imports_follow_the_layers() -> None:
    mods = _modules()
    wrong = [f"{path.relative_to(ROOT)}:{line} imports {target}"
             for name, path in mods.items() for line, target in _imports(path, set(mods))
             if _layer(target) > _layer(name)]
    assert not wrong, "imports against core <- calibration <- reports <- runtimes <- convert <- serving <- sweep <- cli:\n" \
        + "\n".join(wrong)


def test_no_import_cycles() -> None:
    mods = _modules()
    graph = {name: {t for _, t in _imports(path, set(mods)) if t in mods and t != name} for name, path in mods.items()}
    cycles: list[list[str]] = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> None:  # depth-first search; a back edge closes a cycle
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                cycles.append([*stack[stack.index(m):], m])
            elif m not in state:
                visit(m)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_check_can_fail(tmp_path: Path) -> None:
    """A core module importing convert is caught (so the test above is not vacuous)."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from convert.pipeline import run_convert\n", encoding="utf-8")
    assert [t for _, t in _imports(bad, set())] == ["convert.pipeline"]
    assert _layer("convert.pipeline") > _layer("core.bad")
