"""The house's import structure: no circle among the project's modules, nothing imported upward.

Every import counts, at module level or inside a function (an import moved into a function to
dodge a circle is still a circle), read with ast so nothing is executed. The rooms, lowest first:

    common  <-  heads, finetune, lungs  <-  serve, jobs  <-  cxr

A room imports only the rooms its ALLOWED entry names; `serve` reaches training code (heads,
finetune) only through each kind of run's predictor on images (SERVE_TRAINING), and `heads` reaches
finetune only through its predictor (HEADS_FINETUNE), to score a fine-tune run on another table.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("common", "heads", "finetune", "lungs", "serve", "jobs", "cxr")

ALLOWED = {
    "common": set(),
    "finetune": {"common"},
    "lungs": {"common"},
    # lungs: the masker a lung-masked store's images go through; finetune: its predictor only (HEADS_FINETUNE)
    "heads": {"common", "lungs", "finetune"},
    "serve": {"common", "heads", "finetune"},  # training rooms: SERVE_TRAINING's modules only
    "jobs": {"common", "finetune", "lungs"},
    "cxr": set(PACKAGES) - {"cxr"},
}
TRAINING = {"heads", "finetune"}
# heads.evaluate scores a fine-tune run on another table's images through its predictor, and nothing else.
HEADS_FINETUNE = {("heads.scoring", "finetune.predictor")}
SERVE_TRAINING = {  # serving depends only on each kind of run's predictor on images
    ("serve.model", "heads.predictions"),
    ("serve.model", "finetune.predictor"),
}


# common/ by concern, lowest first ("": the ground floor, common/*.py): a module imports only its own floor and
# those below it.
COMMON_FLOORS = ("", "runs", "images", "data", "training", "models", "features", "evaluation")


def floor(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in COMMON_FLOORS else ""


def upward_in_common(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{module} imports {target}" for module, targets in graph.items() if room(module) == "common"
                  for target in targets if room(target) == "common"
                  and COMMON_FLOORS.index(floor(target)) > COMMON_FLOORS.index(floor(module)))


def project_modules(root: Path = ROOT, packages=PACKAGES) -> dict[str, Path]:
    """Dotted name -> file, for every module of the project packages."""
    modules = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules `name` imports anywhere in its file (relative imports resolved)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import mod` imports the module pkg.mod; `from mod import name`, the module mod.
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for target in targets:
            # `import a.b.c` runs a, a.b and a.b.c: the deepest project module is the edge that matters.
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def room(module: str) -> str:
    return module.partition(".")[0]


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{module} imports {target}" for module, targets in graph.items() for target in targets
                  if room(target) != room(module) and room(target) not in ALLOWED[room(module)])


def test_the_graph_sees_function_level_and_relative_imports(tmp_path):
    # The walker itself: an import inside a function and a relative one are edges like any other.
    files = {"pkg/__init__.py": "", "pkg/c/__init__.py": "", "pkg/c/d.py": "import os\n",
             "pkg/a.py": "def f():\n    from pkg.b import g\n    return g\n",
             "pkg/b.py": "from . import a\nfrom .a import f\nimport pkg.c.d\n"}
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    modules = project_modules(tmp_path, ("pkg",))
    graph = {name: imports_of(name, path, modules) for name, path in modules.items()}
    assert graph == {"pkg": set(), "pkg.a": {"pkg.b"}, "pkg.b": {"pkg.a", "pkg.c.d"}, "pkg.c": set(), "pkg.c.d": set()}
    assert circles(graph) == [["pkg.a", "pkg.b"]]
    assert upward_imports({"common.x": {"heads.y"}, "heads.y": {"common.x", "lungs.z"}, "lungs.z": set()}) == [
        "common.x imports heads.y"]


def test_no_import_circles():
    found = circles(import_graph())
    assert not found, "import circles (module-level or inside functions): " + "; ".join(
        " <-> ".join(c) for c in found)


def test_no_upward_imports_between_rooms():
    upward = upward_imports(import_graph())
    assert not upward, "imports against the rooms' order: " + "; ".join(upward)


def test_serve_reaches_training_code_only_through_the_predictors():
    graph = import_graph()
    reached = {(m, t) for m, targets in graph.items() if room(m) == "serve" for t in targets if room(t) in TRAINING}
    assert reached <= SERVE_TRAINING, f"serve imports more training code: {sorted(reached - SERVE_TRAINING)}"


def test_heads_reach_finetune_only_through_its_predictor():
    graph = import_graph()
    reached = {(m, t) for m, targets in graph.items() if room(m) == "heads" for t in targets if room(t) == "finetune"}
    assert reached <= HEADS_FINETUNE, f"heads import more of finetune: {sorted(reached - HEADS_FINETUNE)}"


def test_common_floors_import_only_downward():
    upward = upward_in_common(import_graph())
    assert not upward, "common/ imports against its floors' order: " + "; ".join(upward)
    assert upward_in_common({"common.fs": {"common.runs.rundir"}, "common.runs.rundir": {"common.fs"}}) == [
        "common.fs imports common.runs.rundir"]


def test_common_is_rooms_by_concern_each_with_its_one_line_docstring():
    floors = sorted(p.name for p in (ROOT / "common").iterdir() if p.is_dir() and not p.name.startswith("__"))
    assert floors == sorted(COMMON_FLOORS[1:])
    for name in floors:
        doc = ast.get_docstring(ast.parse((ROOT / "common" / name / "__init__.py").read_text()))
        assert doc and "\n" not in doc, name
    ground = sorted(p.stem for p in (ROOT / "common").glob("*.py") if p.stem != "__init__")
    assert ground == ["atomic", "choices", "config", "fs"]


LONGEST = 80  # lines a function may take outside tests: about a screen, so each reads as one job


def long_functions(modules: dict[str, Path]) -> list[str]:
    """`module.function (N lines)` for every function (or method) longer than LONGEST lines."""
    found = []
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > LONGEST:
                    found.append(f"{name}.{node.name} ({lines} lines)")
    return sorted(found)


def test_no_function_over_a_screen(tmp_path):
    found = long_functions(project_modules())
    assert not found, f"functions over {LONGEST} lines: " + "; ".join(found)
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "m.py").write_text("def short():\n    pass\n\n\nclass C:\n    def long(self):\n"
                                           + "        x = 1\n" * LONGEST)
    assert long_functions(project_modules(tmp_path, ("pkg",))) == [f"pkg.m.long ({LONGEST + 1} lines)"]
