"""Decoding (chapters 14-15, 17): one engine for every model that generates tokens. See `engine`."""

from torchbook.generate.engine import (
           Decoder,
           DecodingState,
           Generated,
           beam_search,
           decode,
           generate_tokens,
           greedy_choice,
)
from torchbook.generate.sampling import Sampler, SamplingConfig

__all__ = ["Decoder", "DecodingState", "Generated", "Sampler", "SamplingConfig", "beam_search", "decode", "generate_tokens",
           "greedy_choice"]
