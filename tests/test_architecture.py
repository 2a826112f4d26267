"""The code's shape, checked (issue 41): no file over 550 lines, no class over 330, no module importing another's
private name, no import circle between routealign's modules (imports at module level, where a circle breaks an
import; imports inside functions are deliberate deferrals)."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "routealign"
MAX_FILE, MAX_CLASS = 550, 330


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _absolute(module: str, path: Path, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    base = package[: len(package) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def _top_level_imports(module: str, path: Path) -> list[tuple[str, list[str]]]:
    """(imported module, names) of the module-level imports (``if TYPE_CHECKING`` blocks excluded)."""
    found = []
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append((_absolute(module, path, node), [alias.name for alias in node.names]))
    return found


def test_no_file_or_class_is_too_long():
    long_files, long_classes = [], []
    for module, path in _modules().items():
        text = path.read_text()
        if text.count("\n") > MAX_FILE:
            long_files.append((module, text.count("\n")))
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > MAX_CLASS:
                long_classes.append((module, node.name, node.end_lineno - node.lineno + 1))
    assert not long_files and not long_classes, (long_files, long_classes)


def test_no_module_imports_a_private_name_of_another():
    private = []
    modules = _modules()
    for module, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                target = _absolute(module, path, node)
                if not target.startswith("routealign"):
                    continue
                private += [(module, target, a.name) for a in node.names
                            if a.name.startswith("_") and not a.name.startswith("__")]
    assert not private, private


def test_no_import_circle():
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        for target, names in _top_level_imports(module, path):
            if target in modules and target != module:
                graph[module].add(target)
            for name in names:  # `from package import module`
                if f"{target}.{name}" in modules:
                    graph[module].add(f"{target}.{name}")
    # a package's __init__ importing its own submodules is how a package exports; not a circle
    for module in graph:
        graph[module] = {t for t in graph[module] if not t.startswith(module + ".")}
    state: dict[str, int] = {}
    circles: list[list[str]] = []

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                circles.append(trail[trail.index(nxt):] + [nxt] if nxt in trail else [node, nxt])
            elif nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not circles, circles


def test_the_checks_see_the_package():
    modules = _modules()
    assert "routealign.modifiers.rounding.tune" in modules and len(modules) > 30


def test_the_rounding_modifier_has_at_most_twelve_top_level_fields_and_the_rest_in_groups():
    from routealign.modifiers.fields import field_lines, groups, own_fields
    from routealign.modifiers.rounding import RouterAlignedRoundingModifier

    top = own_fields(RouterAlignedRoundingModifier)
    assert len(top) <= 12, sorted(top)
    assert {n for n, info in top.items() if groups(info)} == {"holdout", "gate", "memory", "rounding", "loss"}
    # every nested field is documented under its dotted name
    for line in ("  - `gate.z` (1.645)", "  - `memory.expert_chunk` (0)", "    - `loss.vsraq.alpha` (0.3)",
                 "    - `loss.expertquant.tau` (0.5)"):
        assert any(l.startswith(line) for l in field_lines(RouterAlignedRoundingModifier)), line

