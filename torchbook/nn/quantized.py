"""Weight-only quantized linear layers for fast decoding (the book's quantization chapter, used by chapter 17's
chat models): the weights are stored in 4 or 8 bits, the activations stay in floating point.

Decoding one token at batch 1 reads every weight once and does little arithmetic with it, so its speed is set by
the bytes per weight: float32 4, bfloat16 2, int8 1, int4 0.5. These layers keep the weights small and multiply
with PyTorch's CPU kernel for packed 4-bit weights (`_weight_int4pack_mm_for_cpu`), which takes bfloat16
activations; a layer's input and output keep their dtype (the residual stream, norms and attention stay
float32), only the product is computed in bfloat16.

- `Int4Linear`: group-wise asymmetric 4-bit weights, w = scale * q + minimum with q in 0..15, one (scale, minimum)
  per `group_size` consecutive inputs of an output row. This is exactly GGUF's Q4_1 layout (and Q4_0's, with
  minimum = -8 scale), so a GGUF file's 4-bit tensors load without requantization (`from_codes`); `from_linear`
  quantizes float weights by rounding to the nearest level, as llama.cpp's Q4_1 quantizer does.
- `Int8Linear`: group-wise symmetric 8-bit weights, w = scale * q with q in -127..127: GGUF's Q8_0 layout
  (`from_codes`, `from_linear`).

Both run the packed-weight kernel for few input rows (decoding) and, for many rows (a prompt's prefill), unpack
the weights to bfloat16 for one dense matrix product, which is faster there; off the CPU they always unpack.
`quantize_linear_layers` swaps a model's `nn.Linear` layers for them.

The kernel's time grows with the rows (on 2 cores of this project's CPU about 0.045 ms a row for one SmolLM2
block, docs/benchmarks.md), and unpacking per call costs more than the product, so a batch of many requests shares
little of either. `keep_dense_copies(model)` gives every quantized layer a bfloat16 copy of its weights for
products of `DENSE_COPY_ROWS` rows or more (the serving engine's batched steps and prefills): a dense bfloat16
product, whose time hardly grows with the rows on a CPU with bfloat16 matrix units (AMX: 16 rows of a SmolLM2
block cost 1.1x one, benchmarks/int4_kernel.py), at the price of 2 more bytes a weight (a 4-bit layer's codes and
scales take 0.75 bytes a weight, float32 4). The copy rounds each weight once to bfloat16, so a row's output from
it differs from the kernel's by bfloat16 rounding (about 1e-2 in SmolLM2's logits): which path a row takes depends
on how many rows share its product.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torchbook.nn.swap import swap_modules

COMPUTE_DTYPE = torch.bfloat16
KERNEL_MAX_ROWS = 64  # above this many input rows, unpacking to bfloat16 + a dense product is faster (measured)
# From this many rows a kept bfloat16 copy beats the kernel inside SmolLM2-135M on 2 threads (an engine step of 12
# rows: 79 against 83 ms, 16 rows: 90 against 106 ms; 8 rows: 72 against 57; docs/benchmarks.md).
DENSE_COPY_ROWS = 12
OUTPUT_EXACT_TOP = 64  # an output layer's largest outputs recomputed exactly (`Int8Linear.forward`)


class QuantizedLinear(nn.Module):
    """What `Int4Linear` and `Int8Linear` share: y = x W^T + b for x (..., in), with W held as codes.

    Subclasses hold the codes and define `dequantize(dtype)` (the weight the codes stand for) and `kernel(rows)`
    (the packed-weight product of (rows, in) bfloat16 rows); caches built from the codes on first use live in
    `_cache` and are dropped when the layer is moved or cast, as is the dense copy (`keep_dense_copies`), which
    is rebuilt on the next product that needs it.
    """

    def __init__(self, in_features: int, out_features: int, group_size: int, bias: bool):
        super().__init__()
        if in_features % group_size:
            raise ValueError(f"{type(self).__name__}: group_size={group_size} must divide in_features={in_features}")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self._cache: Any = None
        self.dense_from_rows: int | None = None  # products of this many rows or more use `dense_copy()`
        self._dense: Tensor | None = None

    def _fill(self, bias: Tensor | None, **buffers: Tensor) -> None:
        for name, value in buffers.items():
            getattr(self, name).copy_(value)
        if bias is not None and self.bias is not None:
            self.bias.data.copy_(bias)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        raise NotImplementedError

    def kernel(self, rows: Tensor) -> Tensor:
        raise NotImplementedError

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> QuantizedLinear:  # type: ignore[override]
        self._cache = self._dense = None  # moved or cast: rebuild on next use
        return super()._apply(fn, recurse)

    def dense_copy(self) -> Tensor:
        """The weight (out, in) in bfloat16, kept: dequantized in float32, then rounded once."""
        if self._dense is None:
            self._dense = self.dequantize(torch.float32).to(COMPUTE_DTYPE).contiguous()
        return self._dense

    def forward(self, x: Tensor) -> Tensor:
        rows = x.reshape(-1, self.in_features).to(COMPUTE_DTYPE)
        if self.dense_from_rows is not None and rows.size(0) >= self.dense_from_rows:
            y = F.linear(rows, self.dense_copy())
        elif rows.size(0) <= KERNEL_MAX_ROWS and x.device.type == "cpu":
            y = self.kernel(rows)
        else:
            y = F.linear(rows, self.dequantize(COMPUTE_DTYPE))
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}"


class Int4Linear(QuantizedLinear):
    """y = x W^T + b with W stored as group-wise 4-bit codes (see the module docstring).

    Buffers: `codes` (out, in / 2) uint8, two codes per byte (low nibble: even input index); `scales` and `minimums`
    (out, in / group_size) float32. The kernel's own packed layout is built on first use and not saved.
    """

    def __init__(self, in_features: int, out_features: int, group_size: int = 32, bias: bool = False):
        if group_size not in (32, 64, 128, 256):
            raise ValueError(f"Int4Linear: group_size must be 32, 64, 128 or 256, got {group_size}")
        super().__init__(in_features, out_features, group_size, bias)
        groups = in_features // group_size
        self.codes: Tensor
        self.scales: Tensor
        self.minimums: Tensor
        self.register_buffer("codes", torch.zeros(out_features, in_features // 2, dtype=torch.uint8))
        self.register_buffer("scales", torch.zeros(out_features, groups))
        self.register_buffer("minimums", torch.zeros(out_features, groups))

    @classmethod
    def from_codes(cls, codes: Tensor, scales: Tensor, minimums: Tensor, bias: Tensor | None = None) -> Int4Linear:
        """From unpacked codes (out, in) in 0..15 and per-group scales and minimums (out, in / group_size)."""
        out_features, in_features = codes.shape
        layer = cls(in_features, out_features, in_features // scales.size(1), bias=bias is not None)
        codes = codes.to(torch.uint8)
        layer._fill(bias, codes=codes[:, 0::2] | (codes[:, 1::2] << 4), scales=scales, minimums=minimums)
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 32) -> Int4Linear:
        """Round-to-nearest quantization of a float layer, per group: scale = (max - min) / 15, minimum = min,
        q = round((w - min) / scale) (llama.cpp's Q4_1 quantizer, scale and minimum rounded to float16 after)."""
        weight = linear.weight.detach().float()
        groups = weight.reshape(weight.size(0), -1, group_size)
        low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
        scale = (high - low) / 15
        inverse = torch.where(scale == 0, torch.zeros_like(scale), 1 / scale)
        codes = torch.trunc((groups - low) * inverse + 0.5).clamp(0, 15).reshape_as(weight)
        to_half = lambda t: t.squeeze(-1).half().float()  # noqa: E731
        return cls.from_codes(codes, to_half(scale), to_half(low), linear.bias)

    def unpacked_codes(self) -> Tensor:
        """(out, in) uint8 codes 0..15."""
        return torch.stack([self.codes & 0x0F, self.codes >> 4], dim=-1).reshape(self.out_features, self.in_features)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The weight (out, in) the codes stand for."""
        groups = self.unpacked_codes().reshape(self.out_features, -1, self.group_size).to(dtype)
        weight = groups * self.scales.to(dtype)[..., None] + self.minimums.to(dtype)[..., None]
        return weight.reshape(self.out_features, self.in_features)

    def kernel_scales(self, dtype: torch.dtype = COMPUTE_DTYPE) -> Tensor:
        """The kernel computes (q - 8) * scale + zero, so zero = minimum + 8 scale; layout (in / group, out, 2)."""
        return torch.stack([self.scales.t(), (self.minimums + 8 * self.scales).t()], dim=-1).contiguous().to(dtype)

    def kernel_weights(self) -> tuple[Tensor, Tensor]:
        """The kernel's packed codes and scales, with zero rows up to a multiple of 16 outputs (its tile)."""
        if self._cache is None:
            pad = -self.out_features % 16
            codes = F.pad(self.unpacked_codes().int(), (0, 0, 0, pad))
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
            self._cache = packed, F.pad(self.kernel_scales(), (0, 0, 0, pad))
        return self._cache

    def kernel(self, rows: Tensor) -> Tensor:
        packed, scale_and_zero = self.kernel_weights()
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, packed, self.group_size, scale_and_zero)
        return y[:, : self.out_features]


