"""`torchbook predict RUN_DIR FILE.csv` (rows of a CSV file) or `torchbook predict RUN_DIR IMAGE...` (image runs:
the top classes of each PNG/JPEG, optionally with a saliency overlay)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

NAME = "predict"
HELP = "predict with a finished run's model: rows of a CSV file (housing) or image files (cnn, vit, ...)"
DESCRIPTION = ("With FILE.csv: check its columns against what the run's model expects (a clear error names missing "
               "or mistyped columns), and write the rows with a prediction column as CSV. With image files (image "
               "runs: cnn, vit, image-classifier, transfer-learning): write image,rank,class,probability rows, the "
               "top classes of each image, to stdout or --output.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = ("Examples: torchbook predict runs/housing/ID districts.csv --output predictions.csv\n"
                     "          torchbook predict runs/cnn/ID shirt.png boot.jpg --top 3 --saliency overlays/")
    parser.add_argument("run_dir", help="a finished run folder whose recipe can predict (housing, or an image run)")
    parser.add_argument("inputs", type=Path, nargs="+", metavar="FILE", help="one CSV file, or image files")
    parser.add_argument("--output", "-o", type=Path, help="write the predictions here (CSV) instead of stdout")
    parser.add_argument("--top", type=int, default=3, help="images: how many classes to list per image (default 3)")
    parser.add_argument("--saliency", type=Path, metavar="DIR", help="images: write a saliency overlay per image here")
    parser.add_argument("--invert", action="store_true",
                        help="images: dark objects on a light background (Fashion-MNIST is light on black)")


def main(args: argparse.Namespace) -> int:
    from torchbook.data.image_transforms import IMAGE_SUFFIXES  # torch: imported here, not at `--help`
    from torchbook.errors import UserInputError
    from torchbook.io import atomic_write_text

    if all(p.suffix.lower() in IMAGE_SUFFIXES for p in args.inputs):
        from torchbook.train.image_predict import predict_images

        predictions = predict_images(args.run_dir, args.inputs, args.top, args.invert, args.saliency)
        lines = ["image,rank,class,probability"]
        for prediction in predictions:
            for rank, (name, probability) in enumerate(prediction.top, start=1):
                lines.append(f'"{prediction.path}",{rank},"{name}",{probability:.6f}')
        text = "\n".join(lines) + "\n"
        count = f"{len(predictions):,} images classified"
        if args.saliency:
            print(f"saliency overlays written to {args.saliency}", file=sys.stderr)
    else:
        if len(args.inputs) != 1 or args.inputs[0].suffix.lower() != ".csv":
            raise UserInputError("give one CSV file, or image files (" + ", ".join(IMAGE_SUFFIXES) + ")")
        from torchbook.recipes import get_recipe
        from torchbook.runs import RunDir

        run = RunDir.open(args.run_dir)
        recipe = get_recipe(run.recipe)
        if recipe.predict is None:
            raise UserInputError(f"recipe {recipe.name!r} does not predict from CSV files; see its report.md")
        table = recipe.predict(run, args.inputs[0])
        text, count = table.to_csv(index=False), f"{len(table):,} predictions"
    if args.output:
        atomic_write_text(args.output, text)
        print(f"{count} written to {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0
