"""Translation speed: our Transformer translator against `torch.nn.Transformer` and Hugging Face's `MarianMTModel`,
in one run, same sizes (the book's: embedding 128, 4 heads, 2+2 layers, feed-forward 512, vocabulary 10,000),
random weights. Prints training tokens/s and beam-search sentences/s of each and the ratios.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/translation.py

Training: the same random batches (source and target lengths 8-30 tokens, right-padded), forward, label-smoothed
cross-entropy over the non-padding target tokens, backward, Adam step; tokens/s counts target tokens. Ours runs the
recipe's training step, which computes logits only at real target tokens (the peers compute them everywhere and
ignore padding in the loss: the same loss).
Beam search: width 3, the same sources, exactly `--new-tokens` new tokens per sentence in all three (end-of-sequence
is suppressed: random weights would otherwise stop at arbitrary lengths), length penalty 1. Ours decodes with the
engine and its KV cache; `nn.Transformer` has no cache, so it recomputes the decoder over the whole prefix every
step (through the same engine with use_cache=False); Marian uses `generate(num_beams=3)` with its own cache.
Each figure is the best of `--repeats` interleaved timings.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torchbook.generate import beam_search
from torchbook.models.transformer import TransformerConfig, TransformerTranslator
from torchbook.nn.positions import SinusoidalPositionalEncoding
from torchbook.train.steps import translation_step

VOCAB, D_MODEL, HEADS, LAYERS, D_FF = 10_000, 128, 4, 2, 512
PAD, BOS, EOS = 0, 1, 2


class TorchTransformer(nn.Module):
    """torch.nn.Transformer with the same embedding, positions and tied head as ours."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(VOCAB, D_MODEL, padding_idx=PAD)
        self.positions = SinusoidalPositionalEncoding(D_MODEL, 512, 0.1)
        self.transformer = nn.Transformer(D_MODEL, HEADS, LAYERS, LAYERS, D_FF, 0.1, batch_first=True)
        self.head = nn.Linear(D_MODEL, VOCAB, bias=False)
        self.head.weight = self.embedding.weight

    def embed(self, tokens: Tensor) -> Tensor:
        return self.positions(self.embedding(tokens) * math.sqrt(D_MODEL))  # type: ignore[no-any-return]

    def forward(self, source: Tensor, target_in: Tensor) -> Tensor:
        padding = source == PAD
        mask = nn.Transformer.generate_square_subsequent_mask(target_in.size(1))
        out = self.transformer(self.embed(source), self.embed(target_in), tgt_mask=mask, tgt_is_causal=True,
                               src_key_padding_mask=padding, memory_key_padding_mask=padding)
        return self.head(out)  # type: ignore[no-any-return]

    # The engine's protocol, without a cache: the decoder runs over the whole prefix each step.
    def start_decoding(self, batch_size: int, source: Tensor) -> NoCacheState:
        padding = source == PAD
        return NoCacheState(self.transformer.encoder(self.embed(source), src_key_padding_mask=padding), padding)

    def decode_step(self, tokens: Tensor, state: NoCacheState) -> Tensor:
        mask = nn.Transformer.generate_square_subsequent_mask(tokens.size(1))
        out = self.transformer.decoder(self.embed(tokens), state.memory, tgt_mask=mask, tgt_is_causal=True,
                                       memory_key_padding_mask=state.padding)
        return self.head(out[:, -1])  # type: ignore[no-any-return]


@dataclass
class NoCacheState:
    memory: Tensor
    padding: Tensor

    def reorder(self, index: Tensor) -> None:
        self.memory, self.padding = self.memory.index_select(0, index), self.padding.index_select(0, index)

    def fresh(self) -> NoCacheState:
        return self


class NoEos(nn.Module):
    """Suppress end-of-sequence so every system generates the same number of tokens."""

    def __init__(self, model: Any):
        super().__init__()
        self.model = model

    def start_decoding(self, batch_size: int, source: Tensor) -> Any:
        return self.model.start_decoding(batch_size, source=source)

    def decode_step(self, tokens: Tensor, state: Any) -> Tensor:
        logits = self.model.decode_step(tokens, state)
        logits[:, EOS] = float("-inf")
        return logits  # type: ignore[no-any-return]


def marian() -> nn.Module:
    from transformers import MarianConfig, MarianMTModel

    config = MarianConfig(
        vocab_size=VOCAB, d_model=D_MODEL, encoder_layers=LAYERS, decoder_layers=LAYERS,
        encoder_attention_heads=HEADS, decoder_attention_heads=HEADS, encoder_ffn_dim=D_FF, decoder_ffn_dim=D_FF,
        max_position_embeddings=512, activation_function="relu", dropout=0.1, attention_dropout=0.0,
        activation_dropout=0.0, pad_token_id=PAD, eos_token_id=EOS, bos_token_id=BOS, decoder_start_token_id=BOS,
        forced_eos_token_id=None, scale_embedding=True,
    )
    return MarianMTModel(config)


