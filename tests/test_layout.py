"""The package's module-level imports form no circle (a circle is what imports hidden inside functions dodge)."""
import ast

from conftest import ROOT


def module_imports() -> dict[str, set[str]]:
    graph = {}
    for path in sorted((ROOT / "qlora").rglob("*.py")):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        edges = set()
        for node in ast.parse(path.read_text()).body:  # module level only
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("qlora"):
                for alias in node.names:  # `from qlora import x` imports the module qlora.x
                    edges.add(f"{node.module}.{alias.name}" if node.module in ("qlora", "qlora.data") else node.module)
            elif isinstance(node, ast.Import):
                edges |= {a.name for a in node.names if a.name.startswith("qlora")}
        graph[name] = edges
    return {m: {e for e in edges if e in graph and e != m} for m, edges in graph.items()}


def test_no_import_circles_in_qlora():
    graph = module_imports()
    assert len(graph) > 30 and graph["qlora.worker"]  # the walk found the package and its imports
    state: dict[str, str] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = "open"
        for e in sorted(graph[m]):
            assert state.get(e) != "open", "import circle: " + " -> ".join(path[path.index(e):] + [e])
            if e not in state:
                visit(e, path + [e])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
