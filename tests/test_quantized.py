"""Weight-only quantized layers (torchbook.nn.quantized): quantizers equal llama.cpp's (the `gguf` package's
reference code), the packed kernels compute what the codes stand for, fused projections change nothing, and
SmolLM2's real 4-bit model stays close to its float32 self on real text."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchbook
from torchbook.errors import CheckpointError
from torchbook.generate.engine import generate_tokens
from torchbook.nn.quantized import (
    KERNEL_MAX_ROWS,
    Int4Linear,
    Int8Linear,
    concat_linear,
    drop_dense_copies,
    keep_dense_copies,
    quantize_linear_layers,
)


def linear(out_features: int, in_features: int, bias: bool = False, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    layer = nn.Linear(in_features, out_features, bias=bias)
    layer.weight.data.normal_(0, 0.05)
    return layer


@pytest.mark.parametrize("kind", ["Q4_1", "Q8_0"])
def test_quantizers_equal_llama_cpp(kind):
    """Our round-to-nearest quantizers give the codes and scales of ggml's reference quantizers (the `gguf`
    package): the dequantized weights are bit-identical."""
    import gguf

    layer = linear(48, 128)
    qtype = gguf.GGMLQuantizationType[kind]
    reference = gguf.quants.dequantize(gguf.quants.quantize(layer.weight.detach().numpy(), qtype), qtype)
    ours = (Int4Linear if kind == "Q4_1" else Int8Linear).from_linear(layer).dequantize()
    assert np.array_equal(ours.numpy(), reference.astype(np.float32))


def test_gguf_blocks_load_exactly():
    """SmolLM2's own Q4_1 and Q8_0 tensors as layers: the codes stand for exactly the weights the float32 loader
    dequantizes."""
    import gguf

    from torchbook.hub.gguf import blocks_to_float, default_chat_model, unpack_blocks

    reader = gguf.GGUFReader(str(default_chat_model()))
    tensors = {t.name: t for t in reader.tensors}
    for name, layer_class in (("blk.0.ffn_down.weight", Int4Linear), ("token_embd.weight", Int8Linear)):
        tensor = tensors[name]
        codes, scales, minimums = unpack_blocks(tensor.data, tensor.tensor_type.name)
        args = (codes, scales) if minimums is None else (codes, scales, minimums)
        layer = layer_class.from_codes(*args)  # type: ignore[attr-defined]
        assert torch.equal(layer.dequantize(), blocks_to_float(codes, scales, minimums))


@pytest.mark.parametrize("rows", [1, 3, 200])  # 200 rows: the unpack-to-bfloat16 path
@pytest.mark.parametrize("layer_class", [Int4Linear, Int8Linear])
def test_forward_computes_what_the_codes_stand_for(layer_class, rows):
    layer = layer_class.from_linear(linear(96, 64, bias=True))
    x = torch.randn(rows, 64)
    expected = F.linear(x, layer.dequantize(), layer.bias)
    y = layer(x)
    assert y.dtype == torch.float32 and y.shape == (rows, 96)
    # bfloat16 products: relative error about 2^-8 of the terms' magnitude
    assert (y - expected).abs().max() < 0.01 * expected.abs().max()


@pytest.mark.parametrize("layer_class", [Int4Linear, Int8Linear])
def test_a_row_gets_the_same_output_alone_or_in_a_batch_up_to_the_kernels_rows(layer_class):
    """The packed kernel computes each row on its own: a row's output is bit-identical alone or among up to
    `KERNEL_MAX_ROWS` others (what makes a quantized model's request the same alone or beside others in the
    serving engine, as long as a step stays on the kernel; above that the unpacked bfloat16 product rounds
    differently, docs/language_models.md)."""
    layer = layer_class.from_linear(linear(96, 64))
    batch = torch.randn(KERNEL_MAX_ROWS, 64)
    together = layer(batch)
    alone = torch.cat([layer(row[None]) for row in batch])
    assert torch.equal(alone, together)
    assert torch.equal(layer(batch[:5]), together[:5])


@pytest.mark.parametrize("layer_class", [Int4Linear, Int8Linear])
def test_dense_copy_serves_products_of_many_rows(layer_class):
    """`keep_dense_copies`: from `from_rows` rows on, the product uses the weights rounded once to bfloat16 (kept,
    2 bytes a weight); fewer rows stay on the kernel, bit for bit; moving the layer or `drop_dense_copies` drops
    the copy."""
    model = nn.Sequential(layer_class.from_linear(linear(96, 64, bias=True)))
    layer = model[0]
    x = torch.randn(20, 64)
    before = layer(x[:3])
    assert keep_dense_copies(model, from_rows=8) == 96 * 64 * 2
    copy = layer.dense_copy()
    assert copy.dtype == torch.bfloat16 and torch.equal(copy, layer.dequantize(torch.float32).to(torch.bfloat16))
    assert torch.equal(layer(x[:3]), before)  # 3 rows: the kernel
    y = layer(x)
    assert torch.equal(y, (F.linear(x.bfloat16(), copy) + layer.bias.bfloat16()).float())
    expected = F.linear(x, layer.dequantize(), layer.bias)
    assert (y - expected).abs().max() < 0.01 * expected.abs().max()
    layer.float()
    assert layer._dense is None and torch.equal(layer(x), y)  # rebuilt on use
    drop_dense_copies(model)
    assert layer._dense is None and layer.dense_from_rows is None and torch.equal(layer(x[:3]), before)
    with pytest.raises(ValueError, match="from_rows"):
        keep_dense_copies(model, from_rows=0)


def test_int4_kernel_layout_is_exact_in_float32():
    """Run the packed 4-bit kernel with float32 activations and scales: then it must equal the dequantized
    weights' product to float32 rounding, which checks the packing, the group layout and zero = min + 8 scale."""
    layer = Int4Linear.from_linear(linear(64, 128))
    packed, _ = layer.kernel_weights()
    x = torch.randn(2, 128)
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, layer.group_size, layer.kernel_scales(torch.float32))
    assert (y - x @ layer.dequantize(torch.float32).t()).abs().max() < 1e-4


