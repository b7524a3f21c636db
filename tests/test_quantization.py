"""Appendix B: the book's worked quantization examples, the number formats of Figure B-1, ternary packing, and the
fake-quantized layers used for static quantization and QAT."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from torchbook.nn import number_formats as nf
from torchbook.nn.quantization import (
    FakeQuantLinear,
    affine_parameters,
    calibrate,
    code_range,
    dequantize,
    fake_quantize,
    fake_quantize_linear_layers,
    integer_state,
    quantize,
    symmetric_scale,
)

BOOK_VALUES = torch.tensor([0.1, -0.1, 0.6, 0.0], dtype=torch.float64)


def test_equation_b1_by_hand_gives_the_books_asymmetric_example():
    scale, zero_point = affine_parameters(BOOK_VALUES.min(), BOOK_VALUES.max(), bits=8)
    assert scale.item() == pytest.approx(0.7 / 255, rel=1e-15)
    assert f"{scale.item():.9f}" == "0.002745098"
    assert zero_point.item() == 36
    codes = quantize(BOOK_VALUES, scale, zero_point, *code_range(8, symmetric=False))
    assert codes.tolist() == [72, 0, 255, 36]
    assert round(dequantize(codes[0], scale, zero_point).item(), 4) == 0.0988


def test_the_books_symmetric_scale():
    # 0.0074015749 as the book prints it: max |x| / 127 in float32 with max |x| = 0.94
    scale = symmetric_scale(torch.tensor(0.94), bits=8)
    assert f"{scale.item():.10f}" == "0.0074015749"
    assert code_range(8, symmetric=True) == (-127, 127) and code_range(4, symmetric=True) == (-7, 7)
    q = quantize(torch.tensor([0.94, -0.94, 0.0]), scale, 0.0, -127, 127)
    assert q.tolist() == [127, -127, 0]


@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor")
def test_equation_b1_matches_torchs_deprecated_quantized_tensors():
    """The book's code calls `torch.quantize_per_tensor`; with the signed `qint8` type a zero point of 36 clips 0.6
    at code 127 (0.2498 instead of 0.6); the unsigned `quint8` gives the printed figures. Our equations with codes
    0..255 and -128..127 give torch's quint8 and qint8 results exactly."""
    x = BOOK_VALUES.float()
    scale, zero_point = affine_parameters(x.min(), x.max(), bits=8)
    for dtype, (low, high) in ((torch.quint8, (0, 255)), (torch.qint8, (-128, 127))):
        theirs = torch.quantize_per_tensor(x, scale.item(), int(zero_point), dtype)
        ours = quantize(x, scale, zero_point, low, high)
        assert theirs.int_repr().tolist() == ours.int().tolist()
        torch.testing.assert_close(theirs.dequantize(), dequantize(ours, scale, zero_point))
    signed = quantize(x, scale, zero_point, -128, 127)
    assert round(dequantize(signed[2], scale, zero_point).item(), 4) == 0.2498


def test_fake_quantize_rounds_forward_and_passes_gradients_straight_through():
    x = torch.tensor([0.1, -0.1, 0.6, 0.0], requires_grad=True)
    scale, zero_point = affine_parameters(x.detach().min(), x.detach().max(), bits=8)
    y = fake_quantize(x, scale, zero_point, 0, 255)
    expected = dequantize(torch.tensor([72.0, 0.0, 255.0, 36.0]), scale, zero_point)
    torch.testing.assert_close(y.detach(), expected)
    (y * torch.arange(4.0)).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 2.0, 3.0]


def test_fake_quant_linear_equals_the_integer_computation():
    """A calibrated FakeQuantLinear's output is exactly what integer codes and scales give: with input codes
    qa, weight codes qw, y = s_a s_w ((qa - z_a) · qw) + b, the integer dot product done in float64."""
    torch.manual_seed(0)
    linear = nn.Linear(20, 7)
    layer = FakeQuantLinear(linear, weight_bits=4, activation_bits=4)
    calibrate(layer, [torch.rand(64, 20) * 3 - 1])
    x = torch.rand(5, 20) * 3 - 1
    s_a, z_a, lo, hi = layer.input_quantization()
    s_w, wlo, whi = layer.weight_quantization()
    qa = quantize(x, s_a, z_a, lo, hi).double()
    qw = quantize(layer.weight.detach(), s_w, 0.0, wlo, whi).double()
    assert qw.abs().max() <= 7 and qa.min() >= 0 and qa.max() <= 15
    integer = ((qa - z_a.double()) @ qw.T) * (s_a.double() * s_w.double().T) + linear.bias.detach().double()
    torch.testing.assert_close(layer(x).double(), integer, rtol=1e-5, atol=1e-5)
    codes = layer.codes()
    assert codes.codes.dtype == torch.uint8 and codes.codes.numel() == 20 * 7 // 2  # two 4-bit codes per byte
    low = (codes.codes & 0x0F).to(torch.int16) - 8
    assert low.tolist() == qw.flatten()[0::2].to(torch.int16).tolist()


def test_integer_state_is_about_a_quarter_or_an_eighth_of_float32():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10))
    floats = sum(t.numel() * 4 for t in model.state_dict().values())
    for bits, ratio in ((8, 4), (4, 8)):
        quantized = fake_quantize_linear_layers(nn.Sequential(*[m for m in model]), bits, bits)
        calibrate(quantized, [torch.randn(8, 256)])
        size = sum(t.numel() * t.element_size() for t in integer_state(quantized).values())
        assert floats / size == pytest.approx(ratio, rel=0.06)


