"""`reward-model`: a reward model for RLHF (book chapter 15), a scalar head on a chat model's hidden states.

The decoder (SmolLM2-135M-Instruct offline by default, or any decoder `torchbook.load` reads) reads a whole dialogue
with its final answer; a linear head on its final hidden state at the last token gives the answer's reward r.
Trained on HH-RLHF pairs (split train/validation/test by `torchbook.train.preference.load_pairs`, in `split.json`)
with the Bradley-Terry loss -log sigma(r(chosen) - r(rejected)), fully or with LoRA adapters (the head always trains).

Measured on the test pairs: the preference accuracy (chosen scored strictly higher), its Wilson 95% interval, and
the one-sided binomial test against the 0.5 of a coin. The run's `model/` holds the reward model (`RewardModel`,
torchbook's folder format with the tokenizer and chat template); `torchbook.load` gives it back and `chat-rlhf`
scores answers with it. It is a scorer, not a chat model: `torchbook generate` has nothing to generate with it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torchbook
from torchbook.hub import save_model
from torchbook.nn.lora import apply_lora, merge_lora
from torchbook.recipes import Recipe
from torchbook.report import Report
from torchbook.runs import RunDir
from torchbook.train.preference import (
    PairAccuracy,
    PairData,
    PairTrainingConfig,
    RewardModel,
    accuracy_summary,
    load_pairs,
    pad_id_of,
    pair_collate,
    pair_splits,
    report_training,
    reward_margins,
    reward_meta,
    reward_step,
)
from torchbook.train.sft import TINY, load_chat_model
from torchbook.train.trainer import Trainer

NAME = "reward-model"
log = logging.getLogger(__name__)


@dataclass
class Config(PairTrainingConfig):
    batch_size: int = 8  # pairs per step
    lr: float = 1e-5

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "smoke": {"model": TINY, "limit": 16, "eval_pairs": 16, "max_length": 64, "batch_size": 4, "lr": 1e-3,
                  "progress": False, "lora": True, "lora_rank": 4},
        # SmolLM2 with rank-8 LoRA (and the head) on short dialogues: 64 pairs of up to 96 tokens, 8 steps; 64 test
        # pairs (too few steps and pairs to expect much above 0.5: the book preset is the test).
        "quick": {"limit": 64, "eval_pairs": 64, "max_length": 96, "lora": True, "lr": 2e-4, "batch_size": 8},
        # SmolLM2 fully trained on all ~1,900 training pairs of up to 512 tokens, one epoch, batch 8, lr 1e-5: about
        # 240 steps of 16 sequences, hours on 2 cores (estimate); resumable (checkpoints every 10 steps).
        "book": {"checkpoint_every": 10},
    }


def run(config: Config, run_dir: RunDir | str | None = None) -> RunDir:
    started = time.time()
    config.validate()
    run = RunDir.start(run_dir, NAME, config)
    loaded = load_chat_model(config.model, config.seed)
    model = RewardModel.from_backbone(loaded.model)
    data, _, source = pair_splits(config, loaded, run)
    pad_id = pad_id_of(loaded.tokenizer, loaded.meta)
    eval_batch = max(1, config.batch_size)
    total_params = sum(p.numel() for p in model.parameters())
    if config.lora:
        apply_lora(model.backbone, config.lora_rank, config.lora_alpha, config.lora_dropout, config.lora_targets)
        model.score.requires_grad_(True)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    before = run.once("test_margins_before.json", lambda: reward_margins(model, data["test"], eval_batch, pad_id).tolist())
    trainer = Trainer(model, config, run, data["train"], data["validation"], step=reward_step,
                      collate_fn=pair_collate(pad_id), metrics={"accuracy": PairAccuracy})
    trainer.fit()
    model.cpu()
    if config.lora:
        merge_lora(model.backbone)
    margins = reward_margins(model, data["test"], eval_batch, pad_id)
    meta = loaded.meta
    save_model(model, run.model_dir, extra={"format": config.format, "chat_template": meta.get("chat_template"),
                                            "bos_token": meta.get("bos_token"), "eos_token": meta.get("eos_token")})
    loaded.tokenizer.save(str(run.model_dir / "tokenizer.json"))
    results: dict[str, Any] = {"test_before": accuracy_summary(sum(m > 0 for m in before), len(before)),
               "test": accuracy_summary(int((margins > 0).sum()), len(margins)),
               "test_mean_margin": margins.mean().item(), "train_loss": trainer.train_loss(),
               "train_time_s": trainer.train_time, "steps": trainer.global_step, "train_pairs": len(data["train"]),
               "parameters": total_params, "trainable_parameters": trainable}
    run.write_json("results.json", results)
    run.log(kind="eval", test_accuracy=results["test"]["accuracy"], p_value=results["test"]["p_value"])
    report_run(run, config, results, source, started, margins.tolist())
    return run


def report_run(run: RunDir, config: Config, results: dict[str, Any], source: str, started: float,
               margins: list[float]) -> None:
    from torchbook.plots import line_plot  # matplotlib: imported when a report is drawn

    report = Report("A reward model for RLHF", NAME, "15", source)
    how = f"LoRA rank {config.lora_rank} and the head" if config.lora else "full fine-tuning"
    test, before = results["test"], results["test_before"]
    report.compare("test preference accuracy before (untrained head)", before["accuracy"], None,
                   f"{before['correct']}/{before['pairs']}; the baseline is a coin's 0.5 (the book prints no accuracy)")
    report.compare("test preference accuracy after", test["accuracy"], None,
                   f"{test['correct']}/{test['pairs']}, 95% interval {test['low']:.3f}-{test['high']:.3f}; {how}")
    report.compare("one-sided binomial p-value against 0.5", test["p_value"], None,
                   "below 0.01: better than chance at the 1% level" if test["p_value"] < 0.01 else
                   "not below 0.01: not shown better than chance")
    report.compare("mean test margin r(chosen) - r(rejected)", results["test_mean_margin"], None, "")
    report_training(report, run, config, results, "Bradley-Terry loss")
    ordered = sorted(margins)
    line_plot(run.plots / "margins.png", {"test pairs": (list(range(1, len(ordered) + 1)), ordered)},
              "Test margins r(chosen) - r(rejected), sorted (above 0: right)", "pair (sorted)", "margin")
    report.image("Test margins", run.plots / "margins.png", run.path)
    if (run.plots / "learning_curves.png").exists():
        report.image("Learning curves", run.plots / "learning_curves.png", run.path)
    report.text("Model", f"`{config.model}` with a scalar head, in the {config.format} format; `torchbook.load` on "
                         "the run folder gives the reward model back (`RewardModel`), `torchbook run chat-rlhf reward=<run>` "
                         "trains a policy against it.")
    report.write(run.path, time.time() - started)


def evaluate(run_dir: RunDir | str | Path, device: str = "auto") -> dict[str, Any]:
    """Reload a finished run's reward model and measure its test accuracy again."""
    run = RunDir.open(run_dir)
    config = run.load_config(Config)
    loaded = torchbook.load(run.path, map_location=device)
    splits, _ = load_pairs(config.data)
    test = PairData(splits["test"][: config.eval_pairs or None], loaded.tokenizer, reward_meta(loaded.meta),
                    config.format, min(config.max_length, loaded.model.config.max_len))
    pad_id = pad_id_of(loaded.tokenizer, reward_meta(loaded.meta))
    margins = reward_margins(loaded.model, test, max(1, config.batch_size), pad_id)
    return accuracy_summary(int((margins > 0).sum()), len(margins))


RECIPE = Recipe(NAME, "15", "Reward model for RLHF: a scalar head on a chat model, Bradley-Terry loss on HH-RLHF pairs",
                Config, run, evaluate)
