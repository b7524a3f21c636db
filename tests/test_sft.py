"""Supervised fine-tuning (chapter 15): the instruction data, assistant-only labels found prefix by prefix, the SFT
loss, and packing with per-document masks (chapter 17)."""

from __future__ import annotations

import urllib.error
import urllib.request

import pytest
import torch

from torchbook.data import instructions
from torchbook.errors import DataUnavailable, UserInputError
from torchbook.hub.gguf import default_chat_model
from torchbook.hub.loading import Loaded, load_gguf_tokenizer
from torchbook.models.gpt import GPT, GPTConfig
from torchbook.train.sft import IGNORE, SFTData, encode_conversation, labels_for, pack_collate, pad_collate
from torchbook.train.steps import sft_step

CONVERSATION = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy?"},
    {"role": "assistant", "content": "Rome, since 1871."},
]


@pytest.fixture(scope="module")
def smol() -> Loaded:
    """SmolLM2-135M-Instruct's tokenizer and chat template (its weights are not needed here)."""
    return load_gguf_tokenizer(default_chat_model())


def tiny_llama(vocab_size: int, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=vocab_size, n_layer=2, n_head=4, n_kv_head=2, d_model=32, d_ff=64, max_len=256,
                         norm="rmsnorm", mlp="swiglu", positions="rope", qkv_bias=False, out_bias=False,
                         mlp_bias=False, tie_embeddings=True)).eval()


# -- data -----------------------------------------------------------------------------------------------------
def test_self_instruct_and_held_out_instructions() -> None:
    seed = instructions.load_seed_tasks()
    held_out = instructions.load_user_oriented()
    assert len(held_out) == 252 and len(seed) >= 175
    assert all(c[0]["role"] == "user" and c[-1]["role"] == "assistant" and c[-1]["content"] for c in seed + held_out)
    assert not {c[0]["content"] for c in seed} & {c[0]["content"] for c in held_out}  # held out means held out


def test_hh_split_is_one_stable_function_of_the_dialogue() -> None:
    train, test = instructions.load_hh("train"), instructions.load_hh("test")
    assert len(train) + len(test) == 2312 and 150 < len(test) < 320  # ~10%
    # A function of the shared dialogue only: the same dialogue never lands on both sides, whatever the order.
    assert not {instructions.hh_prompt(r) for r in train} & {instructions.hh_prompt(r) for r in test}
    assert [instructions.hh_split(r) for r in reversed(test)] == ["test"] * len(test)
    assert all(r["chosen"].startswith(instructions.hh_prompt(r)) and r["rejected"].startswith(instructions.hh_prompt(r))
               for r in train + test)
    messages = instructions.parse_hh(train[0]["chosen"])
    assert [m["role"] for m in messages[:2]] == ["user", "assistant"] and messages[-1]["role"] == "assistant"