def test_int8_is_exactly_two_int4_planes():
    """q = 16 hi + lo: the two 4-bit planes (in float32) add up to the 8-bit weights exactly."""
    layer = Int8Linear.from_linear(linear(32, 64))
    planes = layer.kernel_planes().dequantize()
    assert torch.equal(planes[:, :64] + planes[:, 64:], layer.dequantize())


@pytest.mark.parametrize("kind", ["float", "int8", "int4"])
def test_concat_linear_equals_the_separate_layers(kind):
    layers: list[nn.Module] = [linear(n, 64, bias=True, seed=n) for n in (32, 64, 96)]
    if kind != "float":
        layers = [(Int4Linear if kind == "int4" else Int8Linear).from_linear(layer) for layer in layers]  # type: ignore[arg-type]
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        assert torch.allclose(concat_linear(layers)(x), torch.cat([layer(x) for layer in layers], -1), atol=1e-5)
    with pytest.raises(ValueError, match="one kind"):
        concat_linear([linear(8, 64), Int8Linear.from_linear(linear(8, 64))])


@pytest.mark.parametrize("family", ["gpt2", "qwen2"])
def test_fused_projections_give_the_same_logits(family):
    """Fused query/key/value (rotated together) and gate/up projections: same logits, same cached decoding."""
    import transformers as T

    from torchbook.hub.hf import from_hf_model, save_hf

    torch.manual_seed(0)
    kw = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128)
    hf = (T.GPT2LMHeadModel(T.GPT2Config(vocab_size=96, n_embd=64, n_layer=2, n_head=4, n_positions=128))
          if family == "gpt2" else T.Qwen2ForCausalLM(T.Qwen2Config(**kw)))
    model, fused = from_hf_model(hf.eval()), from_hf_model(hf)
    fused.fuse_projections()
    assert fused.blocks[0].attn.qkv_proj is not None and not hasattr(fused.blocks[0].attn, "q_proj")
    tokens = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        assert (model(tokens) - fused(tokens)).abs().max() < 1e-5
    assert torch.equal(generate_tokens(model, tokens[:1, :5], 10), generate_tokens(fused, tokens[:1, :5], 10))
    with pytest.raises(ValueError, match="for inference only"):
        save_hf(fused, "unused")


