"""Decoder-only models: logits equal Hugging Face's on tiny random GPT-2, Llama, Qwen2, Mistral and Mixtral models;
decoding with and without the KV cache, left padding, and the mixture-of-experts loss."""

from __future__ import annotations

import pytest
import torch
import transformers as T

from torchbook.generate.engine import decode, generate_tokens
from torchbook.generate.sampling import Sampler, SamplingConfig, process_logits
from torchbook.hub.hf import config_from_hf, from_hf_model
from torchbook.models.gpt import GPT, GPTConfig

KW = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
          num_key_value_heads=2, max_position_embeddings=128)
FAMILIES = {
    "gpt2": lambda: T.GPT2LMHeadModel(T.GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=128,
                                                   bos_token_id=0, eos_token_id=0)),
    "llama": lambda: T.LlamaForCausalLM(T.LlamaConfig(**KW)),
    "qwen2": lambda: T.Qwen2ForCausalLM(T.Qwen2Config(**KW)),
    "mistral": lambda: T.MistralForCausalLM(T.MistralConfig(**KW, sliding_window=5)),
    "mixtral": lambda: T.MixtralForCausalLM(T.MixtralConfig(**KW, num_local_experts=4, num_experts_per_tok=2)),
}


@pytest.fixture(scope="module", params=list(FAMILIES))
def pair(request):
    torch.manual_seed(0)
    hf = FAMILIES[request.param]().eval()
    return request.param, hf, from_hf_model(hf)


def test_logits_equal_transformers(pair):
    name, hf, ours = pair
    tokens = torch.randint(0, 96, (2, 20))  # longer than Mistral's window of 5
    with torch.no_grad():
        diff = (hf(tokens).logits - ours(tokens)).abs().max().item()
    assert diff < 1e-4, f"{name}: {diff}"


def test_mistral_window_really_masks():
    torch.manual_seed(0)
    ours = from_hf_model(FAMILIES["mistral"]())
    unwindowed = GPT(GPTConfig(**{**ours.config.__dict__, "sliding_window": None}))
    unwindowed.load_state_dict(ours.state_dict())
    tokens = torch.randint(0, 96, (1, 20))
    with torch.no_grad():
        assert (ours(tokens)[:, -1] - unwindowed.eval()(tokens)[:, -1]).abs().max() > 1e-3


def test_greedy_generation_with_and_without_cache_and_as_transformers(pair):
    name, hf, ours = pair
    prompt = torch.randint(1, 96, (1, 7))
    cached = generate_tokens(ours, prompt, 12)
    assert torch.equal(cached, generate_tokens(ours, prompt, 12, use_cache=False))
    theirs = hf.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0,
                         attention_mask=torch.ones_like(prompt))
    assert cached[0].tolist() == theirs[0, 7:].tolist(), name


def test_left_padded_batch_equals_one_by_one():
    torch.manual_seed(0)
    ours = from_hf_model(FAMILIES["llama"]())
    short, long = torch.randint(1, 96, (1, 4)), torch.randint(1, 96, (1, 9))
    batch = torch.cat([torch.cat([torch.zeros(1, 5, dtype=torch.long), short], 1), long])
    mask = torch.cat([torch.cat([torch.zeros(1, 5), torch.ones(1, 4)], 1), torch.ones(1, 9)]).long()
    together = generate_tokens(ours, batch, 8, attention_mask=mask)
    assert together[0].tolist() == generate_tokens(ours, short, 8)[0].tolist()
    assert together[1].tolist() == generate_tokens(ours, long, 8)[0].tolist()


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("penalty", [1.0, 1.8])
def test_a_left_padded_row_decodes_as_its_prompt_alone_with_and_without_cache_and_penalty(use_cache, penalty):
    """The padding of a left-padded row is neither attended to (also when the cache is off and every step reads
    the whole sequence again) nor counted by the repetition penalty. The padding id is the token the row picks
    first when alone, so a penalty that counted padding would change the row's first choice."""
    torch.manual_seed(0)
    ours = from_hf_model(FAMILIES["llama"]())
    short, long = torch.randint(1, 96, (1, 4)), torch.randint(1, 96, (1, 9))
    config = SamplingConfig(temperature=0.0, repetition_penalty=penalty)

    def run(tokens, mask=None):
        state = ours.start_decoding(tokens.size(0), attention_mask=mask)
        sampler = Sampler(config, prompt_mask=mask)
        return decode(ours, state, tokens, 8, choose=sampler, use_cache=use_cache).tokens

    alone = run(short)
    pad = int(alone[0, 0])
    assert pad not in short[0].tolist()  # so only padding could put it in the penalised set
    batch = torch.cat([torch.cat([torch.full((1, 5), pad), short], 1), long])
    mask = torch.cat([torch.cat([torch.zeros(1, 5), torch.ones(1, 4)], 1), torch.ones(1, 9)]).long()
    together = run(batch, mask)
    assert together[0].tolist() == alone[0].tolist()
    assert together[1].tolist() == run(long)[0].tolist()
    # The processed logits themselves: the padded row's equal the lone row's.
    logits = torch.randn(2, 96)
    sampler = Sampler(config, prompt_mask=mask)
    padded = process_logits(logits, batch, config, sampler.real_tokens(batch))
    assert torch.equal(padded[0], process_logits(logits[:1], short, config)[0])