class Int8Linear(QuantizedLinear):
    """y = x W^T + b with W stored as group-wise symmetric 8-bit codes: w = scale * q, q in -127..127, one scale per
    `group_size` consecutive inputs of an output row (GGUF's Q8_0 layout with group_size=32).

    The packed-weight kernel is the 4-bit one: q = 16 hi + lo with hi in -8..7 and lo in 0..15, so W is the sum of
    two 4-bit matrices (scales 16 scale and scale) and x W^T = [x, x] [W_hi, W_lo]^T, one `Int4Linear` over twice
    the inputs (`kernel_planes`), built on first use.

    `exact_top` = k > 0 (an output layer): each row's k largest outputs are recomputed in x's dtype from the exact
    weights. A logit near 20 rounds to bfloat16 in steps of 0.125, enough to swap two close candidates; this way
    the choices decoding makes among the top k do not hinge on that rounding.
    """

    def __init__(self, in_features: int, out_features: int, group_size: int = 32, bias: bool = False,
                 exact_top: int = 0):
        super().__init__(in_features, out_features, group_size, bias)
        self.exact_top = exact_top
        self.codes: Tensor
        self.scales: Tensor
        self.register_buffer("codes", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scales", torch.zeros(out_features, in_features // group_size))

    @classmethod
    def from_codes(cls, codes: Tensor, scales: Tensor, bias: Tensor | None = None) -> Int8Linear:
        """From int8 codes (out, in) and per-group scales (out, in / group_size)."""
        out_features, in_features = codes.shape
        layer = cls(in_features, out_features, in_features // scales.size(1), bias=bias is not None)
        layer._fill(bias, codes=codes, scales=scales)
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 32) -> Int8Linear:
        """Round-to-nearest per group: scale = max |w| / 127, q = round(w / scale), halves away from zero
        (llama.cpp's Q8_0 quantizer, the scale rounded to float16 after)."""
        weight = linear.weight.detach().float()
        groups = weight.reshape(weight.size(0), -1, group_size)
        scale = groups.abs().amax(-1, keepdim=True) / 127
        inverse = torch.where(scale == 0, torch.zeros_like(scale), 1 / scale)
        scaled = groups * inverse
        codes = (scaled.sign() * (scaled.abs() + 0.5).floor()).clamp(-127, 127).to(torch.int8).reshape_as(weight)
        return cls.from_codes(codes, scale.squeeze(-1).half().float(), linear.bias)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return self.dequantize_rows(slice(None), dtype)

    def dequantize_rows(self, index: Any, dtype: torch.dtype = torch.float32) -> Tensor:
        """The weight rows `index` selects, (..., in)."""
        codes, scales = self.codes[index], self.scales[index]
        return (codes.reshape(*codes.shape[:-1], -1, self.group_size).to(dtype) * scales.to(dtype)[..., None]).flatten(-2)

    def kernel_planes(self) -> Int4Linear:
        if self._cache is None:
            high, low = (self.codes >> 4) + 8, self.codes & 0x0F  # codes in 0..15 each
            self._cache = Int4Linear.from_codes(
                torch.cat([high, low], dim=1), torch.cat([16 * self.scales, self.scales], dim=1),
                torch.cat([-128 * self.scales, torch.zeros_like(self.scales)], dim=1))
        return self._cache

    def kernel(self, rows: Tensor) -> Tensor:
        return self.kernel_planes().kernel(torch.cat([rows, rows], dim=-1))

    def forward(self, x: Tensor) -> Tensor:
        y = super().forward(x)
        if not self.exact_top:
            return y
        flat_x, flat_y = x.reshape(-1, self.in_features), y.reshape(-1, self.out_features)
        for start in range(0, flat_x.size(0), KERNEL_MAX_ROWS):  # chunks bound the gathered rows' memory
            xs = flat_x[start : start + KERNEL_MAX_ROWS]
            top = flat_y[start : start + KERNEL_MAX_ROWS].topk(min(self.exact_top, self.out_features), dim=-1).indices
            exact = (self.dequantize_rows(top, x.dtype) @ xs[..., None]).squeeze(-1)  # (rows, k)
            if self.bias is not None:
                exact = exact + self.bias[top].to(x.dtype)
            flat_y[start : start + KERNEL_MAX_ROWS].scatter_(-1, top, exact)  # y is this call's own tensor
        return flat_y.reshape(y.shape)


def concat_linear(layers: list[nn.Module]) -> nn.Module:
    """One layer whose output is the concatenated outputs of `layers` (same input, same kind: `nn.Linear`,
    `Int8Linear` or `Int4Linear`), so an inference step runs one matrix product instead of several (a fused
    query/key/value projection). The layers' weights are copied; the result is for inference."""
    first = layers[0]
    if {type(layer) for layer in layers} != {type(first)} or {getattr(layer, "in_features", None) for layer in layers} != {
            getattr(first, "in_features", None)}:
        raise ValueError(f"concat_linear needs layers of one kind and input size, got {layers}")
    biases: list[Tensor | None] = [getattr(layer, "bias", None) for layer in layers]
    if any(b is None for b in biases) and any(b is not None for b in biases):
        raise ValueError("concat_linear: cannot join layers with and without biases")
    bias = None if biases[0] is None else torch.cat([b.detach() for b in biases if b is not None])

    def cat(name: str) -> Tensor:
        return torch.cat([getattr(layer, name) for layer in layers]).detach()

    fused: nn.Module
    if isinstance(first, Int4Linear):
        codes = torch.cat([layer.unpacked_codes() for layer in layers if isinstance(layer, Int4Linear)])
        fused = Int4Linear.from_codes(codes, cat("scales"), cat("minimums"), bias)
    elif isinstance(first, Int8Linear):
        fused = Int8Linear.from_codes(cat("codes"), cat("scales"), bias)
    elif isinstance(first, nn.Linear):
        weight = cat("weight")
        fused = nn.Linear(first.in_features, weight.size(0), bias=bias is not None, device=weight.device,
                          dtype=weight.dtype)
        fused.weight.data = weight
        if bias is not None:
            fused.bias.data = bias
    else:
        raise ValueError(f"concat_linear: unsupported layer {type(first).__name__}")
    fused.inference_only = True  # type: ignore[assignment]  # `check_savable` refuses to save it
    return fused


def check_savable(model: nn.Module) -> None:
    """Quantized or fused layers (`torchbook.load(..., quantize=...)`, `fuse_projections`) are for inference: they
    have no place in a checkpoint's layout."""
    if any(isinstance(m, QuantizedLinear) or getattr(m, "inference_only", False) for m in model.modules()):
        raise ValueError("this model has quantized or fused layers, which are for inference only; save the model "
                         "loaded without quantize= instead")


def quantized_layers(model: nn.Module) -> list[QuantizedLinear]:
    """The quantized layers of `model`, without the ones a layer builds for its kernel (`Int8Linear`'s two 4-bit
    planes live in its `_cache`, a submodule once built)."""
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    inner = {id(m._cache) for m in layers}
    return [m for m in layers if id(m) not in inner]


def keep_dense_copies(model: nn.Module, from_rows: int = DENSE_COPY_ROWS) -> int:
    """Give every quantized layer of `model` a bfloat16 copy of its weights for products of `from_rows` rows or
    more (see the module docstring), built now; the bytes they take in all (0: no quantized layer)."""
    if from_rows < 1:
        raise ValueError(f"from_rows must be at least 1, got {from_rows}")
    total = 0
    for layer in quantized_layers(model):
        layer.dense_from_rows = from_rows
        total += layer.dense_copy().nbytes
    return total


def drop_dense_copies(model: nn.Module) -> None:
    """Undo `keep_dense_copies`: products of many rows unpack the codes again, and the copies' memory is free."""
    for layer in quantized_layers(model):
        layer.dense_from_rows, layer._dense = None, None


QUANTIZATIONS = ("int8", "int4")


def quantize_for_decoding(model: nn.Module, quantize: str, replacements: dict[str, nn.Module] | None = None) -> nn.Module:
    """What `torchbook.load(..., quantize=...)` does to a model, in place: its linear layers become weight-only
    `quantize` ("int8" or "int4") layers (`replacements`: ready layers by name, e.g. a GGUF file's own codes), the
    layers the model names in `output_layers` (GPT: `lm_head`) get 8 bits either way, and a model with
    `fuse_projections` (GPT) fuses them."""
    if quantize not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {quantize!r}; accepted: {', '.join(QUANTIZATIONS)}")
    quantize_linear_layers(model, 4 if quantize == "int4" else 8, replacements=replacements,
                           keep_8bit=tuple(getattr(model, "output_layers", ())))
    fuse = getattr(model, "fuse_projections", None)
    if callable(fuse):
        fuse()
    return model


def quantize_linear_layers(model: nn.Module, bits: int, group_size: int = 32,
                           replacements: dict[str, nn.Module] | None = None, keep_8bit: tuple[str, ...] = ()) -> nn.Module:
    """Swap every `nn.Linear` of `model` (in place) for an `Int8Linear` (bits=8) or `Int4Linear` (bits=4).

    `replacements` maps module names to ready layers (a GGUF file's own quantized tensors); layers named in
    `keep_8bit` get 8 bits even when bits=4 (as int4 recipes do for the output layer, whose errors go straight into
    the logits) and their `OUTPUT_EXACT_TOP` largest outputs recomputed exactly; layers whose input size
    `group_size` does not divide stay as they are.
    """
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    ready = replacements or {}

    def quantized(name: str, module: nn.Module) -> nn.Module | None:
        assert isinstance(module, nn.Linear)
        if module.in_features % group_size:
            return None  # no whole groups: stays as it is
        new: nn.Module
        if name in ready:
            new = ready[name]
        elif bits == 4 and name not in keep_8bit:
            new = Int4Linear.from_linear(module, group_size)
        else:
            new = Int8Linear.from_linear(module, group_size)
        if name in keep_8bit and isinstance(new, Int8Linear):
            new.exact_top = OUTPUT_EXACT_TOP
        return new

    swap_modules(model, quantized, nn.Linear)
    return model
