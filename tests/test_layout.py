"""The package's imports follow the pipeline: no circle, and no import back up it.

Every ``import``/``from ... import`` of every module counts, function-local ones included (a lazy
import still ties the two modules together). Layers, lowest first: a module may import its own
layer and the layers below it, never one above.
"""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "vlmrl"

# the pipeline: tasks -> policy -> rollout -> algorithms -> trainer -> cli, on a foundation of
# plain utilities that import nothing above them
LAYERS = [
    ("foundation", {"vlmrl", "vlmrl.errors", "vlmrl.config", "vlmrl.checkpoint", "vlmrl.metrics", "vlmrl.files",
                    "vlmrl.seeds"}),
    ("tasks", {"vlmrl.tasks"}),
    ("policy", {"vlmrl.policy"}),
    ("rollout", {"vlmrl.rollout", "vlmrl.evaluate", "vlmrl.render"}),
    ("algorithms", {"vlmrl.algorithms"}),
    ("trainer", {"vlmrl.trainer", "vlmrl.sft"}),
    ("cli", {"vlmrl.demo", "vlmrl.cli"}),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, name: str | None = None) -> set[str]:
    """The vlmrl modules ``path`` (module ``name``) imports, anywhere in the file."""
    name, found = name or module_name(path), set()
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}  # `from pkg import module`
    modules = {module_name(p) for p in SRC.rglob("*.py")}
    return {m for m in found if m in modules and m != name}


def layer(module: str) -> int:
    best = None
    for i, (_, members) in enumerate(LAYERS):
        for m in members:
            if module == m or module.startswith(m + "."):
                if best is None or len(m) > best[1]:
                    best = (i, len(m))
    assert best is not None, f"{module} is in no layer: add it to LAYERS in {__file__}"
    return best[0]


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports(p) for p in SRC.rglob("*.py")}


def test_no_import_runs_back_up_the_pipeline():
    upward = [f"{m} ({LAYERS[layer(m)][0]}) imports {d} ({LAYERS[layer(d)][0]})"
              for m, deps in sorted(graph().items()) for d in sorted(deps)
              if m != "vlmrl" and layer(d) > layer(m)]
    assert upward == []


def test_no_import_circle():
    g = graph()
    # a package's __init__ re-exporting its own modules is not a circle between modules
    edges = {m: {d for d in deps if not m.startswith(d + ".") and not d.startswith(m + ".")} for m, deps in g.items()}
    circles, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                circles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert circles == []


def test_the_walker_sees_function_local_and_relative_imports(tmp_path):
    f = tmp_path / "probe.py"
    f.write_text("import os\n\ndef f():\n    from vlmrl.trainer import train\n\n"
                 "class C:\n    def g(self):\n        from .tiny import build_tiny_vlm\n")
    assert imports(f, "vlmrl.policy.probe") == {"vlmrl.trainer", "vlmrl.policy.tiny"}
