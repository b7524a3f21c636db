"""The character-level RNN of chapter 14 ("Generating Shakespearean text using a character RNN").

The book's model: embedding (10 dims) -> GRU 2 x 128 -> a linear layer over the characters. Shapes: tokens (B, T)
-> embeddings (B, T, 10) -> GRU outputs (B, T, 128) -> logits (B, T, vocab). The hidden state (layers, B, 128)
carries what the model has read; decoding follows `torchbook.generate.engine` (`start_decoding`, `decode_step`,
a reorderable state), so sampling text is `engine.decode(model, state, prompt, n, choose=Sampler(...))`.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from torchbook.errors import UserInputError


@dataclass
class CharRNNConfig:
    vocab_size: int = 39  # the distinct characters of the (lowercased) Shakespeare text
    embed_dim: int = 10  # the book's embedding size
    hidden: int = 128  # the book's GRU units
    layers: int = 2  # the book's two stacked GRU layers
    dropout: float = 0.0  # between the GRU layers (the book uses none)


@dataclass
class CharRNNState:
    """Decoding state: the GRU's hidden state (layers, B, hidden), None before the first token."""

    hidden: Tensor | None = None

    def reorder(self, index: Tensor) -> None:
        if self.hidden is not None:
            self.hidden = self.hidden.index_select(1, index)

    def fresh(self) -> CharRNNState:
        return CharRNNState()  # an RNN has no fixed context: a fresh state is an empty one


class CharRNN(nn.Module):
    config_class = CharRNNConfig

    def __init__(self, config: CharRNNConfig):
        super().__init__()
        self.config = c = config
        self.embed = nn.Embedding(c.vocab_size, c.embed_dim)
        self.gru = nn.GRU(c.embed_dim, c.hidden, c.layers, batch_first=True, dropout=c.dropout if c.layers > 1 else 0.0)
        self.head = nn.Linear(c.hidden, c.vocab_size)

    def forward(self, tokens: Tensor, hidden: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """tokens (B, T) -> logits (B, T, vocab) and the final hidden state (layers, B, hidden)."""
        outputs, hidden = self.gru(self.embed(tokens), hidden)
        return self.head(outputs), hidden

    # -- the decoding protocol ------------------------------------------------------------------------------
    def start_decoding(self, batch_size: int, attention_mask: Tensor | None = None) -> CharRNNState:
        """An empty state. Left-padded prompts are refused: padding read by the GRU would change its state."""
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            raise UserInputError("the char-RNN decodes prompts of equal length only (padding would enter its state); "
                                 "give prompts one at a time")
        return CharRNNState()

    def decode_step(self, tokens: Tensor, state: CharRNNState) -> Tensor:
        """Read tokens (B, T_new) from the state's hidden state; return the last position's logits (B, vocab)."""
        logits, state.hidden = self(tokens, state.hidden)
        return logits[:, -1]
