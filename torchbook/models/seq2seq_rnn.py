"""Encoder-decoder RNN with attention for translation (chapter 14; Bahdanau et al. 2014, Luong et al. 2015).

Encoder: shared embedding -> a GRU or LSTM stack (the book: GRU 2 x 512) over the source, packed so padding is
skipped; its outputs are what the decoder attends to and its final state starts the decoder.
Decoder, one step t: embed y(t-1); with Luong attention the RNN runs first and its top output h_t queries the
encoder outputs; with Bahdanau attention the previous top state queries them and the context joins the RNN input.
The attentional vector tanh(W [h_t; context]) is projected on the vocabulary. `attention="none"` is the plain
encoder-decoder of the chapter's first model (the context is then the encoder's last output for every step).

Training uses teacher forcing: the decoder reads the target shifted right. Luong's decoder RNN runs over the
whole target at once and attends for all steps in one batched call; Bahdanau's needs the step loop. Decoding
follows `torchbook.generate.engine`'s protocol (`start_decoding`, `decode_step`, a reorderable state).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from torchbook.nn.rnn_attention import BahdanauAttention, LuongAttention

Hidden = Tensor | tuple[Tensor, Tensor]  # GRU: h (L, B, H); LSTM: (h, c)


@dataclass
class Seq2SeqConfig:
    vocab_size: int = 10_000
    embed_dim: int = 256
    hidden: int = 512  # the book's GRU 2 x 512
    layers: int = 2
    cell: str = "gru"  # gru or lstm
    attention: str = "luong"  # luong, bahdanau or none
    dropout: float = 0.1
    max_len: int = 66  # longest sequence decoded (tokens, including <s>)
    tie_embeddings: bool = False  # output projection = embedding matrix (needs embed_dim == hidden)
    pad_id: int = 0
    bos_id: int = 1
    eos_id: int = 2


def select_hidden(hidden: Hidden, index: Tensor) -> Hidden:
    if isinstance(hidden, tuple):
        return hidden[0].index_select(1, index), hidden[1].index_select(1, index)
    return hidden.index_select(1, index)


@dataclass
class Seq2SeqState:
    """Decoding state: encoder outputs (and their attention keys), the decoder's RNN state and last attention."""

    memory: Tensor  # (B, S, H) encoder outputs
    keys: Tensor  # (B, S, A) attention-projected encoder outputs, computed once
    source_padding: Tensor  # (B, S), True at padding
    start_hidden: Hidden  # the encoder's final state
    hidden: Hidden | None = None  # None: nothing decoded yet

    def reorder(self, index: Tensor) -> None:
        self.memory = self.memory.index_select(0, index)
        self.keys = self.keys.index_select(0, index)
        self.source_padding = self.source_padding.index_select(0, index)
        self.start_hidden = select_hidden(self.start_hidden, index)
        if self.hidden is not None:
            self.hidden = select_hidden(self.hidden, index)

    def fresh(self) -> Seq2SeqState:
        return Seq2SeqState(self.memory, self.keys, self.source_padding, self.start_hidden)


