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

from torchbook.models import save_model
from torchbook.report import Report
from torchbook.rl.envs import Policy, evaluate, lean_policy, record_gif
from torchbook.runs import RunDir

BOOK_LEAN_MEAN = 41.7  # the book's hard-coded CartPole policy over 500 seeded episodes


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


def finish(run: RunDir, report: Report, model: nn.Module, env_id: str, eval_episodes: int,
           max_episode_steps: int = 0, seed: int = 0, gif: bool = True) -> dict[str, Any]:
    """Evaluate, compare, plot, record, save and report; return the results (also in results.json)."""
    save_model(model, run.model_dir, extra={"env_id": env_id})
    cap = max_episode_steps or None
    act: Policy = model.act  # type: ignore[assignment]
    returns = evaluate(act, env_id, eval_episodes, max_episode_steps=cap)
    lean = evaluate(lean_policy, env_id, eval_episodes, max_episode_steps=cap) if env_id.startswith("CartPole") else None
    results = {"eval_mean_return": float(returns.mean()), "eval_std_return": float(returns.std()),
               "eval_min_return": float(returns.min()), "eval_episodes": eval_episodes,
               "lean_mean_return": float(lean.mean()) if lean is not None else None}
    run.write_json("results.json", results)
    run.log(kind="eval", **results)
    learning_curve(run)
    report.compare(f"mean evaluation return ({eval_episodes} episodes)", results["eval_mean_return"], None,
                   "greedy actions, seeded episodes; the episode cap is the maximum")
    if lean is not None:
        report.compare("lean policy, mean return (same episodes)", results["lean_mean_return"], BOOK_LEAN_MEAN,
                       "book: 500 seeded episodes")
    report.image("Learning curve", run.plots / "learning_curve.png", run.path)
    if gif:
        record_gif(act, env_id, run.plots / "policy.gif", seed=seed)
        report.image("The trained policy", run.plots / "policy.gif", run.path)
    report.write(run.path)
    return results


def evaluate_saved(run_dir: RunDir | str, env_id: str, episodes: int, max_episode_steps: int = 0) -> dict[str, Any]:
    """Reload a saved policy and evaluate it again on the same seeded episodes."""
    import torchbook

    model = torchbook.load(RunDir.open(run_dir).path).model
    returns = evaluate(model.act, env_id, episodes, max_episode_steps=max_episode_steps or None)
    return {"eval_mean_return": float(np.mean(returns)), "eval_episodes": len(returns)}


def algorithm_config(config: Any, cls: type) -> Any:
    """The algorithm's own config, taken from the recipe's (which extends it with evaluation settings)."""
    return cls(**{f.name: getattr(config, f.name) for f in dataclasses.fields(cls)})


def run_agent(config: Any, run_dir: RunDir | str | None, recipe: str, algorithm: str,
              train: Callable[[Callable[..., Any]], nn.Module]) -> RunDir:
    """A whole RL recipe run: start the run folder, `train(log)`, then `finish` (evaluate, compare, plot, report)."""
    run = RunDir.start(run_dir, recipe, config)
    torch.set_num_threads(config.threads)
    report = Report(f"{algorithm} on {config.env_id}", recipe, "19",
                    f"gymnasium {config.env_id} (simulated), seeds {config.seed}+")
    model = train(run.log)
    finish(run, report, model, config.env_id, config.eval_episodes, config.max_episode_steps, config.seed, config.gif)
    return run


def evaluate_agent(run_dir: RunDir | str, config_class: type) -> dict[str, Any]:
    """A recipe's `evaluate`: the saved policy on the run's own evaluation episodes."""
    config = config_class(**RunDir.open(run_dir).config_values())
    return evaluate_saved(run_dir, config.env_id, config.eval_episodes, config.max_episode_steps)
