"""The `torchbook` command: parses, dispatches, prints. No logic of its own.

Core commands live here (list, run, report, eval). Every other command is a module in this package defining
`NAME`, `HELP`, `add_arguments(parser)` and `main(args) -> int`; it is discovered, so adding a command never
edits this file. Errors a user can fix print as one line (`torchbook: error: ...`) with exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import pkgutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torchbook import __version__
from torchbook.allocator import allocator_in_use, guard_dirty_pages, reexec_with_faster_allocator
from torchbook.errors import RunExists, RunFinished, TorchbookError, UserInputError

EXIT_USAGE = 2
PRESET_NAMES_DOC = ("usually smoke (seconds, the whole pipeline), quick (minutes, the quality "
                    "gate) and book (the book's); `torchbook run RECIPE --help` lists a recipe's own")


class Parser(argparse.ArgumentParser):
    """argparse, but errors name the closest accepted choice first and never print a traceback."""

    def error(self, message: str) -> Any:  # type: ignore[override]
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


class NoticeFormatter(logging.Formatter):
    """The library's log records as the CLI's notices: `torchbook: ...`, `torchbook: warning: ...`."""

    def format(self, record: logging.LogRecord) -> str:
        prefix = "torchbook: warning: " if record.levelno >= logging.WARNING else "torchbook: "
        return prefix + record.getMessage()


class StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever `sys.stderr` is at the time (tests and callers may replace it)."""

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def show_library_notices(level: int = logging.INFO) -> None:
    """The library logs (`logging.getLogger("torchbook...")`) and never prints: the CLI shows its notices on stderr."""
    logger = logging.getLogger("torchbook")
    if not any(isinstance(h.formatter, NoticeFormatter) for h in logger.handlers):
        handler = StderrHandler()
        handler.setFormatter(NoticeFormatter())
        logger.addHandler(handler)
    logger.setLevel(level)