def test_quantize_linear_layers_keeps_the_output_layer_at_8_bits():
    model = nn.Sequential(linear(64, 64), nn.ReLU(), linear(50, 64), linear(8, 50))
    quantize_linear_layers(model, 4, keep_8bit=("2",))
    assert isinstance(model[0], Int4Linear) and isinstance(model[2], Int8Linear)
    assert isinstance(model[3], nn.Linear)  # 50 inputs: no whole groups of 32, left as it is
    with pytest.raises(ValueError, match="bits must be 4 or 8"):
        quantize_linear_layers(model, 3)


def test_unknown_quantization_is_a_clear_error():
    from torchbook.hub.gguf import default_chat_model

    with pytest.raises(CheckpointError, match="unknown quantization 'int3'; accepted: int8, int4"):
        torchbook.load(default_chat_model(), quantize="int3")


@pytest.fixture(scope="module")
def smollm2_pair():
    from torchbook.hub.gguf import default_chat_model

    path = default_chat_model()
    return torchbook.load(path), torchbook.load(path, quantize="int4")


def test_smollm2_int4_stays_close_to_float32_on_real_text(smollm2_pair):
    """The file's own 4- and 8-bit codes with bfloat16 products against the dequantized float32 model, on the
    book's tiny Shakespeare (the mirror) and on a chat prompt. Measured: mean loss within 0.1%, the same most
    probable next token at 97% of positions, the same greedy answer."""
    from torchbook.data.sources import load_shakespeare

    full, quantized = smollm2_pair
    assert quantized.meta["quantized"] == "int4"
    assert isinstance(quantized.model.blocks[0].mlp.down, Int4Linear)
    assert isinstance(quantized.model.lm_head, Int8Linear)  # the tied Q8_0 embedding's codes
    text = load_shakespeare()[:6000]
    tokens = torch.tensor([full.tokenizer.encode(text).ids[:512]])
    with torch.no_grad():
        a, b = full.model(tokens), quantized.model(tokens)
    loss = lambda logits: F.cross_entropy(logits[0, :-1], tokens[0, 1:]).item()  # noqa: E731
    assert abs(loss(b) - loss(a)) < 0.01 * loss(a)
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.93
    chat = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    prompt = torch.tensor([full.tokenizer.encode(chat).ids])
    assert torch.equal(generate_tokens(full.model, prompt, 16), generate_tokens(quantized.model, prompt, 16))


def test_smollm2_int4_engine_with_the_dense_copy_answers_like_float32(smollm2_pair):
    """The serving engine with `dense_copy`: SmolLM2's 4-bit model keeps 2 bytes a weight more, prefills through
    the copy (a 20-token chat prompt) and decodes 4 requests side by side; the France question gets float32's greedy
    answer in the batch."""
    from torchbook.generate.serving import Engine, Request
    from torchbook.nn.quantized import DENSE_COPY_ROWS

    full, quantized = smollm2_pair
    chats = ["What is the capital of France?", "Name a colour.", "What is 2 + 2?", "Say hello."]
    prompts = [full.tokenizer.encode(f"<|im_start|>user\n{c}<|im_end|>\n<|im_start|>assistant\n").ids for c in chats]
    assert min(len(p) for p in prompts) >= DENSE_COPY_ROWS
    layers = {name: m for name, m in quantized.model.named_modules() if isinstance(m, (Int4Linear, Int8Linear))}
    own = [m for name, m in layers.items() if "_cache" not in name]  # not an Int8Linear's kernel planes
    try:
        engine = Engine(quantized.model, slots=4, max_len=128, dense_copy=True)
        assert all(m._dense is not None for m in own)
        assert sum(m._dense.nbytes for m in own) == 2 * sum(m.in_features * m.out_features for m in own)
        assert all(m._dense is None for name, m in layers.items() if "_cache" in name)
        handles = [engine.submit(Request(p, 12, end_ids=[])) for p in prompts]
        engine.run()
        batched = [h.result().choices[0].tokens for h in handles]
    finally:
        drop_dense_copies(quantized.model)
    expected = generate_tokens(full.model, torch.tensor([prompts[0]]), 12)[0].tolist()
    assert batched[0] == expected
    assert "Paris" in full.tokenizer.decode(batched[0])


