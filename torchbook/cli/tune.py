"""`torchbook tune RECIPE --trials N name=SPACE ...`: hyperparameter search with Optuna (book chapter 10)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from torchbook.cli import PRESET_NAMES_DOC

NAME = "tune"
HELP = "search a recipe's hyperparameters with Optuna (TPE sampler, median pruner), resumable"
DESCRIPTION = (
    "Run RECIPE --trials times with values sampled from each key=SPACE (SPACE: loguniform(LOW,HIGH), "
    "uniform(LOW,HIGH), int(LOW,HIGH), logint(LOW,HIGH), choice(A,B,...)); key=value items stay fixed. "
    "Trials report the validation metric `monitor` (default val_loss) each epoch to a median pruner. The study is "
    "a SQLite file in the tuning folder: run the same command with the same --dir to resume an interrupted search."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = ("Example: torchbook tune image-classifier --trials 20 'lr=loguniform(1e-4,1e-1)' "
                     "'hidden=int(20,300)' monitor=val_accuracy epochs=10")
    parser.add_argument("recipe", help="recipe name (see `torchbook list`)")
    parser.add_argument("items", nargs="*", metavar="key=SPACE|key=value", help="searched and fixed config values")
    parser.add_argument("--trials", type=int, required=True, help="finished trials wanted in total (resumes count)")
    parser.add_argument("--preset", help=f"the recipe's named settings: {PRESET_NAMES_DOC}")
    parser.add_argument("--dir", type=Path, help="tuning folder (default: runs/tune/RECIPE/TIMESTAMP)")
    parser.add_argument("--seed", type=int, default=42, help="the TPE sampler's seed")
    parser.add_argument("--pruner-startup-trials", type=int, default=5, help="trials before the pruner prunes")
    parser.add_argument("--pruner-warmup-epochs", type=int, default=1, help="epochs of each trial never pruned")
    # argparse stops filling a positional list at the first option; accept key=... items after options too.
    parse_known = parser.parse_known_args

    def parse_known_args(args: Any = None, namespace: Any = None) -> Any:
        parsed, extras = parse_known(args, namespace)
        late = [e for e in extras if "=" in e and not e.startswith("-")]
        parsed.items = list(parsed.items or []) + late
        return parsed, [e for e in extras if e not in late]

    parser.parse_known_args = parse_known_args  # type: ignore[method-assign,assignment]


def main(args: argparse.Namespace) -> int:
    import sys

    from torchbook.recipes import get_recipe
    from torchbook.train.tune import tune

    recipe = get_recipe(args.recipe)
    try:
        result = tune(recipe, args.trials, args.items, preset=args.preset, folder=args.dir, seed=args.seed,
                      pruner_startup_trials=args.pruner_startup_trials, pruner_warmup_epochs=args.pruner_warmup_epochs)
    except KeyboardInterrupt:
        where = f" --dir {args.dir}" if args.dir else " --dir <the tuning folder>"
        print(f"\ntorchbook: interrupted; resume with the same command and{where}", file=sys.stderr)
        return 130
    params = ", ".join(f"{k}={v}" for k, v in result.best_params.items())
    print(f"best trial {result.best_number}: {result.best_value:.6g} with {params} ({result.best_run})")
    print(f"report: {result.folder / 'report.md'}")
    return 0
