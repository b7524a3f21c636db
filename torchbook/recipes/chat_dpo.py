"""`chat-dpo`: direct preference optimization of a chat model (book chapter 15, equation 15-2).

The model (SmolLM2-135M-Instruct offline by default, or a `chat-sft` run, or anything `torchbook.load` reads) learns
from pairs of answers to the same dialogue, one chosen and one rejected by people (Anthropic HH-RLHF's harmless-base
file, split train/validation/test by `torchbook.train.preference.load_pairs`, recorded in `split.json`):

    loss = -log sigma(beta [(log pi(y_c|x) - log pi_ref(y_c|x)) - (log pi(y_r|x) - log pi_ref(y_r|x))])

with log pi(y|x) the summed log-probabilities of the answer's tokens (the book's `sum_of_log_probas`) and pi_ref the
model before training, frozen. The reference log-probabilities are computed once before training (as TRL's
`precompute_ref_log_probs`): the model at step 0 is the reference, whether it trains fully or with LoRA adapters
(whose reference is the model with the adapters off).

Measured before and after on the test pairs: the loss, the implicit reward margin beta (log-ratio chosen - log-ratio
rejected) and the preference accuracy; after, the KL divergence to the reference on sampled answers; and answers to
a few fixed user-oriented instructions. The run's `model/` is a Hugging Face folder (`torchbook generate --chat`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

import torchbook
from torchbook.data.instructions import USER_ORIENTED_SOURCE, load_user_oriented
from torchbook.devices import device_of
from torchbook.errors import UserInputError
from torchbook.hub.peft import save_adapter
from torchbook.models.gpt import GPT
from torchbook.nn.lora import apply_lora, merge_lora
from torchbook.recipes import Recipe
from torchbook.report import Report
from torchbook.runs import RunDir
from torchbook.train.preference import (
    PairAccuracy,
    PairData,
    PairTrainingConfig,
    add_reference_logps,
    dpo_step,
    implicit_rewards,
    load_pairs,
    pad_id_of,
    pair_collate,
    pair_logps,
    pair_splits,
    report_training,
    sampled_kl,
    set_reference_logps,
)
from torchbook.train.sft import TINY, answer, load_chat_model, save_chat_model
from torchbook.train.trainer import Trainer

NAME = "chat-dpo"
log = logging.getLogger(__name__)


@dataclass
class Config(PairTrainingConfig):
    beta: float = 0.1  # the book's
    kl_prompts: int = 16  # test prompts whose sampled answers estimate the KL to the reference after training
    kl_tokens: int = 48
    answers: int = 4  # user-oriented instructions answered before and after (greedy)
    answer_tokens: int = 96
    batch_size: int = 4  # pairs per step
    lr: float = 5e-6

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "smoke": {"model": TINY, "limit": 16, "eval_pairs": 8, "max_length": 64, "answers": 2, "answer_tokens": 8,
                  "kl_prompts": 4, "kl_tokens": 8, "batch_size": 4, "lr": 1e-3, "progress": False, "lora": True,
                  "lora_rank": 4},
        # SmolLM2 with rank-8 LoRA on short dialogues: 48 pairs of up to 128 tokens, 12 steps, 48 test pairs.
        "quick": {"limit": 48, "eval_pairs": 48, "max_length": 128, "kl_prompts": 8, "kl_tokens": 32, "answers": 2,
                  "answer_tokens": 48, "lora": True, "lr": 5e-4, "batch_size": 4},
        # Full DPO of SmolLM2 on all ~1,900 training pairs, batch 4, lr 5e-6, beta 0.1, one epoch: about 470 steps
        # of 8 sequences of up to 512 tokens, hours on 2 cores (estimate, not run here); resumable.
        "book": {"checkpoint_every": 20},
    }

    def validate(self) -> None:
        super().validate()
        if self.beta <= 0:
            raise UserInputError(f"beta={self.beta} must be > 0", param="beta")


def run(config: Config, run_dir: RunDir | str | None = None) -> RunDir:
    started = time.time()
    config.validate()
    run = RunDir.start(run_dir, NAME, config)
    loaded = load_chat_model(config.model, config.seed)
    model: GPT = loaded.model
    data, test_pairs, source = pair_splits(config, loaded, run)
    pad_id = pad_id_of(loaded.tokenizer, loaded.meta)
    eval_batch = max(1, config.batch_size)
    def reference_logps(part: PairData) -> list[list[float]]:
        return [t.tolist() for t in pair_logps(model, part, eval_batch, pad_id)]

    for name, part in data.items():  # the reference: the model before training (kept in the run for a resume)
        set_reference_logps(part, *run.once(f"reference_logps_{name}.json", partial(reference_logps, part)))
    questions = load_user_oriented()[: config.answers]
    kl_prompts = [p.prompt for p in test_pairs[: config.kl_prompts]]
    before = run.once("test_before.json", lambda: implicit_rewards(model, data["test"], eval_batch, pad_id, config.beta))
    answers_before = run.once("answers_before.json",
                              lambda: answer(model, loaded, questions, config.format, config.answer_tokens))
    total_params = sum(p.numel() for p in model.parameters())
    reference = None if config.lora else load_chat_model(config.model, config.seed).model  # KL after training
    if config.lora:
        apply_lora(model, config.lora_rank, config.lora_alpha, config.lora_dropout, config.lora_targets)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    trainer = Trainer(model, config, run, data["train"], data["validation"], step=dpo_step(config.beta),
                      collate_fn=pair_collate(pad_id), metrics={"accuracy": PairAccuracy})
    trainer.fit()
    model.cpu()
    after = implicit_rewards(model, data["test"], eval_batch, pad_id, config.beta)
    train_after = implicit_rewards(model, data["train"], eval_batch, pad_id, config.beta)
    kl = sampled_kl(model, reference, loaded, kl_prompts, config.format, config.kl_tokens, config.seed)
    if config.lora:
        save_adapter(model, run.path / "adapter", base_model=config.model)
        merge_lora(model)
    answers_after = answer(model, loaded, questions, config.format, config.answer_tokens)
    save_chat_model(model, run.model_dir, loaded)
    results = {"test_before": before, "test_after": after, "train_after": train_after, "kl_after": kl, "train_loss": trainer.train_loss(),
               "train_time_s": trainer.train_time, "steps": trainer.global_step, "train_pairs": len(data["train"]),
               "parameters": total_params, "trainable_parameters": trainable,
               "answers": [{"instruction": q[0]["content"], "before": b, "after": a}
                           for q, b, a in zip(questions, answers_before, answers_after)]}
    run.write_json("results.json", results)
    run.log(kind="eval", test_loss_before=before["loss"], test_loss_after=after["loss"],
            margin_before=before["margin"], margin_after=after["margin"], kl_after=kl["kl"])
    report_run(run, config, results, source, started)
    return run


def report_run(run: RunDir, config: Config, results: dict[str, Any], source: str, started: float) -> None:

    report = Report("Preference tuning with DPO", NAME, "15", source)
    how = f"LoRA rank {config.lora_rank}" if config.lora else "full fine-tuning"
    before, after = results["test_before"], results["test_after"]
    note = f"{after['pairs']} test pairs; the book prints no figure"
    report.compare("test DPO loss before (ln 2 = 0.693: the reference)", before["loss"], None, note)
    report.compare("test DPO loss after", after["loss"], None, how + f", beta {config.beta}")
    report.compare("test reward margin before", before["margin"], None, "beta x (log-ratio chosen - rejected)")
    report.compare("test reward margin after", after["margin"], None, "")
    report.compare("test preference accuracy before", before["accuracy"], None, "0 at the reference (all margins 0)")
    report.compare("test preference accuracy after", after["accuracy"], None, "chosen reward strictly higher")
    report.compare("training pairs' accuracy after", results["train_after"]["accuracy"], None,
                   f"{results['train_after']['pairs']} pairs, margin {results['train_after']['margin']:.4f}: "
                   "what the model learned of the pairs it saw")
    report.compare("KL to the reference after (nats per answer)", results["kl_after"]["kl"], None,
                   f"{results['kl_after']['answers']} sampled answers of up to {config.kl_tokens} tokens; "
                   "0 before (the same model)")
    report_training(report, run, config, results, "DPO loss")
    if (run.plots / "learning_curves.png").exists():
        report.image("Learning curves (validation loss and accuracy per epoch)", run.plots / "learning_curves.png",
                     run.path)
    rows = [(a["instruction"][:160].replace("\n", " "), a["before"][:300].replace("\n", " "),
             a["after"][:300].replace("\n", " ")) for a in results["answers"]]
    report.table(f"Held-out instructions ({USER_ORIENTED_SOURCE}), answered before and after (greedy)",
                 ["instruction", "before", "after"], rows)
    report.text("Model", f"`{config.model}` in the {config.format} format; the run's `model/` folder loads with "
                         "`torchbook.load`, `torchbook generate --chat` and transformers"
                + ("; `adapter/` holds the LoRA adapter in PEFT's format." if config.lora else "."))
    report.write(run.path, time.time() - started)


def evaluate(run_dir: RunDir | str | Path, device: str = "auto") -> dict[str, Any]:
    """Reload a finished run's model and measure the test pairs' DPO loss, margin and accuracy again (against the
    reference model the run started from)."""
    run = RunDir.open(run_dir)
    config = run.load_config(Config)
    loaded = torchbook.load(run.path, map_location=device)
    reference = load_chat_model(config.model, config.seed)
    reference.model.to(device_of(loaded.model))
    splits, _ = load_pairs(config.data)
    max_length = min(config.max_length, loaded.model.config.max_len)
    test = PairData(splits["test"][: config.eval_pairs or None], loaded.tokenizer, loaded.meta, config.format,
                    max_length)
    pad_id = pad_id_of(loaded.tokenizer, loaded.meta)
    add_reference_logps(reference.model, test, max(1, config.batch_size), pad_id)
    return implicit_rewards(loaded.model, test, max(1, config.batch_size), pad_id, config.beta)


RECIPE = Recipe(NAME, "15", "Direct preference optimization (DPO) of a chat model on HH-RLHF pairs, full or LoRA",
                Config, run, evaluate)
