"""Training steps: what one batch costs, for the objectives recipes share. A step is
`step(model, batch) -> Step(loss, outputs, targets, count)`, handed to the `Trainer`; recipes pick one here rather
than importing each other's. Later objectives (DPO) join them here."""

from __future__ import annotations

import math
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


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of `hidden @ weight^T + bias` against `targets`, a chunk of rows at a time, with the
    gradients computed in the forward pass: per chunk, d loss / d logits = (softmax - one_hot) / N, then
    d hidden = that @ weight and d weight += that^T @ hidden. Backward only scales them, so the output layer runs
    once forward and once backward (as over full logits) instead of also being recomputed, and only one chunk's
    logits ever exist."""

    @staticmethod
    def forward(ctx: Any, hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor,  # type: ignore[override]
                chunk: int) -> Tensor:
        n = hidden.size(0)
        want_h, want_w, want_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(hidden) if want_h else None
        grad_w = torch.zeros_like(weight) if want_w else None
        grad_b = torch.zeros_like(bias) if want_b and bias is not None else None
        total = hidden.new_zeros((), dtype=torch.float32)
        # Probabilities far below float32's normal range (logits about 70 or more under the largest) would be
        # computed and multiplied as subnormal numbers, which the CPU handles many times more slowly: with torch's
        # default embedding initialisation (tied to the output layer) a quarter of them were, and the output
        # layer's backward took 15x as long (docs/benchmarks.md). Shifted logits are floored at `floor` before exp
        # and those probabilities set to 0: each below V n e^(floor) < 1e-29, every product stays normal.
        floor = math.log(torch.finfo(torch.float32).tiny) + math.log(weight.size(0)) + math.log(max(n, 1)) + 1.0
        cut = math.exp(floor) * 1.5
        for start in range(0, n, chunk):
            h, y = hidden[start : start + chunk], targets[start : start + chunk]
            logits = F.linear(h, weight, bias).float()
            picked = logits.gather(1, y[:, None]).squeeze(1)
            top = logits.amax(-1, keepdim=True)
            e = logits.sub_(top).clamp_(min=floor).exp_()  # in place: exp(logit - max)
            sums = e.sum(-1)
            total += (top.squeeze(1) + sums.log() - picked).sum()
            F.threshold(e, cut, 0.0, inplace=True)
            g = e.mul_((1.0 / (sums * n))[:, None])  # softmax / N
            g[torch.arange(len(y), device=g.device), y] -= 1.0 / n
            g = g.to(hidden.dtype)
            if grad_h is not None:
                torch.mm(g, weight, out=grad_h[start : start + chunk])
            if grad_w is not None:
                grad_w.addmm_(g.t(), h)
            if grad_b is not None:
                grad_b += g.sum(0)
        ctx.save_for_backward(*(t for t in (grad_h, grad_w, grad_b) if t is not None))
        ctx.which = (grad_h is not None, grad_w is not None, grad_b is not None)
        return total / max(n, 1)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        saved = iter(ctx.saved_tensors)
        grads = [next(saved) if present else None for present in ctx.which]
        return (*(g * grad.to(g.dtype) if g is not None else None for g in grads), None, None)


def chunked_cross_entropy(head: nn.Module, hidden: Tensor, targets: Tensor, chunk: int = 1024) -> Tensor:
    """Mean cross-entropy of `head(hidden)` (N, vocab) against `targets` (N, every one counted), `chunk` rows at a
    time: the logits of only one chunk exist at once. Over a vocabulary of 49,152 and 2,048 tokens the full
    logits, their log-softmax and its gradient are 0.4 GB each, more than a LoRA run's weights and adapters
    together (docs/benchmarks.md). A plain `nn.Linear` head outside autocast goes through `_LinearCrossEntropy`
    (gradients computed chunk by chunk in the forward pass); any other head is recomputed in backward."""
    grad = torch.is_grad_enabled()
    if grad and type(head) is nn.Linear and not torch.is_autocast_enabled(hidden.device.type):
        return _LinearCrossEntropy.apply(hidden, head.weight, head.bias, targets, chunk)  # type: ignore[no-any-return]

    def part_loss(h: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(head(h).float(), y, reduction="sum")

    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.size(0), chunk):
        part, goal = hidden[start : start + chunk], targets[start : start + chunk]
        total = total + (checkpoint(part_loss, part, goal, use_reentrant=False) if grad else part_loss(part, goal))
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