def batches(n: int, batch: int, seed: int) -> list[tuple[Tensor, Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        src_len = torch.randint(8, 31, (batch,), generator=generator)
        tgt_len = torch.randint(8, 31, (batch,), generator=generator)
        src = torch.randint(3, VOCAB, (batch, int(src_len.max())), generator=generator)
        tgt = torch.randint(3, VOCAB, (batch, int(tgt_len.max()) + 2), generator=generator)
        src[torch.arange(src.size(1))[None] >= src_len[:, None]] = PAD
        tgt[torch.arange(tgt.size(1))[None] >= tgt_len[:, None] + 2] = PAD
        tgt[:, 0] = BOS
        out.append((src, tgt))
    return out


def train_tokens_per_s(forward: Callable[[Tensor, Tensor], Tensor], model: nn.Module, data: list[Any]) -> float:
    """Peers: logits at every position, cross-entropy ignoring padding. Ours: the recipe's training step, which
    projects on the vocabulary only at real target tokens (same loss)."""
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    ours = translation_step(PAD, 0.1) if isinstance(model, TransformerTranslator) else None
    tokens = 0
    start = time.perf_counter()
    for src, tgt in data:
        labels = tgt[:, 1:]
        if ours is not None:
            loss = ours(model, (src, tgt)).loss
        else:
            logits = forward(src, tgt[:, :-1])
            loss = F.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1), ignore_index=PAD, label_smoothing=0.1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        tokens += int((labels != PAD).sum())
    return tokens / (time.perf_counter() - start)


@torch.no_grad()
def beam_sentences_per_s(system: str, model: Any, sources: list[Tensor], new_tokens: int) -> float:
    model.eval()
    sentences = 0
    start = time.perf_counter()
    for src in sources:
        if system == "marian":
            out = model.generate(input_ids=src, attention_mask=(src != PAD).long(), num_beams=3, do_sample=False,
                                 max_new_tokens=new_tokens, min_new_tokens=new_tokens, length_penalty=1.0,
                                 early_stopping=True)
            assert out.size(1) >= new_tokens
        else:
            wrapped = NoEos(model)
            state = wrapped.start_decoding(src.size(0), source=src)
            first = torch.full((src.size(0), 1), BOS, dtype=torch.long)
            out = beam_search(wrapped, state, first, 3, 1.0, new_tokens, EOS, use_cache=system == "ours")
            assert out.tokens.size(1) == new_tokens
        sentences += src.size(0)
    return sentences / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--train-batches", type=int, default=8)
    parser.add_argument("--beam-batches", type=int, default=2)
    parser.add_argument("--beam-batch", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    ours = TransformerTranslator(TransformerConfig(VOCAB, D_MODEL, HEADS, LAYERS, LAYERS, D_FF, 0.1, max_len=512))
    theirs = TorchTransformer()
    hf = marian()
    counts = {name: sum(p.numel() for p in m.parameters()) for name, m in
              (("ours", ours), ("torch", theirs), ("marian", hf))}
    print("parameters:", counts)
    forwards: dict[str, tuple[nn.Module, Callable[[Tensor, Tensor], Tensor]]] = {
        "ours": (ours, ours),
        "torch": (theirs, theirs),
        "marian": (hf, lambda s, t: hf(input_ids=s, attention_mask=(s != PAD).long(), decoder_input_ids=t).logits),
    }
    train_data = batches(args.train_batches, args.batch, seed=1)
    beam_data = [src for src, _ in batches(args.beam_batches, args.beam_batch, seed=2)]
    train_results: dict[str, list[float]] = {name: [] for name in forwards}
    beam_results: dict[str, list[float]] = {name: [] for name in forwards}
    train_tokens_per_s(forwards["ours"][1], ours, train_data[:2])  # warm-up
    for _ in range(args.repeats):  # interleaved, so load changes hit all three alike
        for name, (model, forward) in forwards.items():
            train_results[name].append(train_tokens_per_s(forward, model, train_data))
        for name, (model, _) in forwards.items():
            beam_results[name].append(beam_sentences_per_s(name, model, beam_data, args.new_tokens))
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, batch {args.batch}, "
          f"beam width 3, {args.new_tokens} new tokens, best of {args.repeats}")
    for label, results, unit in (("training", train_results, "target tokens/s"),
                                 ("beam search", beam_results, "sentences/s")):
        best = {name: max(values) for name, values in results.items()}
        print(f"{label}: ours {best['ours']:.1f}, torch.nn.Transformer {best['torch']:.1f}, "
              f"MarianMTModel {best['marian']:.1f} {unit}; ours/torch {best['ours'] / best['torch']:.2f}x, "
              f"ours/Marian {best['ours'] / best['marian']:.2f}x")


if __name__ == "__main__":
    main()
