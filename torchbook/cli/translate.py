"""`torchbook translate RUN_DIR "I like soccer"`: English to Spanish with a trained translator run.

With no text argument, reads English lines from stdin and writes one Spanish line per input line (an empty line
gives an empty line). `--beam N` uses beam search of width N (default: greedy).
"""

from __future__ import annotations

import argparse
import sys

NAME = "translate"
HELP = "translate English to Spanish with a trained translator or translator-rnn run"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="a run folder of the translator or translator-rnn recipe")
    parser.add_argument("text", nargs="*", help="English text (default: read lines from stdin)")
    parser.add_argument("--beam", type=int, default=1, help="beam width (default 1: greedy decoding)")
    parser.add_argument("--length-penalty", type=float, default=1.0,
                        help="beam search ranks by log-prob / length ** this (default 1.0)")
    parser.add_argument("--device", default="auto", help="where the model runs: auto (a GPU when there is one), cpu, "
                        "cuda, cuda:N, mps")


def main(args: argparse.Namespace) -> int:
    from torchbook.devices import check_device
    from torchbook.errors import UserInputError
    from torchbook.train.translation import translate_run

    if args.beam < 1:
        raise UserInputError(f"--beam {args.beam} must be at least 1")
    check_device(args.device)
    lines = [" ".join(args.text)] if args.text else sys.stdin.read().splitlines()
    for line in translate_run(args.run_dir, lines, args.beam, args.length_penalty, device=args.device):
        print(line)
    return 0
