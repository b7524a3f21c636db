"""Parity with torch.nn on the same weights: MultiHeadAttention, and the encoder-decoder against nn.Transformer."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from torchbook.nn.attention import MultiHeadAttention
from torchbook.nn.kv_cache import KVCache
from torchbook.nn.rnn_attention import BahdanauAttention, LuongAttention
from torchbook.nn.transformer import Decoder, Encoder

pytestmark = pytest.mark.usefixtures("one_thread")


def copy_mha(ours: Any, theirs: Any) -> None:
    q, k, v = theirs.in_proj_weight.chunk(3)
    qb, kb, vb = theirs.in_proj_bias.chunk(3)
    for proj, w, b in ((ours.q_proj, q, qb), (ours.k_proj, k, kb), (ours.v_proj, v, vb)):
        proj.weight.data.copy_(w)
        proj.bias.data.copy_(b)
    ours.out_proj.load_state_dict(theirs.out_proj.state_dict())


def test_multi_head_attention_equals_torch_with_padding_and_causal_masks() -> None:
    torch.manual_seed(0)
    theirs = nn.MultiheadAttention(32, 4, batch_first=True).eval()
    ours = MultiHeadAttention(32, 4).eval()
    copy_mha(ours, theirs)
    x = torch.randn(3, 7, 32)
    pad = torch.zeros(3, 7, dtype=torch.bool)
    pad[1, 5:] = True
    causal = torch.triu(torch.ones(7, 7, dtype=torch.bool), 1)  # torch: True = not allowed
    expected, _ = theirs(x, x, x, key_padding_mask=pad, attn_mask=causal)
    got = ours(x, key_padding_mask=pad, causal=True)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("norm_first", [False, True])
def test_encoder_decoder_equals_torch_transformer(norm_first: bool) -> None:
    torch.manual_seed(0)
    d, heads, ff, layers = 32, 4, 64, 2
    theirs = nn.Transformer(d, heads, layers, layers, ff, dropout=0.0, batch_first=True, norm_first=norm_first)
    theirs.eval()
    encoder = Encoder(layers, d, heads, ff, 0.0, norm_first, final_norm=True).eval()
    decoder = Decoder(layers, d, heads, ff, 0.0, norm_first, final_norm=True).eval()
    for ours_stack, their_stack in ((encoder, theirs.encoder), (decoder, theirs.decoder)):
        for mine, reference in zip(ours_stack.layers, their_stack.layers):
            copy_mha(mine.self_attn, reference.self_attn)
            if hasattr(reference, "multihead_attn"):
                copy_mha(mine.cross_attn, reference.multihead_attn)
            for name in ("linear1", "linear2"):
                getattr(mine.ff, name).load_state_dict(getattr(reference, name).state_dict())
            for name in ("norm1", "norm2", "norm3"):
                if hasattr(reference, name):
                    getattr(mine, name).load_state_dict(getattr(reference, name).state_dict())
        ours_stack.norm.load_state_dict(their_stack.norm.state_dict())
    src, tgt = torch.randn(3, 9, d), torch.randn(3, 6, d)
    src_pad = torch.zeros(3, 9, dtype=torch.bool)
    src_pad[0, 6:] = True
    src_pad[2, 8:] = True
    causal = nn.Transformer.generate_square_subsequent_mask(6)
    expected = theirs(src, tgt, tgt_mask=causal, src_key_padding_mask=src_pad, memory_key_padding_mask=src_pad)
    memory = encoder(src, src_pad)
    got = decoder(tgt, memory, src_pad)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # Incremental decoding with the caches gives the same outputs, one position at a time.
    self_cache, cross_cache = KVCache(), KVCache()
    steps = [decoder(tgt[:, t : t + 1], memory, src_pad, self_cache, cross_cache) for t in range(6)]
    torch.testing.assert_close(torch.cat(steps, dim=1), got, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_rnn_attention_weights_ignore_padding_and_sum_to_one() -> None:
    torch.manual_seed(0)
    keys, query = torch.randn(2, 5, 8), torch.randn(2, 3, 6)
    pad = torch.tensor([[False] * 5, [False, False, False, True, True]])
    for attention in (BahdanauAttention(6, 8, 10), LuongAttention(6, 8)):
        context, weights = attention(query, keys, pad)
        assert context.shape == (2, 3, 8)
        torch.testing.assert_close(weights.sum(-1), torch.ones(2, 3))
        assert float(weights[1, :, 3:].abs().max()) == 0.0
        # Changing the padded keys changes nothing.
        other = keys.clone()
        other[1, 3:] = 100.0
        torch.testing.assert_close(attention(query, other, pad)[0][1], context[1])
    # Luong "general" is q^T W k: check against the formula.
    luong = LuongAttention(6, 8)
    scores = torch.einsum("btq,qk,bsk->bts", query, luong.key_proj.weight, keys)
    torch.testing.assert_close(luong(query, keys)[1], scores.softmax(-1))


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_causal_attention_without_masks_equals_the_masked_path(kv_heads: int) -> None:
    """Causal self-attention with no other mask runs SDPA's own causal mode (is_causal, blocks above the diagonal
    skipped); outputs and gradients equal those with the same causal mask given explicitly (the additive-mask
    path), multi-head and grouped-query."""
    from torchbook.nn.attention import causal_mask

    torch.manual_seed(0)
    mha = MultiHeadAttention(32, 4, kv_heads)
    x = torch.randn(2, 9, 32, requires_grad=True)
    fast = mha(x, causal=True)
    masked = mha(x, attn_mask=causal_mask(9, 9))
    torch.testing.assert_close(fast, masked, atol=1e-6, rtol=1e-6)
    grads = [torch.autograd.grad(out.square().sum(), [x, mha.q_proj.weight]) for out in (fast, masked)]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
