"""`torchbook predict RUN_DIR FILE.csv`: predictions of a run's saved model for the rows of a CSV file."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

NAME = "predict"
HELP = "predict with a finished run's model from a CSV file (e.g. housing districts)"
DESCRIPTION = ("Read FILE.csv, check its columns against what the run's model expects (a clear error names missing "
               "or mistyped columns), and write the rows with a prediction column as CSV to stdout or --output.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = "Example: torchbook predict runs/housing/ID districts.csv --output predictions.csv"
    parser.add_argument("run_dir", help="a finished run folder whose recipe can predict (e.g. housing)")
    parser.add_argument("csv", type=Path, help="input rows as CSV")
    parser.add_argument("--output", "-o", type=Path, help="write the predictions here instead of stdout")


def main(args: argparse.Namespace) -> int:
    from torchbook.io import atomic_write_text
    from torchbook.recipes import get_recipe
    from torchbook.runs import RunDir

    run = RunDir.open(args.run_dir)
    recipe = get_recipe(run.recipe)
    if recipe.predict is None:
        from torchbook.errors import UserInputError

        raise UserInputError(f"recipe {recipe.name!r} does not predict from CSV files; see its report.md")
    predictions = recipe.predict(run, args.csv)
    text = predictions.to_csv(index=False)
    if args.output:
        atomic_write_text(args.output, text)
        print(f"{len(predictions):,} predictions written to {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0