def test_mixture_of_experts_routing_and_load_balancing_loss():
    """Output = sum over the top-2 experts of renormalized router weight x SwiGLU expert; loss = E sum_e f_e P_e."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, n_layer=1, n_head=2, d_model=16, d_ff=24, norm="rmsnorm", mlp="swiglu",
                          positions="rope", n_experts=4, experts_per_token=2, tie_embeddings=False)).eval()
    moe = model.blocks[0].mlp
    captured = {}
    moe.register_forward_hook(lambda module, inputs, output: captured.update(x=inputs[0], out=output))
    with torch.no_grad():
        model(torch.randint(0, 50, (3, 10)))
        x = captured["x"].reshape(-1, 16)
        probs = moe.router(x).softmax(-1)
        weights, chosen = probs.topk(2, dim=-1)
        weights = weights / weights.sum(-1, keepdim=True)
        expected = torch.zeros_like(x)
        for n in range(len(x)):
            for slot in range(2):
                e = chosen[n, slot]
                gate, up = (moe.gate_up[e] @ x[n]).chunk(2)
                expected[n] += weights[n, slot] * (moe.down[e] @ (torch.nn.functional.silu(gate) * up))
        torch.testing.assert_close(captured["out"].reshape(-1, 16), expected, atol=1e-6, rtol=1e-5)
        fraction = torch.nn.functional.one_hot(chosen, 4).sum(1).float().mean(0) / 2
        torch.testing.assert_close(model.aux_loss(), 4 * (fraction * probs.mean(0)).sum())


def test_unsupported_architecture_is_named():
    with pytest.raises(ValueError, match="unsupported architecture 'bert'; supported: gpt2, llama"):
        config_from_hf(T.BertConfig())


@pytest.mark.parametrize("family", ["gpt2", "llama", "mixtral"])
def test_hugging_face_folders_in_and_out(family, tmp_path):
    """A transformers folder loads through torchbook.load; ours saved as a folder loads in transformers; same logits."""
    import torchbook
    from torchbook.hub.hf import save_hf

    torch.manual_seed(0)
    hf = FAMILIES[family]().eval()
    hf.save_pretrained(tmp_path / "theirs")
    ours = torchbook.load(tmp_path / "theirs").model
    tokens = torch.randint(0, 96, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), hf(tokens).logits, atol=1e-4, rtol=0)
    save_hf(ours, tmp_path / "ours")
    back = T.AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(tokens).logits, hf(tokens).logits, atol=1e-4, rtol=0)
    # no special token was given: none is written (transformers' own defaults, GPT-2's 50256 or Llama's 1 and 2, are
    # ids of other vocabularies: 50256 is past the end of this one's 96)
    assert back.config.eos_token_id is None and back.config.bos_token_id is None
    save_hf(ours, tmp_path / "with_ids", bos_token_id=3, eos_token_id=5)
    config = T.AutoConfig.from_pretrained(tmp_path / "with_ids")
    assert (config.bos_token_id, config.eos_token_id) == (3, 5)


def test_corrupt_hugging_face_folder_is_a_clear_error(tmp_path):
    import torchbook
    from torchbook.errors import CheckpointError

    torch.manual_seed(0)
    FAMILIES["llama"]().save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="holds no"):
        torchbook.load(tmp_path / "m")
