"""Training steps: what one batch costs, for the objectives recipes share. A step is
`step(model, batch) -> Step(loss, outputs, targets, count)`, handed to the `Trainer`; recipes pick one here rather
than importing each other's. Later objectives (DPO) join them here."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from torchbook.train.trainer import Step


def next_token_step(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Step:
    """Cross-entropy of every next token of the window; predictions kept for the accuracy metric."""
    inputs, targets = batch
    logits = model(inputs)
    if isinstance(logits, tuple):  # an RNN also returns its final state
        logits = logits[0]
    logits = logits.reshape(-1, logits.size(-1))
    targets = targets.reshape(-1)
    return Step(F.cross_entropy(logits, targets), logits.detach(), targets, count=targets.numel())


def translation_step(pad_id: int, label_smoothing: float = 0.0) -> Callable[[nn.Module, Any], Step]:
    """Teacher forcing: the decoder reads <s> y1 .. y(n-1) and predicts y1 .. yn </s>; padding is ignored."""

    def step(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Step:
        source, target = batch
        labels = target[:, 1:]
        real = labels != pad_id
        logits = model(source, target[:, :-1], keep=real)  # (N, vocab): real target tokens only
        loss = F.cross_entropy(logits, labels[real], label_smoothing=label_smoothing if model.training else 0.0)
        return Step(loss, count=int(real.sum()))

    return step


def chunked_cross_entropy(head: nn.Module, hidden: Tensor, targets: Tensor, chunk: int = 1024) -> Tensor:
    """Mean cross-entropy of `head(hidden)` (N, vocab) against `targets` (N,), computed `chunk` rows at a time and
    recomputed in backward: the logits of only one chunk exist at once. Over a vocabulary of 49,152 and 2,048
    tokens the full logits, their log-softmax and its gradient are 0.4 GB each, more than a LoRA run's weights and
    adapters together (docs/benchmarks.md)."""
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.size(0), chunk):
        part, goal = hidden[start : start + chunk], targets[start : start + chunk]
        total = total + checkpoint(lambda h, y: F.cross_entropy(head(h).float(), y, reduction="sum"), part, goal,
                                   use_reentrant=False)
    return total / max(hidden.size(0), 1)


def sft_step(model: nn.Module, batch: tuple[Tensor, ...]) -> Step:
    """Supervised fine-tuning (chapter 15): next-token cross-entropy over the assistant's tokens only.

    `batch` is (inputs, labels) or, packed, (inputs, labels, documents) (see `torchbook.train.sft`); labels are
    the next tokens, -100 where the loss does not count (the system's and user's tokens, padding). The loss is
    the mean over the counted tokens of the batch. A model that can return its hidden states (GPT) has the output
    layer applied to the counted positions only, a chunk at a time (`chunked_cross_entropy`)."""
    inputs, labels, *rest = batch
    kwargs = {"documents": rest[0]} if rest else {}
    counted = labels != -100
    head = getattr(model, "lm_head", None)
    if isinstance(head, nn.Module) and getattr(model, "returns_hidden", False):
        hidden = model(inputs, hidden_only=True, **kwargs)
        loss = chunked_cross_entropy(head, hidden[counted], labels[counted])
    else:
        logits = model(inputs, **kwargs)
        loss = F.cross_entropy(logits[counted].float(), labels[counted])
    return Step(loss, count=int(counted.sum()))
