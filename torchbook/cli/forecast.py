"""`torchbook forecast RUN_DIR --days 14`: forecast Chicago's rail ridership with a trained `ridership` run."""

from __future__ import annotations

import argparse

NAME = "forecast"
HELP = "forecast rail ridership with a trained ridership run (prints a table, writes a plot)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="a run folder of the ridership recipe")
    parser.add_argument("--days", type=int, default=14, help="how many days to forecast (default 14)")
    parser.add_argument("--device", default="auto", help="where the model runs: auto (a GPU when there is one), cpu, "
                        "cuda, cuda:N, mps")
    parser.add_argument("--end", help="forecast from the data up to this date (YYYY-MM-DD; default: the last day)")


def main(args: argparse.Namespace) -> int:
    from torchbook.data.timeseries import load_ridership
    from torchbook.recipes.ridership import forecast, plot_forecast
    from torchbook.runs import RunDir

    table = forecast(args.run_dir, args.days, args.end, device=args.device)
    print(table.to_string())
    path = RunDir.open(args.run_dir).plots / f"forecast-{table.index[0].date()}-{args.days}d.png"
    plot_forecast(path, load_ridership(), table)
    print(f"plot: {path}")
    return 0
