"""Recipes: one module per system of the book, each with a config dataclass and `run(config, run_dir)`.

A recipe module defines, at module level::

    @dataclass
    class Config: ...                       # defaults = the book's settings; PRESETS = {"smoke": {...}, ...}
    def run(config, run_dir=None) -> RunDir # trains, evaluates, writes the run folder, returns it
    def evaluate(run_dir) -> dict           # re-evaluates a finished run folder (optional)
    RECIPE = Recipe(name="translator-rnn", chapter="14", summary="...", config=Config, run=run, evaluate=evaluate)

Modules are discovered: adding `torchbook/recipes/my_recipe.py` with a `RECIPE` is all it takes to appear in
`torchbook list`.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
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

    def order(r: Recipe) -> tuple[float, str]:
        digits = "".join(ch for ch in r.chapter.split("-")[0] if ch.isdigit())
        return (float(digits) if digits else 99.0, r.name)

    return {r.name: r for r in sorted(found.values(), key=order)}


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
    raise unknown("recipe", name, all_recipes())
