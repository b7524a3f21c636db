"""Recipes: one module per system of the book, each with a config dataclass and `run(config, run_dir)`.

A recipe module defines, at module level::

    @dataclass
    class Config: ...                       # defaults = the book's settings; PRESETS = {"smoke": {...}, ...}
    def run(config, run_dir=None) -> RunDir # trains, evaluates, writes the run folder, returns it
    def evaluate(run_dir, device="auto") -> dict  # re-evaluates a finished run folder on a device (optional)
    RECIPE = Recipe(name="translator-rnn", chapter="14", summary="...", config=Config, run=run, evaluate=evaluate)

Modules are discovered: adding `torchbook/recipes/my_recipe.py` with a `RECIPE` is all it takes to appear in
`torchbook list`. Listing reads each module's `RECIPE = Recipe(NAME, "chapter", "summary", ...)` line from its
source without importing it (`recipe_infos`), so that `torchbook list` and a mistyped recipe name answer at once
instead of importing torch and every recipe's libraries; keep name, chapter and summary literal (or module-level
string constants).
"""

from __future__ import annotations

import ast
import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torchbook.errors import unknown


@dataclass(frozen=True)
class Recipe:
    name: str
    chapter: str
    summary: str
    config: type
    run: Callable[..., Any]
    evaluate: Callable[..., dict[str, Any]] | None = None
    predict: Callable[..., Any] | None = None  # predict(run_dir, input_path) -> DataFrame, for `torchbook predict`

    @property
    def module(self) -> str:
        return self.run.__module__


def module_name(recipe_name: str) -> str:
    """`translator-rnn` lives in `torchbook.recipes.translator_rnn`."""
    return f"{__name__}.{recipe_name.replace('-', '_')}"


@dataclass(frozen=True)
class RecipeInfo:
    """What `torchbook list` shows of a recipe, read from its module's source (see the module docstring)."""

    name: str
    chapter: str
    summary: str
    module: str


def _chapter_order(chapter: str, name: str) -> tuple[float, str]:
    digits = "".join(ch for ch in chapter.split("-")[0] if ch.isdigit())
    return (float(digits) if digits else 99.0, name)


def _read_info(path: Path) -> RecipeInfo | None:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    constants = {target.id: node.value.value for node in tree.body if isinstance(node, ast.Assign)
                 and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)
                 for target in node.targets if isinstance(target, ast.Name)}

    def text(node: ast.expr | None) -> str | None:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return node.value
        return constants.get(node.id) if isinstance(node, ast.Name) else None

    for node in tree.body:
        if (isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "RECIPE" for t in node.targets)
                and isinstance(node.value, ast.Call)):
            args: list[ast.expr | None] = [*node.value.args[:3], *[None] * 3][:3]
            for keyword in node.value.keywords:
                if keyword.arg in ("name", "chapter", "summary"):
                    args[("name", "chapter", "summary").index(keyword.arg)] = keyword.value
            name, chapter, summary = (text(a) for a in args)
            if name and chapter is not None and summary is not None:
                return RecipeInfo(name, chapter, summary, f"{__name__}.{path.stem}")
    return None


def recipe_infos() -> dict[str, RecipeInfo]:
    """Every recipe's name, chapter and summary, sorted by chapter then name, without importing any recipe."""
    infos = []
    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_"):
            found = _read_info(Path(__path__[0]) / f"{info.name}.py")
            if found is not None:
                infos.append(found)
    return {i.name: i for i in sorted(infos, key=lambda i: _chapter_order(i.chapter, i.name))}


def all_recipes() -> dict[str, Recipe]:
    """Every implemented recipe, by name, sorted by chapter then name."""
    found = {}
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        recipe = getattr(module, "RECIPE", None)
        if isinstance(recipe, Recipe):
            found[recipe.name] = recipe

    return {r.name: r for r in sorted(found.values(), key=lambda r: _chapter_order(r.chapter, r.name))}


def get_recipe(name: str) -> Recipe:
    """The recipe called `name`; an error listing the accepted names (closest first) if there is none."""
    try:
        module = importlib.import_module(module_name(name))
        recipe = getattr(module, "RECIPE", None)
        if isinstance(recipe, Recipe) and recipe.name == name:
            return recipe
    except ModuleNotFoundError as e:
        if e.name != module_name(name):
            raise
    raise unknown("recipe", name, recipe_infos())
