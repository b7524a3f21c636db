"""`torchbook play RUN_DIR`: record a GIF of a saved reinforcement-learning policy."""

from __future__ import annotations

import argparse

NAME = "play"
HELP = "record a GIF of a trained policy (reinforcement-learning runs)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="a run folder of an RL recipe (e.g. cartpole-ppo, breakout-ppo)")
    parser.add_argument("--output", help="the GIF's path (default: RUN_DIR/plots/play-SEED.gif)")
    parser.add_argument("--seed", type=int, default=0, help="the episode's seed (default 0)")
    parser.add_argument("--device", default="cpu", help="where the policy runs: cpu (default: one game steps one "
                        "observation at a time, which a GPU does not speed up), auto, cuda, cuda:N, mps")


def main(args: argparse.Namespace) -> int:
    import torchbook
    from torchbook.errors import CheckpointError
    from torchbook.rl.envs import record_gif
    from torchbook.runs import RunDir

    run = RunDir.open(args.run_dir)
    loaded = torchbook.load(run.path, map_location=args.device)
    env_id = loaded.meta["extra"].get("env_id")
    if env_id is None or not hasattr(loaded.model, "act"):
        raise CheckpointError(f"{args.run_dir!r} holds no reinforcement-learning policy (recipe {run.recipe!r})")
    path = args.output or run.plots / f"play-{args.seed}.gif"
    print(record_gif(loaded.model.act, env_id, path, seed=args.seed))
    return 0
