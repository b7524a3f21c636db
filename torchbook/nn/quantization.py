"""The quantization equations of the book's Appendix B, and fake-quantized linear layers built on them.

Asymmetric (affine) b-bit quantization of values in [min, max] (Equation B-1):

    scale s = (max - min) / (2^b - 1),   zero point z = round(-min / s),
    q = clamp(round(x / s) + z, 0, 2^b - 1),   x ≈ (q - z) s.

The book's example: (0.1, -0.1, 0.6, 0) at 8 bits gives s = 0.7 / 255 = 0.002745098..., z = 36, codes
(72, 0, 255, 36), and 72 dequantizes to 0.0988. Symmetric quantization keeps 0 at code 0:

    s = max |x| / (2^(b-1) - 1),   q = clamp(round(x / s), -(2^(b-1) - 1), 2^(b-1) - 1),   x ≈ q s,

so 8 bits give 255 levels in -127..127 (the book's symmetric example prints s = 0.0074015749, which is
0.94 / 127 in float32). The book's own code calls `torch.quantize_per_tensor`, whose `qint8` type is signed: an
asymmetric zero point of 36 then turns 0.6 into 0.2498 (clipped at code 127); the printed figures need `quint8`,
and that API is deprecated in torch 2.13, so the equations are computed here directly.

Fake quantization rounds a tensor to its quantized grid and back in floating point, so a float model computes
what the integer one would (static post-training quantization, once activation ranges are calibrated) and can
keep training through it (quantization-aware training, QAT): the rounding's gradient is taken as 1 (the
straight-through estimator). `FakeQuantLinear` quantizes its weights symmetrically per output row and its
input per tensor with a calibrated range; `QuantizedCodes` holds what an integer deployment would store.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def affine_parameters(low: Tensor, high: Tensor, bits: int = 8) -> tuple[Tensor, Tensor]:
    """Equation B-1's scale and zero point for values in [low, high] (elementwise for per-channel ranges). The
    range is widened to include 0, so that 0 is exactly representable (ReLU outputs, padding)."""
    low, high = torch.clamp(low, max=0.0), torch.clamp(high, min=0.0)
    scale = (high - low) / (2**bits - 1)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero range: any scale works
    zero_point = torch.round(-low / scale)
    return scale, zero_point


def symmetric_scale(max_abs: Tensor, bits: int = 8) -> Tensor:
    """s = max |x| / (2^(b-1) - 1): 127 for 8 bits, 7 for 4 bits."""
    scale = max_abs / (2 ** (bits - 1) - 1)
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def code_range(bits: int, symmetric: bool) -> tuple[int, int]:
    """The integer codes: 0..2^b - 1 (asymmetric), -(2^(b-1) - 1)..2^(b-1) - 1 (symmetric)."""
    return (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)


def quantize(x: Tensor, scale: Tensor, zero_point: Tensor | float, low: int, high: int) -> Tensor:
    """q = clamp(round(x / s) + z, low, high), as floats holding integers (round half to even, as torch does)."""
    return torch.clamp(torch.round(x / scale) + zero_point, low, high)


def dequantize(q: Tensor, scale: Tensor, zero_point: Tensor | float) -> Tensor:
    """x ≈ (q - z) s."""
    return (q - zero_point) * scale


def fake_quantize(x: Tensor, scale: Tensor, zero_point: Tensor | float, low: int, high: int) -> Tensor:
    """dequantize(quantize(x)) in the forward pass; the identity's gradient in the backward pass (the
    straight-through estimator), so a model can train through the rounding (QAT)."""
    rounded = dequantize(quantize(x, scale, zero_point, low, high), scale, zero_point)
    return x + (rounded - x).detach()


@dataclass
class QuantizedCodes:
    """What an integer deployment of a `FakeQuantLinear` stores: the weight codes (4-bit codes packed two per
    byte), one float32 scale per output row, the input's scale and zero point, and the float32 bias."""

    codes: Tensor
    weight_scales: Tensor
    input_scale: Tensor
    input_zero_point: Tensor
    bias: Tensor | None

    def tensors(self, prefix: str) -> dict[str, Tensor]:
        out = {f"{prefix}codes": self.codes, f"{prefix}weight_scales": self.weight_scales,
               f"{prefix}input_scale": self.input_scale, f"{prefix}input_zero_point": self.input_zero_point}
        if self.bias is not None:
            out[f"{prefix}bias"] = self.bias
        return out


