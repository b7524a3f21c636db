"""What the language-model recipes share (chapters 14-15): the book's Shakespeare text and its split, windows of
tokens, next-token training on random windows, bits per character, sampling through the one decoding engine, and
the report's common part. `char-rnn` and `gpt-pretrain` build their model and tokenizer and call these, so that
the two compare on equal terms."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torchmetrics
from torch import Tensor, nn
from torch.utils.data import Dataset

from torchbook.data.sources import SHAKESPEARE, SHAKESPEARE_SOURCE, load_shakespeare
from torchbook.data.tokenizers import char_ids
from torchbook.errors import UserInputError
from torchbook.generate import Sampler, SamplingConfig, decode
from torchbook.generate.serving import Engine, Request
from torchbook.report import Report
from torchbook.runs import RunDir
from torchbook.train.config import TrainConfig
from torchbook.train.steps import next_token_step
from torchbook.train.trainer import Trainer

LN2 = math.log(2)


# -- configuration --------------------------------------------------------------------------------------------
@dataclass
class TextLMConfig(TrainConfig):
    """What both language-model recipes share: the text and its split, batching, evaluation and sampling."""

    lowercase: bool = True  # the book lowercases the text (fewer characters to learn)
    train_chars: int = 1_000_000  # the book's split: the first 1,000,000 characters train...
    val_chars: int = 60_000  # ...the next 60,000 validate, the rest is held out (bits per character)
    limit: int = 0  # smoke runs: train on only the first `limit` characters, validate on a tenth (0: all)
    eval_chars: int = 0  # score only the first `eval_chars` held-out characters (0: all), for smoke runs
    batches_per_epoch: int = 200  # an "epoch" of this many random batches of windows (0: every window once)
    epochs: int = 1000  # pseudo-epochs; time-boxed presets stop on `time_budget_s` first
    restore_best: bool = False  # a language model still improving: keep the last weights, not the best epoch's
    monitor: str = "val_loss"
    grad_clip: float = 1.0  # recurrent nets and transformers alike train more stably with clipped gradients
    prompt: str = "To be or not to b"  # the book's prompt
    temperatures: list[float] = field(default_factory=lambda: [0.01, 0.5, 1.0, 1.5])
    sample_chars: int = 200  # characters to sample per temperature (at most)
    sample_seed: int = 42  # the same seed gives the same samples

    def validate(self) -> None:
        super().validate()
        if self.train_chars < 1000 or self.val_chars < 100:
            raise UserInputError(f"train_chars={self.train_chars} must be >= 1000 and val_chars={self.val_chars} >= 100")
        if self.limit < 0 or self.eval_chars < 0 or self.batches_per_epoch < 0:
            raise UserInputError("limit, eval_chars and batches_per_epoch must be 0 (off) or positive")
        if any(t < 0 for t in self.temperatures):
            raise UserInputError(f"temperatures={self.temperatures} must all be >= 0 (0 is greedy)")
        if not self.prompt:
            raise UserInputError("prompt must not be empty")


# -- the text -------------------------------------------------------------------------------------------------
@dataclass
class Text:
    """The book's split of the text (lowercased if asked); `train`/`val` may be cut short for smoke runs."""

    full: str
    train: str
    val: str
    held_out: str  # what bits per character are measured on: the same characters for every recipe
    record: dict[str, Any]