class Seq2SeqRNN(nn.Module):
    config_class = Seq2SeqConfig

    def __init__(self, config: Seq2SeqConfig):
        super().__init__()
        self.config = c = config
        if c.cell not in ("gru", "lstm"):
            raise ValueError(f"cell {c.cell!r}: accepted are 'gru' and 'lstm'")
        if c.attention not in ("luong", "bahdanau", "none"):
            raise ValueError(f"attention {c.attention!r}: accepted are 'luong', 'bahdanau' and 'none'")
        rnn = nn.GRU if c.cell == "gru" else nn.LSTM
        inter_layer_dropout = c.dropout if c.layers > 1 else 0.0
        self.embedding = nn.Embedding(c.vocab_size, c.embed_dim, padding_idx=c.pad_id)
        self.dropout = nn.Dropout(c.dropout)
        self.encoder = rnn(c.embed_dim, c.hidden, c.layers, batch_first=True, dropout=inter_layer_dropout)
        decoder_input = c.embed_dim + (c.hidden if c.attention == "bahdanau" else 0)
        self.decoder = rnn(decoder_input, c.hidden, c.layers, batch_first=True, dropout=inter_layer_dropout)
        self.attention: nn.Module | None = {
            "luong": lambda: LuongAttention(c.hidden, c.hidden),
            "bahdanau": lambda: BahdanauAttention(c.hidden, c.hidden, c.hidden),
            "none": lambda: None,
        }[c.attention]()
        self.combine = nn.Linear(2 * c.hidden, c.embed_dim if c.tie_embeddings else c.hidden)
        self.head = nn.Linear(c.embed_dim if c.tie_embeddings else c.hidden, c.vocab_size)
        if c.tie_embeddings:
            self.head.weight = self.embedding.weight

    # -- encoder -------------------------------------------------------------------------------------------
    def encode(self, source: Tensor) -> tuple[Tensor, Tensor, Hidden]:
        """source (B, S) -> outputs (B, S, H), padding mask (B, S), final state (each row at its true length)."""
        padding = source == self.config.pad_id
        lengths = (~padding).sum(1).clamp(min=1).cpu()
        packed = nn.utils.rnn.pack_padded_sequence(
            self.dropout(self.embedding(source)), lengths, batch_first=True, enforce_sorted=False
        )
        outputs, final = self.encoder(packed)
        memory, _ = nn.utils.rnn.pad_packed_sequence(outputs, batch_first=True, total_length=source.size(1))
        return memory, padding, final

    def attention_keys(self, memory: Tensor) -> Tensor:
        return memory if self.attention is None else self.attention.project_keys(memory)  # type: ignore[operator]

    # -- decoder -------------------------------------------------------------------------------------------
    def context(self, query: Tensor, memory: Tensor, keys: Tensor, padding: Tensor) -> Tensor:
        """query (B, T, H) -> context (B, T, H): attention over the encoder outputs, or (no attention) the
        encoder's last real output for every step."""
        if self.attention is None:
            last = (~padding).sum(1).clamp(min=1) - 1
            final = memory[torch.arange(memory.size(0), device=memory.device), last]  # (B, H)
            return final[:, None, :].expand(-1, query.size(1), -1)
        context, _ = self.attention(query, memory, padding, projected_keys=keys)
        return context  # type: ignore[no-any-return]

    def top(self, hidden: Hidden) -> Tensor:
        """The top layer's state (B, H)."""
        return (hidden[0] if isinstance(hidden, tuple) else hidden)[-1]

    def decoder_steps(
        self, tokens: Tensor, memory: Tensor, keys: Tensor, padding: Tensor, hidden: Hidden, keep: Tensor | None = None
    ) -> tuple[Tensor, Hidden]:
        """Run the decoder over tokens (B, T) from state `hidden`; returns logits (B, T, vocab) and the new state."""
        embedded = self.dropout(self.embedding(tokens))
        if self.config.attention == "bahdanau":  # the previous state queries before each step: a loop
            outputs, contexts = [], []
            for t in range(tokens.size(1)):
                context = self.context(self.top(hidden)[:, None], memory, keys, padding)  # (B, 1, H)
                out, hidden = self.decoder(torch.cat([embedded[:, t : t + 1], context], dim=-1), hidden)
                outputs.append(out)
                contexts.append(context)
            output, context = torch.cat(outputs, 1), torch.cat(contexts, 1)
        else:  # Luong (or none): the RNN runs over every step, then all steps attend at once
            output, hidden = self.decoder(embedded, hidden)
            context = self.context(output, memory, keys, padding)
        attentional = torch.tanh(self.combine(torch.cat([output, context], dim=-1)))
        if keep is not None:  # training: no vocabulary projection at padding
            attentional = attentional[keep]
        return self.head(self.dropout(attentional)), hidden

    def forward(self, source: Tensor, target_in: Tensor, keep: Tensor | None = None) -> Tensor:
        """Teacher forcing: source (B, S), decoder input target_in (B, T) -> logits (B, T, vocab), or (N, vocab)
        for the positions where the boolean `keep` (B, T) is True."""
        memory, padding, final = self.encode(source)
        logits, _ = self.decoder_steps(target_in, memory, self.attention_keys(memory), padding, final, keep)
        return logits

    # -- the decoding protocol (torchbook.generate.engine) ---------------------------------------------------
    def start_decoding(self, batch_size: int, source: Tensor) -> Seq2SeqState:
        memory, padding, final = self.encode(source)
        return Seq2SeqState(memory, self.attention_keys(memory), padding, final)

    def decode_step(self, tokens: Tensor, state: Seq2SeqState) -> Tensor:
        hidden = state.start_hidden if state.hidden is None else state.hidden
        logits, state.hidden = self.decoder_steps(tokens, state.memory, state.keys, state.source_padding, hidden)
        return logits[:, -1]
