"""The package's layout shows its architecture: no import circles between its modules."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "actprune"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Modules of the package that `path` imports, at its top, late inside a function or for type
    checking alone (a late or type-checking import only hides a circle)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.parse(path.read_text()).body:
        for inner in ast.walk(node):
            if isinstance(inner, ast.ImportFrom):
                if inner.level:
                    base = package.rsplit(".", inner.level - 1)[0] if inner.level > 1 else package
                    target = f"{base}.{inner.module}" if inner.module else base
                else:
                    target = inner.module or ""
                if target.startswith("actprune"):
                    found.add(target)
                    found.update(f"{target}.{alias.name}" for alias in inner.names)  # `from . import x` names modules
            elif isinstance(inner, ast.Import):
                found.update(alias.name for alias in inner.names if alias.name.startswith("actprune"))
    return found


def test_no_import_circles():
    modules = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    # A module's own packages are imported before it, always: an edge to them is no circle of the code's.
    graph = {
        name: {m for m in imports(path) if m in modules and m != name and not name.startswith(m + ".")}
        for name, path in modules.items()
    }
    cycles, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, cycles
    assert graph["actprune.masks"] == set()  # masks are pure functions of tensors
