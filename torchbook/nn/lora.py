"""LoRA, low-rank adapters (book chapter 17; Hu et al., 2021), and QLoRA's frozen 4-bit base (Dettmers et al., 2023).

A frozen linear layer W gets a trainable low-rank update: y = x W^T + b + (alpha / r) * B(A(dropout(x))), with
A (r, in) initialised as PEFT does (Kaiming-uniform, a = sqrt(5)) and B (out, r) zero, so the adapted model starts
equal to the base one. Only A and B train: r (in + out) numbers per layer instead of in x out. `merge()` folds
(alpha / r) B A into W for inference and `unmerge()` takes it out again.

`apply_lora(model, rank, alpha, dropout, targets)` swaps the layers named by `targets` (shell-style patterns on
module names, e.g. "*.attn.q_proj") through the one module-swap helper; the base may be an `nn.Linear` or, for
QLoRA, an `Int4Linear` (int4 codes with a scale and minimum per group of 32 inputs, not the book's NF4), used
unfused, whose weight is dequantised again in the backward pass rather than kept (`FrozenInt4`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torchbook.nn.quantized import Int4Linear
from torchbook.nn.swap import swap_modules

# The attention projections of torchbook's GPT, LoRA's usual targets (the chat recipes' default).
ATTENTION_TARGETS = ("*.attn.q_proj", "*.attn.k_proj", "*.attn.v_proj", "*.attn.out_proj")


class FrozenInt4(torch.autograd.Function):
    """x W^T for a frozen `Int4Linear` W: the dequantised weight is not saved for backward but rebuilt from the
    codes (the gradient flows to x only), so training keeps 4-bit weights in memory, not float ones."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, layer: Int4Linear) -> Tensor:  # type: ignore[override]
        ctx.layer = layer
        return F.linear(x, layer.dequantize(x.dtype))

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return grad @ ctx.layer.dequantize(grad.dtype), None


class LoRALinear(nn.Module):
    """A frozen `base` linear layer (nn.Linear or Int4Linear) plus (alpha / rank) * lora_B(lora_A(dropout(x)))."""

    def __init__(self, base: nn.Module, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.base = base
        self.in_features: int = base.in_features  # type: ignore[assignment]
        self.out_features: int = base.out_features  # type: ignore[assignment]
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        weight = base.scales if isinstance(base, Int4Linear) else base.weight
        kind = {"device": weight.device, "dtype": weight.dtype}  # an int4 base's scales are float32
        self.lora_A = nn.Linear(self.in_features, rank, bias=False, **kind)  # type: ignore[arg-type]
        self.lora_B = nn.Linear(rank, self.out_features, bias=False, **kind)  # type: ignore[arg-type]
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reset_lora()
        for p in base.parameters():
            p.requires_grad_(False)
        self.merged = False

    def reset_lora(self) -> None:
        """PEFT's default initialisation: A Kaiming-uniform (a = sqrt(5)), B zero (the update starts at 0)."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def delta_weight(self) -> Tensor:
        """(alpha / rank) B A, the update to the base weight (out, in)."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def merge(self) -> None:
        if isinstance(self.base, Int4Linear):
            raise ValueError("cannot merge a LoRA update into int4 weights; merge into the float base model")
        if not self.merged:
            weight: Tensor = self.base.weight  # type: ignore[assignment]
            weight.data += self.delta_weight().to(weight.dtype)
            self.merged = True

    def unmerge(self) -> None:
        if self.merged:
            weight: Tensor = self.base.weight  # type: ignore[assignment]
            weight.data -= self.delta_weight().to(weight.dtype)
            self.merged = False

    def base_forward(self, x: Tensor) -> Tensor:
        if not isinstance(self.base, Int4Linear):
            return self.base(x)  # type: ignore[no-any-return]
        y = FrozenInt4.apply(x, self.base)
        return y + self.base.bias.to(y.dtype) if self.base.bias is not None else y

    def forward(self, x: Tensor) -> Tensor:
        y = self.base_forward(x)
        if self.merged:
            return y
        return y + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}, merged={self.merged}"


def apply_lora(model: nn.Module, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0,
               targets: Iterable[str] | None = None, quantize_base: bool = False) -> list[str]:
    """Freeze `model` and put LoRA adapters on its linear layers named by `targets` (shell-style patterns; None:
    all but the model's `output_layers`); `quantize_base` (QLoRA) stores those layers' frozen weights as int4 first.
    The names of the adapted layers."""
    for p in model.parameters():
        p.requires_grad_(False)
    skip = set(getattr(model, "output_layers", ())) if targets is None else set()

    def adapter(name: str, module: nn.Module) -> nn.Module | None:
        if name in skip:
            return None
        base = module
        if quantize_base:
            assert isinstance(module, nn.Linear)
            base = Int4Linear.from_linear(module).to(module.weight.device)
        return LoRALinear(base, rank, alpha, dropout)

    names = swap_modules(model, adapter, (nn.Linear, Int4Linear), targets)
    if not names:
        raise ValueError(f"no linear layer matches the LoRA targets {list(targets or [])}")
    return names


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The adapters' weights only: {"<layer>.lora_A.weight", "<layer>.lora_B.weight", ...}."""
    return {k: v for k, v in model.state_dict().items() if ".lora_A." in k or ".lora_B." in k}


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base layer and put the base layer back in its place (a plain model, savable in
    any format); in place."""
    def unwrap(name: str, module: nn.Module) -> nn.Module:
        assert isinstance(module, LoRALinear)
        module.merge()
        for p in module.base.parameters():
            p.requires_grad_(True)
        return module.base

    swap_modules(model, unwrap, LoRALinear)
    return model
