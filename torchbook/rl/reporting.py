"""What every reinforcement-learning recipe does after training: evaluate over seeded episodes, compare with the
book's lean policy (CartPole), draw the learning curve against environment steps and wall-clock time, record a
GIF, save the policy and write the report."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

import torchbook
from torchbook.hub import save_model
from torchbook.report import Report
from torchbook.rl.atari import random_policy
from torchbook.rl.envs import Policy, evaluate, is_atari, lean_policy, record_gif
from torchbook.runs import RunDir

BOOK_LEAN_MEAN = 41.7  # the book's hard-coded CartPole policy over 500 seeded episodes
RANDOM_SCORES = {"ALE/Breakout-v5": 1.7}  # random play, Mnih et al. (2015), Nature's extended data table 2


def learning_curve(run: RunDir, kind: str = "update") -> None:
    from torchbook.plots import plt, save_figure

    records = [r for r in run.metrics(kind) if r.get("mean_return") is not None]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for ax, key, label in ((axes[0], "env_steps", "environment steps"), (axes[1], "time_s", "wall-clock seconds")):
        ax.plot([r[key] for r in records], [r["mean_return"] for r in records])
        ax.set_xlabel(label)
        ax.set_ylabel("mean return (recent episodes)")
        ax.grid(alpha=0.3)
    save_figure(fig, run.plots / "learning_curve.png")


def baseline(env_id: str, n_actions: int) -> tuple[str, Policy, float | None, str] | None:
    """The policy each report compares with: the book's lean policy (CartPole) or random play (Atari)."""
    if env_id.startswith("CartPole"):
        return "lean", lean_policy, BOOK_LEAN_MEAN, "book: 500 seeded episodes"
    if is_atari(env_id):
        return ("random", random_policy(n_actions), RANDOM_SCORES.get(env_id),
                "Mnih et al. (2015): random play, 5-minute games")
    return None


def finish(run: RunDir, report: Report, model: nn.Module, env_id: str, eval_episodes: int,
           max_episode_steps: int = 0, seed: int = 0, gif: bool = True) -> dict[str, Any]:
    """Evaluate, compare, plot, record, save and report; return the results (also in results.json).
    `max_episode_steps` caps the evaluation episodes (0: the environment's own cap)."""
    save_model(model, run.model_dir, extra={"env_id": env_id})
    cap = max_episode_steps or None
    act: Policy = model.act  # type: ignore[assignment]
    returns = evaluate(act, env_id, eval_episodes, max_episode_steps=cap)
    results: dict[str, Any] = {"eval_mean_return": float(returns.mean()), "eval_std_return": float(returns.std()),
                               "eval_min_return": float(returns.min()), "eval_episodes": eval_episodes}
    config: Any = model.config
    compared = baseline(env_id, int(config.n_actions))
    if compared is not None:
        name, policy, book, note = compared
        results[f"{name}_mean_return"] = float(evaluate(policy, env_id, eval_episodes, max_episode_steps=cap).mean())
    training = [r for r in run.metrics("update") if r.get("time_s")]
    if training:
        results.update(env_steps=training[-1]["env_steps"], train_time_s=training[-1]["time_s"],
                       env_steps_per_s=round(training[-1]["env_steps"] / training[-1]["time_s"], 1))
    run.write_json("results.json", results)
    run.log(kind="eval", **results)
    learning_curve(run)
    how = ("sampled actions (as trained), whole games, unclipped scores" if is_atari(env_id) else "greedy actions")
    if is_atari(env_id) and eval_episodes < 100:
        how += ", fewer games than the usual 100 as one can last thousands of steps"
    report.compare(f"mean evaluation return ({eval_episodes} episodes)", results["eval_mean_return"], None,
                   f"{how}, seeded episodes; {f'cut after {cap} steps' if cap else 'the episode cap is the maximum'}")
    if compared is not None:
        report.compare(f"{name} policy, mean return (same episodes)", results[f"{name}_mean_return"], book, note)
    if training:
        report.compare("training: environment steps, seconds, steps/s", f"{results['env_steps']:,}, "
                       f"{results['train_time_s']:.0f} s, {results['env_steps_per_s']}", None,
                       "steps/s include the learner's updates (evaluation excluded)")
    report.image("Learning curve", run.plots / "learning_curve.png", run.path)
    if gif:
        record_gif(act, env_id, run.plots / "policy.gif", seed=seed)
        report.image("The trained policy", run.plots / "policy.gif", run.path)
    report.write(run.path)
    return results


def evaluate_saved(run_dir: RunDir | str, env_id: str, episodes: int, max_episode_steps: int = 0,
                   device: str = "auto") -> dict[str, Any]:
    """Reload a saved policy on `device` and evaluate it again on the same seeded episodes."""
    model = torchbook.load(RunDir.open(run_dir).path, map_location=device).model
    returns = evaluate(model.act, env_id, episodes, max_episode_steps=max_episode_steps or None)
    return {"eval_mean_return": float(np.mean(returns)), "eval_episodes": len(returns)}


def algorithm_config(config: Any, cls: type) -> Any:
    """The algorithm's own config, taken from the recipe's (which extends it with evaluation settings)."""
    return cls(**{f.name: getattr(config, f.name) for f in dataclasses.fields(cls)})


def run_agent(config: Any, run_dir: RunDir | str | None, recipe: str, algorithm: str,
              train: Callable[[Callable[..., Any]], nn.Module], eval_max_steps: int | None = None) -> RunDir:
    """A whole RL recipe run: start the run folder, `train(log)`, then `finish` (evaluate, compare, plot, report).
    Evaluation episodes are capped at `eval_max_steps` (default: the training cap, `config.max_episode_steps`)."""
    run = RunDir.start(run_dir, recipe, config)
    torch.set_num_threads(config.threads)
    source = (f"ale-py {config.env_id} (the ROM ships with the ale-py wheel)" if is_atari(config.env_id)
              else f"gymnasium {config.env_id} (simulated)")
    report = Report(f"{algorithm} on {config.env_id}", recipe, "19", f"{source}, seeds {config.seed}+")
    model = train(run.log)
    cap = config.max_episode_steps if eval_max_steps is None else eval_max_steps
    finish(run, report, model, config.env_id, config.eval_episodes, cap, config.seed, config.gif)
    return run


def evaluate_agent(run_dir: RunDir | str, config_class: type, device: str = "auto") -> dict[str, Any]:
    """A recipe's `evaluate`: the saved policy on the run's own evaluation episodes."""
    config: Any = RunDir.open(run_dir).load_config(config_class)
    return evaluate_saved(run_dir, config.env_id, config.eval_episodes, config.max_episode_steps, device)
