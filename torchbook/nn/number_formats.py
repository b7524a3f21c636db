"""Number formats of the book's Appendix B (Figure B-1) and its ternary packing example.

A floating-point number is a sign bit, e exponent bits and m mantissa bits. The book's value equation, for a
normal number (exponent field E not all zeros):

    value = (-1)^sign × 2^(E - bias) × (1 + mantissa / 2^m),   bias = 2^(e-1) - 1,

and for a subnormal one (E = 0): (-1)^sign × 2^(1 - bias) × (mantissa / 2^m). `decode` applies it to a bit
pattern; the tests check it bit by bit against torch's own float16, bfloat16, float32 and float8 values.
`formats_table` reads each format's range, smallest normal and precision from `torch.finfo`.

Ternary weights (-1, 0, 1; 1.58 bits) pack five to a byte, since 3^5 = 243 <= 256: shift each to 0, 1, 2 and read
them as the base-3 digits of one number, first digit most significant, so (1, -1, 0, 1, 0) is
2·81 + 0·27 + 1·9 + 2·3 + 1 = 178 (the book's example).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

TERNARY_PER_BYTE = 5


@dataclass(frozen=True)
class FloatFormat:
    name: str
    dtype: torch.dtype
    exponent_bits: int
    mantissa_bits: int

    @property
    def bits(self) -> int:
        return 1 + self.exponent_bits + self.mantissa_bits

    @property
    def bias(self) -> int:
        return 2 ** (self.exponent_bits - 1) - 1


FORMATS = [  # Figure B-1's formats
    FloatFormat("fp32", torch.float32, 8, 23),
    FloatFormat("fp16", torch.float16, 5, 10),
    FloatFormat("bf16", torch.bfloat16, 8, 7),
    FloatFormat("fp8 E4M3", torch.float8_e4m3fn, 4, 3),
    FloatFormat("fp8 E5M2", torch.float8_e5m2, 5, 2),
]
_INT_OF_WIDTH = {32: torch.int32, 16: torch.int16, 8: torch.uint8}


def bit_pattern(value: float, fmt: FloatFormat) -> int:
    """The bits torch stores for `value` rounded to `fmt`, as an unsigned integer."""
    raw = int(torch.tensor([value]).to(fmt.dtype).view(_INT_OF_WIDTH[fmt.bits]).item())
    return raw & (2**fmt.bits - 1)


def decode(bits: int, fmt: FloatFormat) -> float:
    """The value of a bit pattern by the book's equation (normal and subnormal numbers; not inf or NaN)."""
    m, e = fmt.mantissa_bits, fmt.exponent_bits
    sign = -1.0 if bits >> (e + m) else 1.0
    exponent = (bits >> m) & (2**e - 1)
    mantissa = bits & (2**m - 1)
    if exponent == 0:
        return sign * 2.0 ** (1 - fmt.bias) * (mantissa / 2**m)
    return sign * 2.0 ** (exponent - fmt.bias) * (1 + mantissa / 2**m)


def formats_table() -> list[dict[str, Any]]:
    """Each format's layout and what `torch.finfo` says of it: largest value, smallest normal, the gap between 1
    and the next number (machine epsilon) and about how many decimal digits it keeps."""
    rows = []
    for fmt in FORMATS:
        info = torch.finfo(fmt.dtype)
        rows.append({"format": fmt.name, "bits": fmt.bits, "sign": 1, "exponent": fmt.exponent_bits,
                     "mantissa": fmt.mantissa_bits, "max": float(info.max), "smallest_normal": float(info.tiny),
                     "epsilon": float(info.eps), "resolution": float(info.resolution)})
    return rows


def pack_ternary(values: list[int]) -> bytes:
    """Ternary values (-1, 0, 1), five per byte in base 3, first value most significant (the last byte padded
    with zeros)."""
    if any(v not in (-1, 0, 1) for v in values):
        raise ValueError("ternary values must be -1, 0 or 1")
    padded = list(values) + [0] * (-len(values) % TERNARY_PER_BYTE)
    out = bytearray()
    for i in range(0, len(padded), TERNARY_PER_BYTE):
        byte = 0
        for v in padded[i : i + TERNARY_PER_BYTE]:
            byte = byte * 3 + (v + 1)
        out.append(byte)
    return bytes(out)


def unpack_ternary(data: bytes, count: int) -> list[int]:
    """The inverse of `pack_ternary`: the first `count` values."""
    values: list[int] = []
    for byte in data:
        digits = []
        for _ in range(TERNARY_PER_BYTE):
            byte, digit = divmod(byte, 3)
            digits.append(digit - 1)
        values += reversed(digits)
    return values[:count]
