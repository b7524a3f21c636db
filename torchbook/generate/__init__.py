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
from torchbook.generate.serving import Busy, Engine, Request

__all__ = ["Busy", "Decoder", "DecodingState", "Engine", "Generated", "Request", "Sampler", "SamplingConfig",
           "beam_search", "decode", "generate_tokens", "greedy_choice"]
