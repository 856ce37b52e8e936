"""The structure README's Layout promises: no import cycles among car_tf's modules (function-level
imports included), a core that imports nothing from training/, tf.distribute reached from one module."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "car_tf"
CORE = ("car", "losses", "models", "data", "backend.py")


def _module_name(path):
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path, modules):
    """The car_tf modules ``path`` imports anywhere in its body (``from car_tf.x import y`` counts
    car_tf.x.y where that is a module, else car_tf.x)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("car_tf")}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("car_tf"):
            for alias in node.names:
                inner = f"{node.module}.{alias.name}"
                found.add(inner if inner in modules else node.module)
    return {name for name in found if name in modules}


def _graph():
    paths = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: _imports(path, paths) - {name} for name, path in paths.items()}, paths


def _cycle(graph):
    """One import cycle as a list of modules, or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycles_among_car_tf_modules():
    graph, _ = _graph()
    assert len(graph) > 50
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]  # the check finds one


def test_the_core_imports_nothing_from_training():
    graph, paths = _graph()
    core = [n for n, p in paths.items() if p.relative_to(PACKAGE).parts[0] in CORE]
    assert "car_tf.car.loss" in core and "car_tf.data.flags" in core
    reaching = {n: sorted(m for m in graph[n] if m.startswith("car_tf.training")) for n in core}
    assert {n: m for n, m in reaching.items() if m} == {}


def test_tf_distribute_is_reached_from_one_module():
    users = sorted(_module_name(p) for p in PACKAGE.rglob("*.py")
                   if any(isinstance(node, ast.Attribute) and node.attr == "distribute"
                          and isinstance(node.value, ast.Name) and node.value.id == "tf"
                          for node in ast.walk(ast.parse(p.read_text()))))
    assert users == ["car_tf.distribute"]