def load_text(config: TextLMConfig) -> Text:
    text = load_shakespeare()
    if config.lowercase:
        text = text.lower()
    end_val = config.train_chars + config.val_chars
    if end_val >= len(text):
        raise UserInputError(f"train_chars + val_chars = {end_val:,} leaves no held-out text: the text has "
                             f"{len(text):,} characters")
    train, val, held_out = text[: config.train_chars], text[config.train_chars : end_val], text[end_val:]
    if config.limit:  # smoke: a sliver of the training text and a tenth as much validation text
        train, val = train[: config.limit], val[: max(config.limit // 10, 1000)]
    if config.eval_chars:
        held_out = held_out[: config.eval_chars]
    record = {
        "source": SHAKESPEARE_SOURCE, "url": SHAKESPEARE.url, "sha256": SHAKESPEARE.sha256,  # checked by fetch
        "lowercase": config.lowercase,
        "characters": {"train": [0, len(train)], "val": [config.train_chars, config.train_chars + len(val)],
                       "held_out": [end_val, end_val + len(held_out)]},
    }
    return Text(text, train, val, held_out, record)


# -- training -------------------------------------------------------------------------------------------------
class Windows(Dataset[tuple[Tensor, Tensor]]):
    """Windows of `seq_len + 1` tokens starting every `stride` tokens: inputs the first `seq_len`, targets the
    last `seq_len` (the same window shifted by one). A batch is one fancy-indexing call (`__getitems__`)."""

    def __init__(self, ids: Tensor, seq_len: int, stride: int = 1):
        if len(ids) < seq_len + 1:
            raise UserInputError(f"a text of {len(ids)} tokens is shorter than one window of {seq_len + 1}")
        self.ids, self.seq_len, self.stride = ids, seq_len, stride
        self.offsets = torch.arange(seq_len + 1)

    def __len__(self) -> int:
        return (len(self.ids) - self.seq_len - 1) // self.stride + 1

    def __getitems__(self, indices: list[int]) -> tuple[Tensor, Tensor]:
        windows = self.ids[torch.as_tensor(indices)[:, None] * self.stride + self.offsets]  # (B, seq_len + 1)
        return windows[:, :-1], windows[:, 1:]

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        x, y = self.__getitems__([index])
        return x[0], y[0]


def whole_batch(batch: Any) -> Any:
    """`Windows.__getitems__` already returns the batch (inputs, targets): nothing left to collate."""
    return batch


def random_batches(n_windows: int, config: TextLMConfig) -> Any:
    """`batches(epoch)` for the trainer: `batches_per_epoch` batches of random windows, seeded by (seed, epoch),
    or (0) a seeded shuffle of every window."""

    def batches(epoch: int) -> list[list[int]]:
        generator = torch.Generator().manual_seed(config.seed * 100_003 + epoch)
        if config.batches_per_epoch:
            starts = torch.randint(n_windows, (config.batches_per_epoch, config.batch_size), generator=generator)
        else:
            order = torch.randperm(n_windows, generator=generator)
            starts = order[: len(order) // config.batch_size * config.batch_size].view(-1, config.batch_size)
        return starts.tolist()  # type: ignore[no-any-return]

    return batches


def accuracy_metric(vocab_size: int) -> dict[str, Any]:
    return {"accuracy": lambda: torchmetrics.Accuracy(task="multiclass", num_classes=vocab_size)}


def train_lm(model: nn.Module, config: TextLMConfig, run: RunDir, train_ids: Tensor, val_ids: Tensor,
             seq_len: int) -> tuple[Trainer, Windows]:
    """Train on random windows of the training tokens; validate on non-overlapping windows of the validation
    tokens (each position 0..seq_len-1 equally often, as every window of the book's validation set)."""
    train, val = Windows(train_ids, seq_len), Windows(val_ids, seq_len, stride=seq_len)
    vocab_size: int = model.config.vocab_size  # type: ignore[union-attr, assignment]
    trainer = Trainer(model, config, run, train, val, step=next_token_step, metrics=accuracy_metric(vocab_size),
                      collate_fn=whole_batch, batches=random_batches(len(train), config))
    trainer.fit()
    return trainer, val


# -- bits per character ---------------------------------------------------------------------------------------
def bits_per_character(total_nats: float, n_chars: int) -> float:
    """Total nats over a text / (characters x ln 2): comparable across tokenizers of any granularity."""
    return total_nats / (n_chars * LN2)


# -- sampling -------------------------------------------------------------------------------------------------
def prompt_ids(tokenizer: Any, prompt: str) -> list[int]:
    """The tokens that start a sample: a subword model's <s> and the prompt's tokens, or the prompt's characters."""
    bos = tokenizer.token_to_id("<s>")
    if bos is None:
        return char_ids(tokenizer, prompt)
    return [bos] + tokenizer.encode(prompt, add_special_tokens=False).ids  # type: ignore[no-any-return]


def sample(model: Any, tokenizer: Any, prompt: str, max_new_tokens: int, temperature: float,
           seed: int | None = None, top_k: int = 0, top_p: float = 1.0) -> str:
    """The prompt and its continuation, sampled through the one decoding engine (chapter 14: temperature near 0
    picks the likeliest character, 1 samples the model's distribution, higher flattens it). A decoder-only
    transformer runs on the serving engine (`generate.serving.Engine`) as every other GPT generation does; a
    recurrent model, which keeps a hidden state instead of cached positions, on `decode`."""
    model.eval()
    ids = prompt_ids(tokenizer, prompt)
    max_len = getattr(model.config, "max_len", None)  # a transformer's positions end at max_len
    if max_len is not None:
        max_new_tokens = min(max_new_tokens, max_len - len(ids))
    config = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    if max_new_tokens < 1:  # the prompt fills the model's context
        return prompt
    if getattr(model, "supports_slots", False):
        engine = Engine(model, slots=1, max_len=len(ids) + max_new_tokens, prefix_cache=False)
        handle = engine.submit(Request(ids, max_tokens=max_new_tokens, sampling=config, end_ids=()))
        engine.run()
        tokens = handle.result().choices[0].tokens
    else:
        first = torch.tensor([ids], device=next(model.parameters()).device)
        out = decode(model, model.start_decoding(1), first, max_new_tokens, choose=Sampler(config, device=first.device))
        tokens = out.tokens[0].tolist()
    return prompt + str(tokenizer.decode(tokens))


def samples(model: Any, tokenizer: Any, config: TextLMConfig, max_new_tokens: int) -> list[tuple[float, str]]:
    prompt = config.prompt.lower() if config.lowercase else config.prompt
    return [(t, sample(model, tokenizer, prompt, max_new_tokens, t, config.sample_seed)) for t in config.temperatures]


# -- the report -----------------------------------------------------------------------------------------------
def report_common(report: Report, run: RunDir, config: TextLMConfig, text: Text, results: dict[str, Any],
                  trainer: Trainer) -> None:
    """What both language-model reports show: held-out bits per character, samples, curves and the data."""
    report.compare("bits per character, held-out text", results["held_out_bpc"], None,
                   f"{results['held_out_chars']:,} characters; total nats / (characters x ln 2)")
    report.compare("training time (s)", trainer.train_time, None,
                   f"{trainer.global_step:,} optimizer steps of {config.batch_size} windows")
    report.compare("parameters", results["parameters"], None, "")
    blocks = [f"temperature {t}:\n\n```text\n{text_sample}\n```" for t, text_sample in results["samples"]]
    report.text("Samples from the book's prompt", f"Seed {config.sample_seed}.\n\n" + "\n\n".join(blocks))
    if (run.plots / "learning_curves.png").exists():
        report.image("Learning curves", run.plots / "learning_curves.png", run.path)
    steps = run.metrics("step")
    if steps:
        from torchbook.plots import line_plot  # matplotlib: imported only when a report draws

        line_plot(run.plots / "training_loss.png", {"training loss": ([r["step"] for r in steps],
                  [r["loss"] for r in steps])}, "Training loss", "optimizer step", "nats per token")
        report.image("Training loss by step", run.plots / "training_loss.png", run.path)
    chars = text.record["characters"]
    report.text("Data", f"{len(text.train):,} training characters ({chars['train']}), {len(text.val):,} validation "
                        f"({chars['val']}), {len(text.held_out):,} held out ({chars['held_out']}); "
                        f"{'lowercased' if config.lowercase else 'original case'}; sha256 {text.record['sha256'][:12]}.")