def test_alpaca_offline_says_what_to_use(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("TORCHBOOK_MIRROR", str(tmp_path))

    def offline(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(DataUnavailable, match="alpaca_data.json.*data=self-instruct"):
        instructions.load_alpaca()


def test_book_format() -> None:
    messages = instructions.instruction_messages("Translate to French.", "Good morning", "Bonjour")
    assert instructions.book_text(messages) == "Human: Translate to French.\n-> Good morning\n\nAssistant: Bonjour"


# -- assistant-only labels ------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["template", "book"])
def test_labels_cover_exactly_the_assistant_turns(smol, fmt: str) -> None:  # type: ignore[no-untyped-def]
    ids, mine = encode_conversation(smol.tokenizer, CONVERSATION, smol.meta, fmt)
    pieces, current = [], []
    for token, is_mine in zip(ids, mine):
        if is_mine:
            current.append(token)
        elif current:
            pieces.append(current)
            current = []
    pieces.append(current) if current else None
    texts = [smol.tokenizer.decode(p, skip_special_tokens=False) for p in pieces]
    if fmt == "template":  # each answer with the end-of-turn token the model must learn to emit
        assert texts == ["Paris.<|im_end|>\n", "Rome, since 1871.<|im_end|>\n"]
    else:
        assert [t.strip() for t in texts] == ["Paris.", "Rome, since 1871." + smol.meta["eos_token"]]


def test_changing_a_user_token_never_changes_the_loss(smol) -> None:  # type: ignore[no-untyped-def]
    """The loss counts the assistant's tokens only: the user's (and system's) tokens, as targets, weigh nothing.
    Changing any of them in the targets leaves the loss bit for bit; changing an assistant token changes it; and
    the gradient of the loss with respect to the logits at non-assistant targets is exactly zero."""
    data = SFTData([CONVERSATION], smol.tokenizer, smol.meta)
    inputs, labels = pad_collate(0)([data[0]])
    ids, mine = encode_conversation(smol.tokenizer, CONVERSATION, smol.meta)
    model = tiny_llama(smol.tokenizer.get_vocab_size())
    base = sft_step(model, (inputs, labels)).loss
    for t in range(len(ids) - 1):
        changed = list(ids)
        changed[t + 1] = (changed[t + 1] + 7) % smol.tokenizer.get_vocab_size()
        new_labels = torch.tensor([labels_for(changed, mine)])
        loss = sft_step(model, (inputs, new_labels)).loss
        assert (loss == base) if not mine[t + 1] else (loss != base), t
    logits = model(inputs).detach().requires_grad_(True)
    counted = labels != IGNORE
    torch.nn.functional.cross_entropy(logits[counted], labels[counted]).backward()
    assert logits.grad is not None and (logits.grad[~counted] == 0).all() and (logits.grad[counted] != 0).any()


# -- packing --------------------------------------------------------------------------------------------------
def test_packed_logits_equal_each_example_alone(smol) -> None:  # type: ignore[no-untyped-def]
    conversations = instructions.load_seed_tasks()[:6]
    data = SFTData(conversations, smol.tokenizer, smol.meta, max_length=120)
    examples = [data[i] for i in range(len(data))]
    inputs, labels, documents = pack_collate(0, 256)(examples)
    assert inputs.size(0) < len(examples)  # several examples per row
    model = tiny_llama(smol.tokenizer.get_vocab_size())
    with torch.no_grad():
        packed = model(inputs, documents=documents)
        places = [(r, d) for r in range(inputs.size(0)) for d in documents[r].unique().tolist() if d]
        assert len(places) == len(examples)
        for e in examples:
            r, d = next((r, d) for r, d in places if inputs[r, documents[r] == d].tolist() == e.ids)
            alone = model(torch.tensor([e.ids]))[0]
            torch.testing.assert_close(packed[r, documents[r] == d], alone, atol=1e-5, rtol=1e-5)
    # the SFT loss of the packed batch equals the padded batch's (the same tokens counted)
    padded = pad_collate(0)(examples)
    torch.testing.assert_close(sft_step(model, (inputs, labels, documents)).loss, sft_step(model, padded).loss,
                               atol=1e-5, rtol=1e-5)


def test_chat_jsonl_and_data_names(tmp_path) -> None:  # type: ignore[no-untyped-def]
    good = tmp_path / "chats.jsonl"
    good.write_text('{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}\n')
    conversations, source = instructions.load_conversations(str(good))
    assert conversations == [[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "Hi"}]}\n')
    with pytest.raises(UserInputError, match="line 1 does not end with an assistant message"):
        instructions.load_chat_jsonl(bad)
    with pytest.raises(UserInputError, match="accepted: self-instruct, hh, alpaca"):
        instructions.load_conversations("imdb")
    hh, _ = instructions.load_conversations("hh")  # SFT: the chosen side of the train part
    assert len(hh) == len(instructions.load_hh("train")) and all(c[-1]["role"] == "assistant" for c in hh)


def test_chunked_loss_equals_the_loss_over_full_logits() -> None:
    """The SFT step applies the output layer a chunk of counted positions at a time (memory); its loss and
    gradients equal those of the full logits."""
    from torchbook.models.gpt import GPT, GPTConfig
    from torchbook.train.steps import chunked_cross_entropy

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, n_layer=1, n_head=2, d_model=16, d_ff=32, max_len=32))
    inputs = torch.randint(0, 50, (2, 12))
    labels = torch.randint(0, 50, (2, 12))
    labels[:, :4] = IGNORE
    counted = labels != IGNORE
    reference = torch.nn.functional.cross_entropy(model(inputs)[counted], labels[counted])
    reference.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    hidden = model(inputs, hidden_only=True)
    loss = chunked_cross_entropy(model.lm_head, hidden[counted], labels[counted], chunk=5)
    loss.backward()
    torch.testing.assert_close(loss, reference, atol=1e-6, rtol=1e-6)
    for name, grad in expected.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, atol=1e-6, rtol=1e-5)
    model.zero_grad()
    torch.testing.assert_close(sft_step(model, (inputs, labels)).loss, reference, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("case", ["frozen head with bias", "not a plain Linear (recomputed)", "float64", "wide logits"])
def test_chunked_loss_paths_equal_full_logits(case: str) -> None:
    """`chunked_cross_entropy`'s paths against F.cross_entropy over the full logits, loss and gradients 1e-6: the
    fused one (gradients computed chunk by chunk in the forward pass) with a frozen head that has a bias (LoRA:
    only the hidden states get a gradient), the recomputed one for any other head, float64, and logits spread
    wide enough that most probabilities fall below float32's normal range (flushed to 0 by the fused path); chunks
    that do not divide the rows; no gradient kept under no_grad."""
    from torchbook.train.steps import chunked_cross_entropy

    torch.manual_seed(0)
    dtype = torch.float64 if case == "float64" else torch.float32
    head: torch.nn.Module = torch.nn.Linear(16, 50, bias=case != "float64", dtype=dtype)
    if case == "frozen head with bias":
        head.weight.requires_grad_(False)
    if case == "not a plain Linear (recomputed)":
        head = torch.nn.Sequential(head)
    hidden = ((40 if case == "wide logits" else 3) * torch.randn(23, 16, dtype=dtype)).requires_grad_()
    targets = torch.randint(0, 50, (23,))
    reference = torch.nn.functional.cross_entropy(head(hidden).float(), targets)
    params = [hidden] + [p for p in head.parameters() if p.requires_grad]
    expected = torch.autograd.grad(reference, params)
    loss = chunked_cross_entropy(head, hidden, targets, chunk=5)
    torch.testing.assert_close(loss, reference, atol=1e-6, rtol=1e-6)
    for got, want in zip(torch.autograd.grad(loss, params), expected):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(chunked_cross_entropy(head, hidden, targets, chunk=7), reference.detach())