# -- number formats (Figure B-1) -----------------------------------------------------------------------------------
def test_formats_table_reads_torch_finfo():
    rows = {r["format"]: r for r in nf.formats_table()}
    assert rows["fp16"]["max"] == 65504 and rows["fp8 E4M3"]["max"] == 448 and rows["fp8 E5M2"]["max"] == 57344
    assert rows["bf16"]["smallest_normal"] == rows["fp32"]["smallest_normal"] == torch.finfo(torch.float32).tiny
    for fmt in nf.FORMATS:
        assert rows[fmt.name]["epsilon"] == 2.0**-fmt.mantissa_bits  # the gap after 1: one mantissa step
        assert fmt.bits == torch.finfo(fmt.dtype).bits


@pytest.mark.parametrize("fmt", nf.FORMATS, ids=lambda f: f.name)
def test_the_books_value_equation_bit_by_bit(fmt):
    """Every 8-bit pattern (fp8), and a spread of values for the wider formats, decode by the equation to the value
    torch stores, normal and subnormal alike."""
    if fmt.bits == 8:
        patterns = torch.arange(256, dtype=torch.uint8)
        values = patterns.view(fmt.dtype).float()
        for bits, value in zip(patterns.tolist(), values.tolist(), strict=True):
            if value == value and abs(value) != float("inf"):  # not NaN or inf
                assert nf.decode(bits, fmt) == value
        return
    info = torch.finfo(fmt.dtype)
    samples = [1.0, -2.5, 0.1, 3.14159, 1e-3, 65504.0, info.tiny, info.tiny / 4, info.max, -info.eps, 42.0]
    for v in samples:
        stored = torch.tensor([v], dtype=torch.float64).to(fmt.dtype).double().item()
        assert nf.decode(nf.bit_pattern(v, fmt), fmt) == stored


def test_the_books_ternary_packing():
    assert nf.pack_ternary([1, -1, 0, 1, 0]) == bytes([178])
    assert nf.unpack_ternary(bytes([178]), 5) == [1, -1, 0, 1, 0]
    values = [(-1, 0, 1)[i * 7 % 3] for i in range(23)]
    packed = nf.pack_ternary(values)
    assert len(packed) == 5 and nf.unpack_ternary(packed, 23) == values
    assert max(nf.pack_ternary([1] * 5)) == 242  # 3^5 - 1: five ternary values fill a byte
    with pytest.raises(ValueError):
        nf.pack_ternary([2])


# -- the recipe ---------------------------------------------------------------------------------------------------
def test_quantization_recipe_smoke_run(tmp_path):
    """The whole table on a sliver of Fashion-MNIST: every variant classifies like the float model it came from
    (8-bit within half a point, 4-bit within two), the sizes shrink by the bits, and the float model reloads."""
    import json

    import torchbook
    from torchbook.config import build_config
    from torchbook.recipes import quantization as recipe

    run = recipe.run(build_config(recipe.Config, preset="smoke"), tmp_path / "run")
    results = json.loads((run.path / "results.json").read_text())
    rows = {r["variant"]: r for r in results["variants"]}
    base = rows["float32"]["test_accuracy"]
    assert base > 0.3 and results["test_images"] == 10_000
    for name, row in rows.items():
        tolerance = 0.005 if "8" in name else 0.02 if "PTQ" in name or "weight-only" in name else 1.0
        assert abs(row["test_accuracy"] - base) <= tolerance, name
    assert rows["PTQ static 8-bit (ours, W8A8)"]["size_ratio"] == pytest.approx(3.9, abs=0.2)
    assert rows["PTQ static 4-bit (ours, W4A4)"]["size_ratio"] == pytest.approx(7.6, abs=0.4)
    assert rows["weight-only int4 (Int4Linear)"]["bytes"] < rows["weight-only int8 (Int8Linear)"]["bytes"]
    report = (run.path / "report.md").read_text()
    assert "| fp8 E4M3 | 8 (1, 4, 3) | 448 |" in report and "QAT 4-bit (ours, W4A4)" in report
    assert torchbook.load(run.path).recipe == "quantization"
    assert recipe.evaluate(run.path)["test_accuracy"] == base


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_quantization_book_preset_qat_recovers_what_static_4bit_loses(tmp_path):
    """The book's settings (20 epochs, 2 of QAT; about 2.5 minutes): the float model reaches the book's chapter-10
    level, 8-bit quantization costs nothing, static W4A4 loses over half a point and QAT wins it back to within a
    point of the float model trained for the same extra epochs."""
    import json

    from torchbook.config import build_config
    from torchbook.recipes import quantization as recipe

    run = recipe.run(build_config(recipe.Config, preset="book", overrides=["progress=false"]), tmp_path / "run")
    results = json.loads((run.path / "results.json").read_text())
    rows = {r["variant"]: r for r in results["variants"]}
    assert results["float32_val_accuracy"] > 0.87  # the book: about 0.872
    for name in ("PTQ dynamic 8-bit (torchao)", "PTQ static 8-bit (torchao)", "PTQ static 8-bit (ours, W8A8)"):
        assert abs(rows[name]["test_accuracy"] - rows["float32"]["test_accuracy"]) < 0.003, name
    assert results["static4_accuracy_loss"] > 0.005
    assert results["qat4_gain_over_static4"] > 0.005
    assert results["qat4_vs_float32_control"] > -0.01