def cmd_list(args: argparse.Namespace) -> int:
    from torchbook.recipes import recipe_infos

    recipes = recipe_infos()
    width = max((len(n) for n in recipes), default=10)
    for name, recipe in recipes.items():
        print(f"{name:<{width}}  ch {recipe.chapter:<6} {recipe.summary}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from torchbook.config import build_config, load_config_file
    from torchbook.recipes import get_recipe
    from torchbook.runs import RESUME_SETTINGS, RunDir

    recipe = get_recipe(args.recipe)
    if args.resume:
        run = RunDir.open(args.resume)
        if run.recipe != recipe.name:
            raise UserInputError(f"{args.resume!r} is a run of {run.recipe!r}, not {recipe.name!r}")
        if args.preset or args.config:
            raise UserInputError("--resume continues a run with its own config.json; drop --preset and --config")
        fixed = [item for item in args.overrides if item.split("=", 1)[0] not in RESUME_SETTINGS]
        if fixed:
            raise UserInputError(f"--resume continues a run with its own config.json; only {', '.join(RESUME_SETTINGS)} "
                                 f"may change (how it computes, not what it learns): drop {' '.join(fixed)}")
        if run.finished:
            print(f"torchbook: {run.path} is a finished run (report.md is written); nothing to resume. "
                  f"Its report: torchbook report {run.path}", file=sys.stderr)
            return 0
        config: Any = build_config(recipe.config, base=run.config_values(), overrides=args.overrides)
    else:
        base = load_config_file(args.config) if args.config else None
        config = build_config(recipe.config, preset=args.preset, overrides=args.overrides, base=base)
        try:
            run = RunDir.start(args.run_dir, recipe.name, config, overwrite=args.overwrite)
        except RunFinished as e:
            raise UserInputError(f"{e}; see it with `torchbook report`, or pass --overwrite to train it again") from None
        except RunExists as e:
            hint = "pick another --run-dir" if "not a torchbook run" in str(e) else (
                "resume it with --resume, pick another --run-dir, or pass --overwrite")
            raise UserInputError(f"{e}; {hint}") from None
    print(f"torchbook: {recipe.name} -> {run.path}", file=sys.stderr)
    try:
        recipe.run(config, run)
    except KeyboardInterrupt:
        print(f"\ntorchbook: interrupted; resume with: torchbook run {recipe.name} --resume {run.path}", file=sys.stderr)
        return 130
    except (TorchbookError, OSError) as e:
        run.mark_failed(str(e))  # `torchbook report` says why; the folder and its checkpoints stay
        raise
    report = run.path / "report.md"
    if report.exists():
        print(f"report: {report}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from torchbook.runs import RunDir

    run = RunDir.open(args.run_dir)
    report = run.path / "report.md"
    if not report.exists():
        if run.failure is not None:
            raise UserInputError(f"{str(run.path)!r} failed: {run.failure}. Fix that and resume it with "
                                 f"`torchbook run {run.recipe} --resume {run.path}`, or start a new run")
        raise UserInputError(f"{str(run.path)!r} has no report.md yet (the run did not finish); resume it with "
                             f"`torchbook run {run.recipe} --resume {run.path}`")
    print(report.read_text())
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from torchbook.devices import check_device
    from torchbook.recipes import get_recipe
    from torchbook.runs import RunDir

    check_device(args.device)
    run = RunDir.open(args.run_dir)
    recipe = get_recipe(run.recipe)
    if recipe.evaluate is None:
        raise UserInputError(f"recipe {recipe.name!r} has no separate evaluation; see its report.md")
    metrics = recipe.evaluate(run, device=args.device)
    print(json.dumps(metrics, indent=2, default=str))
    return 0


def plugin_commands() -> list[Any]:
    """Modules of this package that define a command (NAME, HELP, add_arguments, main)."""
    found = []
    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_"):
            module = importlib.import_module(f"{__name__}.{info.name}")
            if hasattr(module, "NAME") and hasattr(module, "main"):
                found.append(module)
    return sorted(found, key=lambda m: m.NAME)


class RecipeHelp(argparse.Action):
    """`torchbook run RECIPE --help`: the command's help, then the recipe's config keys and presets."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS, **kwargs: Any) -> None:
        super().__init__(option_strings, dest=dest, nargs=0, default=argparse.SUPPRESS,
                         help="show this help; after RECIPE, also the recipe's config keys and presets")

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        parser.print_help()
        name = getattr(namespace, "recipe", None)
        if name:
            from torchbook.config import describe_config
            from torchbook.recipes import get_recipe

            try:
                recipe = get_recipe(name)
            except TorchbookError as e:
                parser.exit(EXIT_USAGE, f"torchbook: error: {e}\n")
            print(f"\n{recipe.name} (chapter {recipe.chapter}): {recipe.summary}\n")
            print(describe_config(recipe.config))
        parser.exit()


def build_parser() -> Parser:
    parser = Parser(prog="torchbook", description="Run, study and use every system of the book.")
    parser.add_argument("--version", action="version", version=f"torchbook {__version__} (memory allocator: {allocator_in_use()})",
                        help="show the version and the memory allocator this process runs on, then exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True

    p = sub.add_parser("list", help="list the implemented recipes with their chapter",
                       description="List every recipe (a system of the book) with its chapter and a one-line summary. "
                                   "`torchbook run RECIPE --help` shows a recipe's config keys and presets.")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser(
        "run",
        add_help=False,
        help="train a recipe and write its run folder",
        description="Train RECIPE, evaluate it against the book's figure, write runs/RECIPE/RUN-ID/.",
        epilog="Examples: torchbook run image-classifier --preset quick | "
        "torchbook run regression-mlp lr=0.01 epochs=5 | torchbook run image-classifier --resume runs/image-classifier/ID",
    )
    p.add_argument("-h", "--help", action=RecipeHelp)
    p.add_argument("recipe", help="recipe name (see `torchbook list`)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, parsed by the field's type")
    p.add_argument("--preset", help=f"named settings: {PRESET_NAMES_DOC}")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its last good checkpoint; key=value may change only "
                   "device, num_workers, progress, compile, activation_checkpointing and release_memory (e.g. "
                   "activation_checkpointing=true after running out of memory)")
    p.add_argument("--config", metavar="FILE", help="start from a config.json written by an earlier run")
    p.add_argument("--run-dir", type=Path, help="where to write the run (default: runs/RECIPE/TIMESTAMP)")
    p.add_argument("--overwrite", action="store_true", help="replace --run-dir if it already holds a run")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("report", help="print a run's report.md",
                       description="Print RUN_DIR/report.md: our figures beside the book's, the data source, the "
                                   "wall-clock time and the plots' paths. An unfinished or failed run says so.")
    p.add_argument("run_dir", help="a run folder")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("eval", help="re-evaluate a finished run folder and print its metrics as JSON",
                       description="Reload RUN_DIR's saved model (checksums verified) and evaluate it again on the "
                                   "run's own test data; prints the metrics as JSON.")
    p.add_argument("run_dir", help="a run folder")
    p.add_argument("--device", default="auto", help="where the model runs: auto (a GPU when there is one), cpu, "
                                                     "cuda, cuda:N or mps (default: auto)")
    p.set_defaults(func=cmd_eval)

    for module in plugin_commands():
        p = sub.add_parser(module.NAME, help=module.HELP, description=getattr(module, "DESCRIPTION", module.HELP))
        module.add_arguments(p)
        p.set_defaults(func=module.main)
    for command in sub.choices.values():
        command.add_argument("--threads", type=int, metavar="N",
                             help="CPU threads for torch (default: one per core; threads that find the cores busy "
                                  "wait passively, so other work on the machine does not stall them)")
        # each command's own options, to name the one an error is about
        command.set_defaults(flags={o for action in command._actions for o in action.option_strings})
    return parser


def set_threads(threads: int | None) -> None:
    """Before torch is imported: OpenMP threads that wait passively (measured on 2 busy cores, a char-rnn smoke run
    took 90 s with spinning threads, 23 s passive, 20 s with one thread; docs/training.md), and `--threads N`."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if threads is not None:
        if threads < 1:
            raise UserInputError(f"--threads {threads} must be at least 1")
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)
        import torch  # only when asked: the number of threads of an already-imported torch is set here

        torch.set_num_threads(threads)


def console_main() -> int:
    """The `torchbook` command (and `python -m torchbook`): re-executes itself once on jemalloc when it is installed
    (`torchbook.allocator`: CPU training's low peak memory with fewer page faults than glibc's) and bounds the freed
    pages it keeps, then `main()`."""
    try:
        reexec_with_faster_allocator()
        guard_dirty_pages()
    except UserInputError as e:
        print(f"torchbook: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    return main()


def main(argv: Sequence[str] | None = None) -> int:
    show_library_notices()
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # `key=value` overrides may come after options (`run RECIPE --preset smoke lr=0.1`); anything else is an error.
    if extra and getattr(args, "overrides", None) is not None and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra and getattr(args, "words", None) is not None and not any(e.startswith("-") for e in extra):
        args.words = [*args.words, *extra]  # `generate MODEL --chat "question"`: words after an option
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        set_threads(getattr(args, "threads", None))
        return int(args.func(args) or 0)
    except TorchbookError as e:
        flag = f"--{e.param.replace('_', '-')}" if e.param else ""
        flag = f"{flag}: " if flag in getattr(args, "flags", ()) else ""  # the setting is this command's option
        print(f"torchbook: error: {flag}{e}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:
        return 0
    except UnicodeDecodeError as e:
        print(f"torchbook: error: the input is not valid UTF-8 text (byte {e.start}); give UTF-8 text", file=sys.stderr)
        return EXIT_USAGE
    except OSError as e:  # a read-only folder, a full disk, a file that cannot be read: what, where, and no traceback
        where = f": {e.filename}" if e.filename else ""
        print(f"torchbook: error: {e.strerror or e}{where}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
