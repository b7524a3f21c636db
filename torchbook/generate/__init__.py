"""Decoding (chapters 14-15, 17): one engine for every model that generates tokens. See `engine`."""

from torchbook.generate.engine import Decoder, DecodingState, Generated, beam_search, decode, greedy_choice

__all__ = ["Decoder", "DecodingState", "Generated", "beam_search", "decode", "greedy_choice"]
