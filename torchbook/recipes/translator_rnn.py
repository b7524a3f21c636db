"""`translator-rnn`: English-to-Spanish with an encoder-decoder RNN and attention (chapter 14).

The book's model: a shared BPE vocabulary of 10,000, a GRU 2 x 512 encoder and decoder, teacher forcing in
training, greedy and beam search (width 3) to translate; Luong attention fixes the long sentences the plain
encoder-decoder gets wrong (`attention=none|bahdanau|luong`, `cell=gru|lstm`). Data, batching, evaluation and the
report are the Transformer translator's (`torchbook.train.translation`), so the two compare on equal terms: the
`compare` preset trains each for the same 20 minutes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from torchbook.errors import unknown
from torchbook.models.seq2seq_rnn import Seq2SeqConfig, Seq2SeqRNN
from torchbook.recipes import Recipe
from torchbook.report import Report
from torchbook.runs import RunDir
from torchbook.train.translation import TranslationConfig, evaluate_run, finish_run, prepare, train_translator

NAME = "translator-rnn"


@dataclass
class Config(TranslationConfig):
    embed_dim: int = 256
    hidden: int = 512
    layers: int = 2
    cell: str = "gru"
    attention: str = "luong"
    dropout: float = 0.1
    epochs: int = 20
    lr: float = 1e-3
    grad_clip: float = 1.0

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "smoke": {"limit": 1500, "vocab_size": 600, "embed_dim": 32, "hidden": 48, "epochs": 2,
                  "eval_sentences": 40, "max_tokens": 32, "progress": False},
        "quick": {"vocab_size": 4000, "embed_dim": 128, "hidden": 256, "epochs": 20, "time_budget_s": 90.0,
                  "eval_sentences": 400, "max_tokens": 48},
        "book": {},
        # Chapter 14 against 15: the same 20 minutes and vocabulary as the translator's compare preset.
        "compare": {"vocab_size": 4000, "max_tokens": 48, "epochs": 1000, "time_budget_s": 1200.0,
                    "eval_sentences": 1000, "progress": False},
    }

    def validate(self) -> None:
        super().validate()
        if self.cell not in ("gru", "lstm"):
            raise unknown("cell", self.cell, ["gru", "lstm"])
        if self.attention not in ("luong", "bahdanau", "none"):
            raise unknown("attention", self.attention, ["luong", "bahdanau", "none"])


def run(config: Config, run_dir: RunDir | str | None = None) -> RunDir:
    started = time.time()
    config.validate()
    run = RunDir.start(run_dir, NAME, config)
    prep = prepare(config)
    torch.manual_seed(config.seed)
    model = Seq2SeqRNN(Seq2SeqConfig(
        vocab_size=prep.tokenizer.get_vocab_size(), embed_dim=config.embed_dim, hidden=config.hidden,
        layers=config.layers, cell=config.cell, attention=config.attention, dropout=config.dropout,
        max_len=config.max_tokens + 2, pad_id=prep.ids["pad"], bos_id=prep.ids["bos"], eos_id=prep.ids["eos"],
    ))
    trainer = train_translator(model, config, run, prep)
    report = Report(f"English-to-Spanish RNN translator ({config.cell.upper()} {config.layers}x{config.hidden}, "
                    f"{config.attention} attention)", NAME, "14", prep.data.source)
    finish_run(run, config, prep, model, trainer, report, started)
    return run


def evaluate(run_dir: RunDir | str, device: str = "auto") -> dict[str, Any]:
    """Reload a finished run on `device` and measure BLEU/chrF again on its test split (see
    `train.translation.evaluate_run`)."""
    return evaluate_run(run_dir, device)


RECIPE = Recipe(NAME, "14", "English-to-Spanish encoder-decoder GRU/LSTM with attention, greedy and beam search",
                Config, run, evaluate)
