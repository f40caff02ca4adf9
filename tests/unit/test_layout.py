"""The package's layers, read from its imports (those inside functions included): no import circle anywhere, and
nothing imports upward (entry points -> job drivers -> Ray layers -> library -> helpers)."""
import ast

from conftest import ROOT

# Layer of each module by name (the first prefix that matches); a module named nowhere is library code.
LAYERS = {
    "ray_jobs": 4,  # entry points
    "qlora.jobs": 3,  # job drivers
    "qlora.train_driver": 2, "qlora.worker": 2, "qlora.asha": 2,  # Ray layers: Train driver, worker loop, Tune
    "qlora.preemption": 2,  # notices on the workers, and the failure policy Ray Train's controller runs
    "qlora.failures": 2,  # what a failed Ray Train run tells its user
    "qlora.runtime": 2,  # the Ray, storage and MLflow connections the drivers share
    "qlora.config": 0, "qlora.errors": 0, "qlora.files": 0, "qlora.console": 0, "qlora.cli": 0,  # helpers
    "qlora.distributed": 0,
}
LIBRARY = 1


def layer(module: str) -> int:
    for prefix, n in sorted(LAYERS.items(), key=lambda kv: -len(kv[0])):
        if module == prefix or module.startswith(prefix + "."):
            return n
    return LIBRARY


def package_imports() -> dict[str, set[str]]:
    """module -> the package modules it imports, anywhere in its file."""
    paths = sorted((ROOT / "qlora").rglob("*.py")) + sorted((ROOT / "ray_jobs").rglob("*.py"))
    names = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p for p in paths}
    graph = {}
    for name, path in names.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in ("qlora", "ray_jobs"):
                for alias in node.names:  # `from qlora import x` imports the module qlora.x when there is one
                    full = f"{node.module}.{alias.name}"
                    edges.add(full if full in names else node.module)
            elif isinstance(node, ast.Import):
                edges |= {a.name for a in node.names if a.name.split(".")[0] in ("qlora", "ray_jobs")}
        graph[name] = {e for e in edges if e in names and e != name}
    return graph


def test_no_import_circles():
    graph = package_imports()
    assert len(graph) > 50 and graph["qlora.worker"]  # the walk found the package and its imports
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


def test_nothing_imports_upward():
    graph = package_imports()
    upward = [f"{m} (layer {layer(m)}) imports {e} (layer {layer(e)})"
              for m, edges in sorted(graph.items()) for e in sorted(edges) if layer(e) > layer(m)]
    assert not upward, "\n".join(upward)
    assert {layer(m) for m in graph} == {0, 1, 2, 3, 4}  # every layer has modules: the table still fits the tree
