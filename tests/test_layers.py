"""The house rules that keep the layers clean (docs/DEVELOPING.md), checked on the source itself.

import-linter (`make lint`) checks that layers only point down and that no recipe imports another; these tests
check what it does not: no import cycles at all, imports inside functions only for heavy or optional
dependencies, and a library that neither prints nor names the command's flags.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import time
from pathlib import Path

import grimp

PACKAGE = Path(__file__).resolve().parents[1] / "torchbook"
# Third-party packages slow to import or optional (extras): the only ones a library function may import late.
HEAVY = {"torch", "torchmetrics", "transformers", "sklearn", "scipy", "pandas", "matplotlib", "gymnasium", "ale_py",
         "optuna", "statsmodels", "gguf", "huggingface_hub", "jinja2", "sacrebleu", "joblib", "tensorboard", "PIL",
         "diffusers", "captum", "torchao", "peft", "trl",
         "lancedb", "pyarrow", "bm25s", "psycopg", "pgvector", "pypdf",
         "llguidance", "jsonschema", "xgrammar", "outlines_core",
         "pint",  # the chat extra (issue #22)
         "uvicorn"}  # the serve extra (issue #24): only `torchbook serve` starts a web server
# torchbook's own modules that are heavy because of what they import (matplotlib).
HEAVY_OWN = {"torchbook.plots"}
# Front ends: they import the library late so that `torchbook --help` and `torchbook list` stay fast.
FRONT_ENDS = ("cli/", "__init__.py", "__main__.py")


def python_files() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def late_imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            for sub in ast.walk(node):
                if isinstance(sub, ast.Import):
                    found += [(sub.lineno, alias.name) for alias in sub.names]
                elif isinstance(sub, ast.ImportFrom) and sub.level == 0 and sub.module:
                    found.append((sub.lineno, sub.module))
    return found


def test_imports_inside_functions_are_only_for_heavy_or_optional_dependencies() -> None:
    offenders = []
    for path in python_files():
        relative = path.relative_to(PACKAGE).as_posix()
        if relative.startswith(FRONT_ENDS[0]) or relative in FRONT_ENDS[1:]:
            continue
        for line, module in late_imports(path):
            if module.split(".")[0] not in HEAVY and module not in HEAVY_OWN:
                offenders.append(f"torchbook/{relative}:{line} imports {module} inside a function")
    assert not offenders, "\n".join(offenders)


def test_no_import_cycles() -> None:
    graph = grimp.build_graph("torchbook")
    edges = {m: set(graph.find_modules_directly_imported_by(m)) for m in graph.modules}
    cycles, index, low, stack, on_stack = [], {}, {}, [], set()

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
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
                cycles.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for module in sorted(edges):
        if module not in index:
            visit(module)
    assert not cycles, f"import cycles: {cycles}"


def test_the_library_neither_prints_nor_names_command_flags() -> None:
    flag = re.compile(r"""["'][^"'\n]*\s--[a-z][a-z-]+""")
    offenders = []
    for path in python_files():
        relative = path.relative_to(PACKAGE).as_posix()
        if relative.startswith(FRONT_ENDS[0]):
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "print":
                offenders.append(f"torchbook/{relative}:{node.lineno} prints")
            if isinstance(node, ast.Raise) and node.exc is not None:
                text = ast.get_source_segment(path.read_text(), node.exc) or ""
                if flag.search(text) and "pip install" not in text:
                    offenders.append(f"torchbook/{relative}:{node.lineno} names a command flag in an error")
    assert not offenders, "\n".join(offenders)


def test_help_and_list_stay_fast_and_import_no_torch() -> None:
    code = ("import sys, time; t = time.perf_counter(); from torchbook.cli import main\n"
            "try:\n    main(['list'])\nexcept SystemExit:\n    pass\n"
            "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH', time.perf_counter() - t, file=sys.stderr)")
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "image-classifier" in result.stdout and "translator" in result.stdout
    assert "NO-TORCH" in result.stderr, "torchbook list imported torch"
    assert time.perf_counter() - started < 20


def test_recipe_list_read_from_source_matches_the_imported_recipes() -> None:
    from torchbook.recipes import all_recipes, recipe_infos

    infos = recipe_infos()
    imported = all_recipes()
    assert list(infos) == list(imported)
    for name, recipe in imported.items():
        assert (infos[name].chapter, infos[name].summary, infos[name].module) == (
            recipe.chapter, recipe.summary, recipe.module)
