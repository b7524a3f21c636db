"""`translator`: English-to-Spanish with the original Transformer (chapter 15), trained by the shared trainer.

Data: the book's Tatoeba pairs (`data=tatoeba`, downloaded) or, offline (the default here), the machine's gettext
catalogs with whole catalogs held out for test (see `torchbook.data.translation`). A shared BPE vocabulary
(10,000 in the book) with byte fallback. The model is the book's: embedding 128, 4 heads, 2+2 layers, dropout 0.1,
20 epochs; label smoothing 0.1 and the paper's warm-up then inverse-square-root schedule.

The report gives BLEU and chrF (sacrebleu) on the held-out catalogs for greedy and beam search (the book reports
no BLEU), how often beam search finds a translation at least as probable as greedy's, sample translations with the
book's examples, the learning curves and the data manifest. What it shares with the RNN translator
(`translator-rnn`, chapter 14) lives in `torchbook.train.translation`: data preparation, the training step,
`translate()` and the evaluation.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from torchbook.models.transformer import TransformerConfig, TransformerTranslator
from torchbook.recipes import Recipe
from torchbook.report import Report
from torchbook.runs import RunDir
from torchbook.train.translation import (
    TranslationConfig,
    evaluate_run,
    finish_run,
    prepare,
    train_translator,
)

NAME = "translator"


@dataclass
class Config(TranslationConfig):
    d_model: int = 128
    n_heads: int = 4
    n_encoder_layers: int = 2
    n_decoder_layers: int = 2
    d_ff: int = 512
    dropout: float = 0.1
    norm_first: bool = False  # post-norm as in the paper
    positions: str = "sinusoidal"
    label_smoothing: float = 0.1
    epochs: int = 20
    lr: float = 1e-3  # peak learning rate of the warm-up schedule
    schedule: str = "warmup"
    warmup_steps: int = 1000
    grad_clip: float = 1.0
    monitor: str = "val_loss"

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "smoke": {"limit": 1500, "vocab_size": 600, "d_model": 32, "d_ff": 64, "n_heads": 2, "epochs": 2,
                  "warmup_steps": 20, "eval_sentences": 40, "max_tokens": 32, "progress": False},
        "quick": {"vocab_size": 2000, "epochs": 20, "time_budget_s": 100.0, "warmup_steps": 200, "lr": 2e-3,
                  "eval_sentences": 400, "max_tokens": 32, "batch_tokens": 3072, "batch_size": 128},
        "book": {},
        # Chapter 14 against 15: both translators trained for the same 20 minutes (see translator-rnn's compare).
        "compare": {"vocab_size": 4000, "max_tokens": 48, "epochs": 1000, "time_budget_s": 1200.0, "lr": 1.5e-3,
                    "warmup_steps": 400, "eval_sentences": 1000, "progress": False},
    }


def run(config: Config, run_dir: RunDir | str | None = None) -> RunDir:
    started = time.time()
    config.validate()
    run = RunDir.start(run_dir, NAME, config)
    prep = prepare(config)
    torch.manual_seed(config.seed)
    model = TransformerTranslator(TransformerConfig(
        vocab_size=prep.tokenizer.get_vocab_size(), d_model=config.d_model, n_heads=config.n_heads,
        n_encoder_layers=config.n_encoder_layers, n_decoder_layers=config.n_decoder_layers, d_ff=config.d_ff,
        dropout=config.dropout, max_len=config.max_tokens + 2, positions=config.positions,
        norm_first=config.norm_first, final_norm=config.norm_first, pad_id=prep.ids["pad"],
        bos_id=prep.ids["bos"], eos_id=prep.ids["eos"],
    ))
    trainer = train_translator(model, config, run, prep)
    report = Report("English-to-Spanish Transformer translator", NAME, "15", prep.data.source)
    finish_run(run, config, prep, model, trainer, report, started)
    return run


def evaluate(run_dir: RunDir | str, device: str = "auto") -> dict[str, Any]:
    """Reload a finished run and measure BLEU/chrF again on its test split (see `train.translation.evaluate_run`)."""
    return evaluate_run(run_dir, device)


RECIPE = Recipe(NAME, "15", "English-to-Spanish Transformer translator (offline: gettext catalogs), BLEU/chrF",
                Config, run, evaluate)
