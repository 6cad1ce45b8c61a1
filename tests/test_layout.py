"""The shape of the code: arrows run one way. The project's import graph, read from the source
(imports inside functions included), has no circle; model.py imports nothing of the project; the
core never imports a later stage; sampling and chatting reach only what they use."""
import ast
import os
from pathlib import Path

from conftest import ROOT

# the core: what every stage and every script builds on (adapters: a checkpoint may hold one)
CORE = {"model", "data_utils", "miniglm.tokenizer", "miniglm.chat_template", "miniglm.constraint",
        "miniglm.generation", "miniglm.checkpoint", "miniglm.adapters"}
# what sample.py and the Gradio page may reach: the core, and nothing of training or later stages; the
# page's Inside tab also looks inside the model (miniglm/inside.py) and draws with visualize.py
SAMPLING_REACH = {"sample": CORE, "sample_gradio": CORE | {"miniglm.inside", "visualize"}}
LATER_STAGES = ("miniglm.align", "miniglm.export", "miniglm.batching", "miniglm.distributed", "miniglm.trainer",
                "train", "evaluations", "serve", "export_hf", "export_gguf")


def project_modules(root):
    """{module name: file} of the root's .py files and its packages' (tests, benchmarks, data scripts left out)."""
    modules = {}
    skip = {"tests", "benchmarks", "data", "notebooks", "out", "hf", "plots", "__pycache__"}
    files = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [d for d in subfolders if d not in skip and not d.startswith(".")]  # (.venv, .git)
        files += [Path(folder) / name for name in names if name.endswith(".py")]
    for path in sorted(files):
        rel = path.relative_to(root)
        parts = list(rel.with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def imported_names(node, module, is_package):
    """The dotted names an import statement may refer to (a relative import resolved against module)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        package = module.split(".") if is_package else module.split(".")[:-1]
        package = package[:len(package) - node.level + 1]
        base = ".".join(package + ([base] if base else []))
    return [base] + [f"{base}.{alias.name}" for alias in node.names]


def import_graph(root):
    """{module: the project's modules it imports}, every import statement counted, lazy ones too."""
    modules = project_modules(root)
    graph = {}
    for module, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            for name in imported_names(node, module, path.name == "__init__.py"):
                while name and name not in modules:  # `from pkg import mod` names pkg.mod; `import a.b.c` a.b.c
                    name = name.rpartition(".")[0]
                if name and name != module:
                    deps.add(name)
        graph[module] = deps
    return graph


def circles(graph):
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
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
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def reach(graph, module):
    """Every module that importing `module` imports, itself left out."""
    seen, todo = set(), [module]
    while todo:
        m = todo.pop()
        for dep in graph.get(m, ()):
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen - {module}


def test_no_import_circle():
    assert circles(import_graph(ROOT)) == []


def test_model_imports_nothing_of_the_project():
    assert import_graph(ROOT)["model"] == set()


def test_the_core_never_imports_a_later_stage():
    graph = import_graph(ROOT)
    for module in CORE:
        assert reach(graph, module) <= CORE, (module, reach(graph, module) - CORE)


def test_sampling_reaches_only_what_it_uses():
    graph = import_graph(ROOT)
    for script in ("sample", "sample_gradio"):
        reached = reach(graph, script)
        assert reached <= SAMPLING_REACH[script], (script, reached - SAMPLING_REACH[script])
        assert not [m for m in reached if m.startswith(LATER_STAGES)]


def test_the_pretraining_and_sft_trainer_stands_alone():
    """miniglm/trainer.py (pretraining and SFT) reaches no later stage: the stages plug into it."""
    reached = reach(import_graph(ROOT), "miniglm.trainer")
    assert not [m for m in reached if m.startswith(("miniglm.align", "miniglm.export", "miniglm.batching", "train"))]


def test_the_checks_can_fail(tmp_path):
    """A lazy import that closes a circle, and a core module that reaches a later stage, are found."""
    (tmp_path / "model.py").write_text("import torch\n")
    (tmp_path / "a.py").write_text("import b\n")
    (tmp_path / "b.py").write_text("def f():\n    from a import g  # lazy: still an arrow\n")
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "core.py").write_text("from . import stage\n")
    (tmp_path / "pkg" / "stage.py").write_text("from model import GPT\n")
    graph = import_graph(tmp_path)
    assert circles(graph) == [["a", "b"]]
    assert graph["pkg.core"] == {"pkg", "pkg.stage"} and reach(graph, "pkg.core") == {"pkg", "pkg.stage", "model"}
