"""`chat-sft`: supervised fine-tuning of a chat model (book chapter 15), fully or with LoRA / QLoRA (chapter 17).

The model (SmolLM2-135M-Instruct offline by default, or any run folder, Hugging Face folder, Hub id or GGUF file
`torchbook.load` reads; a GGUF model trains from its dequantised weights) learns to answer instructions: the
loss counts the assistant's tokens only (`torchbook.train.sft`, `torchbook.train.steps.sft_step`). Data: Self-
Instruct's 175 human-written seed tasks offline, the chosen side of HH-RLHF's train part, the book's Alpaca
online, or a JSONL file of chat messages. Held out: Self-Instruct's 252 user-oriented instructions; the report
shows their loss before and after, and answers to a fixed few of them, side by side.

The run folder's `model/` is a Hugging Face folder (weights with any LoRA update merged, tokenizer, chat template)
that `torchbook generate --chat`, `torchbook.load` and `transformers` load; a LoRA run also writes `adapter/` in
PEFT's format.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torchbook
from torchbook.data.instructions import USER_ORIENTED_SOURCE, load_conversations, load_user_oriented
from torchbook.devices import device_of
from torchbook.errors import CheckpointError, UserInputError
from torchbook.hub.peft import save_adapter
from torchbook.models.gpt import GPT
from torchbook.nn.lora import ATTENTION_TARGETS, apply_lora, lora_state_dict, merge_lora
from torchbook.recipes import Recipe
from torchbook.report import Report
from torchbook.runs import RunDir
from torchbook.train.config import TrainConfig
from torchbook.train.sft import (
    DEFAULT_MODEL,
    FORMATS,
    TINY,
    SFTData,
    load_chat_model,
    pack_collate,
    pad_collate,
    save_chat_model,
)
from torchbook.train.sft import answer as answer_questions
from torchbook.train.steps import sft_step
from torchbook.train.trainer import Trainer

NAME = "chat-sft"
log = logging.getLogger(__name__)


@dataclass
class Config(TrainConfig):
    model: str = DEFAULT_MODEL  # smollm2, tiny, or a path / Hub id torchbook.load reads
    data: str = "self-instruct"  # self-instruct, hh, alpaca (online) or a .jsonl file of chat messages
    format: str = "template"  # template (the checkpoint's chat template) or book ("Human: ...\n\nAssistant: ...")
    max_length: int = 512  # the book's: tokens per example (longer ones are cut)
    pack: bool = False  # several examples per row of max_length tokens (per-example attention and positions)
    limit: int = 0  # train on the first `limit` examples only (0: all)
    held_out: int = 64  # user-oriented instructions whose loss is measured before and after
    answers: int = 4  # held-out instructions answered before and after (greedy)
    answer_tokens: int = 96
    lora: bool = False
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    lora_targets: list[str] = field(default_factory=lambda: list(ATTENTION_TARGETS))
    qlora: bool = False  # LoRA on int4 base weights (a scale and minimum per 32 inputs, not the book's NF4)
    # The book's settings: batch 4, lr 5e-5, one epoch, max_length 512.
    epochs: int = 1
    batch_size: int = 4
    lr: float = 5e-5
    optimizer: str = "adamw"
    schedule: str = "constant"
    grad_clip: float = 1.0
    restore_best: bool = False
    log_every: int = 5

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "smoke": {"model": TINY, "limit": 16, "max_length": 96, "held_out": 8, "answers": 2, "answer_tokens": 8,
                  "batch_size": 4, "lr": 1e-3, "progress": False, "lora": True, "lora_rank": 4},
        # SmolLM2 with rank-8 LoRA on short sequences: 32 examples of 128 tokens, 8 steps (a step took about a
        # minute on a busy machine, ~10 s on an idle one).
        "quick": {"limit": 32, "max_length": 128, "held_out": 32, "answers": 3, "answer_tokens": 64,
                  "lora": True, "lr": 1e-3, "batch_size": 4},
        # The book's settings on SmolLM2 (GPT-2's weights cannot be downloaded here): full fine-tuning, 175
        # examples of up to 512 tokens, batch 4, lr 5e-5, one epoch: 44 steps, roughly 10-30 minutes on 2 idle
        # cores; resumable (checkpoints every 5 steps).
        "book": {"checkpoint_every": 5},
    }

    def validate(self) -> None:
        super().validate()
        if self.format not in FORMATS:
            raise UserInputError(f"format={self.format!r}; accepted: {', '.join(FORMATS)}", param="format")
        if self.max_length < 16:
            raise UserInputError(f"max_length={self.max_length} must be at least 16", param="max_length")
        if self.qlora and not self.lora:
            raise UserInputError("qlora=true needs lora=true", param="qlora")
        if self.lora and (self.lora_rank < 1 or self.lora_alpha <= 0):
            raise UserInputError(f"lora_rank={self.lora_rank} must be >= 1 and lora_alpha={self.lora_alpha} > 0",
                                 param="lora_rank")


def load_base(config: Config) -> torchbook.Loaded:  # type: ignore[name-defined]
    """The model to fine-tune (float weights, train mode is set by the trainer) with its tokenizer and meta."""
    return load_chat_model(config.model, config.seed)


def answer(model: GPT, loaded: Any, questions: list[list[dict[str, str]]], config: Config) -> list[str]:
    return answer_questions(model, loaded, questions, config.format, config.answer_tokens)


def run(config: Config, run_dir: RunDir | str | None = None) -> RunDir:
    started = time.time()
    config.validate()
    run = RunDir.start(run_dir, NAME, config)
    loaded = load_base(config)
    model: GPT = loaded.model
    if config.max_length > model.config.max_len:  # a small model's positions end sooner (gpt-pretrain: 128)
        log.warning("max_length=%d is longer than the model's %d positions: using %d", config.max_length,
                    model.config.max_len, model.config.max_len)
        config.max_length = model.config.max_len
    conversations, source = load_conversations(config.data)
    if config.limit:
        conversations = conversations[: config.limit]
    held_out = load_user_oriented()
    train = SFTData(conversations, loaded.tokenizer, loaded.meta, config.format, config.max_length)
    val = SFTData(held_out[: config.held_out], loaded.tokenizer, loaded.meta, config.format, config.max_length)
    if not len(train):
        raise UserInputError("no training example keeps an assistant token within max_length", param="max_length")
    run.write_json("split.json", {"train": {"source": source, "examples": len(train), "cut_off": train.dropped},
                                  "held_out": {"source": USER_ORIENTED_SOURCE, "first": config.held_out},
                                  "answered": {"source": USER_ORIENTED_SOURCE, "first": config.answers}})
    pad_id = loaded.tokenizer.token_to_id(loaded.meta.get("eos_token") or "") or 0
    collate = pack_collate(pad_id, config.max_length) if config.pack else pad_collate(pad_id)
    questions = held_out[: config.answers]
    total_params = sum(p.numel() for p in model.parameters())
    if config.lora:
        apply_lora(model, config.lora_rank, config.lora_alpha, config.lora_dropout, config.lora_targets,
                   quantize_base=config.qlora)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    trainer = Trainer(model, config, run, train, None, step=sft_step, collate_fn=collate)
    eval_batch = max(1, config.batch_size)
    before = trainer.evaluate(val, eval_batch)["loss"]
    answers_before = answer(model, loaded, questions, config)
    trainer.fit()
    after = trainer.evaluate(val, eval_batch)["loss"]
    answers_after = answer(model, loaded, questions, config)
    model = model.cpu()
    if config.lora:
        try:
            save_adapter(model, run.path / "adapter", base_model=config.model)
        except CheckpointError as e:  # GPT-2's layout fuses query/key/value: no PEFT names for ours
            log.warning("no PEFT adapter written: %s", e)
        if config.qlora:  # the trained adapters onto the float base weights (the int4 ones cannot take them)
            adapters = lora_state_dict(model)
            model = load_base(config).model
            apply_lora(model, config.lora_rank, config.lora_alpha, config.lora_dropout, config.lora_targets)
            model.load_state_dict(adapters, strict=False)  # the adapters only: the base weights are already there
        merge_lora(model)
    save_chat_model(model, run.model_dir, loaded)
    results = {"held_out_loss_before": before, "held_out_loss_after": after, "train_loss": trainer.train_loss(),
               "train_time_s": trainer.train_time, "steps": trainer.global_step, "train_examples": len(train),
               "parameters": total_params, "trainable_parameters": trainable,
               "answers": [{"instruction": q[0]["content"], "before": b, "after": a, "reference": q[-1]["content"]}
                           for q, b, a in zip(questions, answers_before, answers_after)]}
    run.write_json("results.json", results)
    run.log(kind="eval", held_out_loss_before=before, held_out_loss_after=after)
    report_run(run, config, results, source, started, trainer)
    return run


def report_run(run: RunDir, config: Config, results: dict[str, Any], source: str, started: float,
               trainer: Trainer) -> None:
    report = Report("Supervised fine-tuning of a chat model", NAME, "15, 17", source)
    how = ("QLoRA" if config.qlora else "LoRA") + f" rank {config.lora_rank}" if config.lora else "full fine-tuning"
    report.compare("held-out loss before (nats per assistant token)", results["held_out_loss_before"], None,
                   f"the first {config.held_out} user-oriented instructions; the book prints no figure")
    report.compare("held-out loss after", results["held_out_loss_after"], None, how)
    report.compare("trainable parameters", results["trainable_parameters"], None,
                   f"of {results['parameters']:,}")
    report.compare("training time (s)", results["train_time_s"], None,
                   f"{results['steps']} steps of {config.batch_size} examples, max_length {config.max_length}"
                   + (", packed" if config.pack else ""))
    rows = [(a["instruction"][:160].replace("\n", " "), a["before"][:300].replace("\n", " "),
             a["after"][:300].replace("\n", " ")) for a in results["answers"]]
    report.table("Held-out instructions, answered before and after (greedy)", ["instruction", "before", "after"], rows)
    if (run.plots / "learning_curves.png").exists():
        report.image("Learning curves", run.plots / "learning_curves.png", run.path)
    report.text("Model", f"`{config.model}` in the {config.format} format; the run's `model/` folder loads with "
                         "`torchbook.load`, `torchbook generate --chat` and transformers"
                + ("; `adapter/` holds the LoRA adapter in PEFT's format." if config.lora else "."))
    report.write(run.path, time.time() - started)


def evaluate(run_dir: RunDir | str, device: str = "auto") -> dict[str, Any]:
    """Reload a finished run's model and measure the held-out loss again."""
    run = RunDir.open(run_dir)
    config = run.load_config(Config)
    loaded = torchbook.load(run.path, map_location=device)
    config = dataclasses.replace(config, device=str(device_of(loaded.model)))
    val = SFTData(load_user_oriented()[: config.held_out], loaded.tokenizer, loaded.meta, config.format,
                  config.max_length)
    trainer = Trainer(loaded.model, config, None, val, None, step=sft_step, collate_fn=pad_collate(0))
    return {"held_out_loss": trainer.evaluate(val, max(1, config.batch_size))["loss"]}


RECIPE = Recipe(NAME, "15", "Supervised fine-tuning of a chat model (full, LoRA or QLoRA), assistant-only loss",
                Config, run, evaluate)