class FakeQuantLinear(nn.Module):
    """A linear layer computing what its integer version would: y = Q_a(x) Q_w(W)ᵀ + b.

    Q_w: symmetric, per output row, `weight_bits`; Q_a: asymmetric, per tensor, `activation_bits`, over the input
    range seen while `calibrating` (static quantization: the range is fixed before inference). Until a range has
    been observed the input passes unquantized. Gradients flow straight through both roundings (QAT).
    """

    def __init__(self, linear: nn.Linear, weight_bits: int = 8, activation_bits: int = 8, per_row: bool = True):
        super().__init__()
        self.per_row = per_row
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight_bits, self.activation_bits = weight_bits, activation_bits
        self.weight = nn.Parameter(linear.weight.detach().clone())
        self.bias = nn.Parameter(linear.bias.detach().clone()) if linear.bias is not None else None
        self.input_min: Tensor
        self.input_max: Tensor
        self.register_buffer("input_min", torch.tensor(float("inf")))
        self.register_buffer("input_max", torch.tensor(float("-inf")))
        self.calibrating = False

    def weight_quantization(self) -> tuple[Tensor, int, int]:
        max_abs = self.weight.detach().abs().amax(1, keepdim=True)
        if not self.per_row:  # one scale for the whole matrix, as the book's per-tensor examples
            max_abs = max_abs.amax().expand_as(max_abs)
        scale = symmetric_scale(max_abs, self.weight_bits)
        return (scale, *code_range(self.weight_bits, symmetric=True))

    def input_quantization(self) -> tuple[Tensor, Tensor, int, int]:
        scale, zero_point = affine_parameters(self.input_min, self.input_max, self.activation_bits)
        return (scale, zero_point, *code_range(self.activation_bits, symmetric=False))

    def forward(self, x: Tensor) -> Tensor:
        if self.calibrating:
            self.input_min.copy_(torch.minimum(self.input_min, x.detach().min()))
            self.input_max.copy_(torch.maximum(self.input_max, x.detach().max()))
        if torch.isfinite(self.input_min):
            x = fake_quantize(x, *self.input_quantization())
        scale, low, high = self.weight_quantization()
        return F.linear(x, fake_quantize(self.weight, scale, 0.0, low, high), self.bias)

    @torch.no_grad()
    def codes(self) -> QuantizedCodes:
        scale, low, high = self.weight_quantization()
        q = quantize(self.weight, scale, 0.0, low, high).to(torch.int8)
        if self.weight_bits <= 4:  # two codes per byte (offset to 0..15)
            nibbles = (q + 8).to(torch.uint8).flatten()
            nibbles = F.pad(nibbles, (0, nibbles.numel() % 2))
            q = nibbles[0::2] | (nibbles[1::2] << 4)
        input_scale, input_zero_point, _, _ = self.input_quantization()
        bias = self.bias.detach().clone() if self.bias is not None else None
        return QuantizedCodes(q, scale.squeeze(1).float(), input_scale.float(), input_zero_point.float(), bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"weight_bits={self.weight_bits}, activation_bits={self.activation_bits}, per_row={self.per_row}")


def fake_quantize_linear_layers(model: nn.Module, weight_bits: int, activation_bits: int,
                                per_row: bool = True) -> nn.Module:
    """Swap every `nn.Linear` of `model` (in place) for a `FakeQuantLinear` with the same weights."""
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child,
                    FakeQuantLinear(module, weight_bits, activation_bits, per_row))
    return model


@torch.no_grad()
def calibrate(model: nn.Module, batches: list[Tensor]) -> nn.Module:
    """Static quantization's calibration: run `batches` through the model, each `FakeQuantLinear` recording the
    range of its input (min and max over all of them)."""
    layers = [m for m in model.modules() if isinstance(m, FakeQuantLinear)]
    for layer in layers:
        layer.calibrating = True
    try:
        model.eval()
        for batch in batches:
            model(batch)
    finally:
        for layer in layers:
            layer.calibrating = False
    return model


def integer_state(model: nn.Module) -> dict[str, Tensor]:
    """The tensors an integer deployment of a fake-quantized model stores (codes, scales, biases, and the other
    layers' parameters and buffers as they are), for measuring its size."""
    out: dict[str, Tensor] = {}
    quantized = {name for name, m in model.named_modules() if isinstance(m, FakeQuantLinear)}
    for name, module in model.named_modules():
        if isinstance(module, FakeQuantLinear):
            out.update(module.codes().tensors(f"{name}."))
    for name, tensor in model.state_dict().items():
        if name.rpartition(".")[0] not in quantized:
            out[name] = tensor
    return out