def test_the_server_keeps_the_dense_copy_unless_told_not_to(smollm2_pair):
    """`torchbook serve --quantize int4` gives its engine the copy (`ServeSettings.dense_copy`, on by default);
    `--no-dense-copy` keeps the codes only."""
    from torchbook.serve.metrics import Metrics
    from torchbook.serve.models import LanguageModel, ServeSettings

    _, quantized = smollm2_pair
    layers = [quantized.model.lm_head, quantized.model.blocks[0].mlp.down]
    try:
        for dense_copy in (False, True):
            settings = ServeSettings(slots=2, max_len=64, dense_copy=dense_copy)
            LanguageModel(quantized.model, quantized.tokenizer, quantized.meta, "m", Metrics(), settings)
            assert all((layer._dense is not None) == dense_copy for layer in layers)
    finally:
        drop_dense_copies(quantized.model)


def test_generate_cli_quantized(capsys):
    from torchbook.cli import main

    code = main(["generate", "--chat", "What is the capital of France?", "--quantize", "int4", "--max-new-tokens",
                 "12", "--no-stream"])
    assert code == 0 and "Paris" in capsys.readouterr().out


def test_output_layer_top_candidates_are_exact():
    """`exact_top`: each row's largest outputs equal the float32 product with the exact 8-bit weights (no bfloat16
    rounding), the rest are the kernel's."""
    layer = Int8Linear.from_linear(linear(500, 64, seed=3))
    x = torch.randn(3, 64) * 4
    exact = F.linear(x, layer.dequantize())
    rounded = layer(x)
    layer.exact_top = 10
    refined = layer(x)
    top = exact.topk(10, dim=-1).indices
    assert torch.allclose(refined.gather(1, top), exact.gather(1, top), atol=1e-5)
    assert (rounded.gather(1, top) - exact.gather(1, top)).abs().max() > 1e-4  # bfloat16 really rounds them


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0"])
def test_gguf_layers_keep_the_files_codes(tmp_path, qtype):
    """A tiny Llama written as llama.cpp writes it (query/key rows permuted), loaded with quantize="int4": every
    quantized layer stands for exactly the float32 loader's weights (fused query/key/value and gate/up included),
    and the logits stay close."""
    import transformers as T
    from test_hub_gguf import write_llama_gguf

    torch.manual_seed(0)
    hf = T.LlamaForCausalLM(T.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                          tie_word_embeddings=False)).eval()
    from torchbook.hub.gguf import gguf_model

    write_llama_gguf(hf, tmp_path / "tiny.gguf", qtype)  # no tokenizer in the file: the models alone
    full, _ = gguf_model(tmp_path / "tiny.gguf")
    quantized, _ = gguf_model(tmp_path / "tiny.gguf", quantize="int4")
    layer_class = Int8Linear if qtype == "Q8_0" else Int4Linear
    for f, q in zip(full.blocks, quantized.blocks):
        attention = torch.cat([f.attn.q_proj.weight, f.attn.k_proj.weight, f.attn.v_proj.weight])
        pairs = [(attention, q.attn.qkv_proj), (f.attn.out_proj.weight, q.attn.out_proj),
                 (torch.cat([f.mlp.gate.weight, f.mlp.up.weight]), q.mlp.gate_up), (f.mlp.down.weight, q.mlp.down)]
        for weight, layer in pairs:
            assert isinstance(layer, layer_class) and torch.equal(layer.dequantize(), weight.detach())
    assert isinstance(quantized.lm_head, Int8Linear) == (qtype == "Q8_0")  # a Q4 output layer keeps its 4 bits
    assert torch.equal(quantized.lm_head.dequantize(), full.lm_head.weight.detach())
    tokens = torch.randint(0, 64, (1, 12))
    with torch.no_grad():
        assert (full(tokens) - quantized(tokens)).abs().max() < 0.05
