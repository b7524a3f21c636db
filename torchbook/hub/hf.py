"""Hugging Face checkpoints of the decoder-only families (GPT-2, Llama, Qwen2, Mistral, Mixtral) in and out of
torchbook's `GPT`: config and tensor-name mappings, `save_hf` and `load_hf_folder`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import Tensor

from torchbook.errors import CheckpointError
from torchbook.hub.state import load_state
from torchbook.io import atomic_write, atomic_write_json
from torchbook.models.gpt import GPT, GPTConfig
from torchbook.nn.quantized import check_savable

SUPPORTED = ("gpt2", "llama", "qwen2", "mistral", "mixtral")


def config_from_hf(hf: Any) -> GPTConfig:
    """Our config from a transformers config (GPT-2, Llama, Qwen2, Mistral, Mixtral)."""
    kind = hf.model_type
    if kind == "gpt2":
        return GPTConfig(hf.vocab_size, hf.n_layer, hf.n_head, None, hf.n_embd, hf.n_inner or 4 * hf.n_embd, None,
                         hf.n_positions, "layernorm", hf.layer_norm_epsilon, "gelu", "learned",
                         tie_embeddings=True)
    if kind not in SUPPORTED:
        raise ValueError(f"unsupported architecture {kind!r}; supported: {', '.join(SUPPORTED)}")
    rope = dict(getattr(hf, "rope_parameters", None) or {})
    theta = rope.pop("rope_theta", getattr(hf, "rope_theta", 10000.0))
    if rope.get("rope_type", "default") == "default":
        rope = {}
    return GPTConfig(
        vocab_size=hf.vocab_size, n_layer=hf.num_hidden_layers, n_head=hf.num_attention_heads,
        n_kv_head=hf.num_key_value_heads, d_model=hf.hidden_size, d_ff=hf.intermediate_size,
        head_dim=getattr(hf, "head_dim", None), max_len=hf.max_position_embeddings, norm="rmsnorm",
        norm_eps=hf.rms_norm_eps, mlp="swiglu", positions="rope", rope_theta=theta, rope_scaling=rope,
        qkv_bias=kind == "qwen2" or bool(getattr(hf, "attention_bias", False)),
        out_bias=bool(getattr(hf, "attention_bias", False)), mlp_bias=bool(getattr(hf, "mlp_bias", False)),
        tie_embeddings=bool(hf.tie_word_embeddings),
        sliding_window=getattr(hf, "sliding_window", None) if kind in ("mistral",) else None,
        n_experts=getattr(hf, "num_local_experts", 0) if kind == "mixtral" else 0,
        experts_per_token=getattr(hf, "num_experts_per_tok", 2),
    )


def fuse_legacy_experts(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Mixtral checkpoints on disk keep one (w1 = gate, w3 = up, w2 = down) per expert under `block_sparse_moe`;
    transformers (and we) hold them fused: gate_up (E, 2 d_ff, d) and down (E, d, d_ff)."""
    if not any(".block_sparse_moe." in k for k in sd):
        return sd
    out = {k: v for k, v in sd.items() if ".block_sparse_moe." not in k}
    layers = sorted({k.split(".")[2] for k in sd if ".block_sparse_moe." in k}, key=int)
    for layer in layers:
        p = f"model.layers.{layer}.block_sparse_moe."
        n = len({k.split(".")[5] for k in sd if k.startswith(p + "experts.")})
        out[f"model.layers.{layer}.mlp.gate.weight"] = sd[p + "gate.weight"]
        out[f"model.layers.{layer}.mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([sd[p + f"experts.{e}.w1.weight"], sd[p + f"experts.{e}.w3.weight"]]) for e in range(n)])
        out[f"model.layers.{layer}.mlp.experts.down_proj"] = torch.stack([sd[p + f"experts.{e}.w2.weight"] for e in range(n)])
    return out


def state_dict_from_hf(sd: dict[str, Tensor], config: GPTConfig, kind: str) -> dict[str, Tensor]:
    """Rename (and for GPT-2, split and transpose) a Hugging Face state dict into ours."""
    out: dict[str, Tensor] = {}
    if kind == "gpt2":
        d = config.d_model
        out["embed.weight"], out["position.weight"] = sd["transformer.wte.weight"], sd["transformer.wpe.weight"]
        out["norm.weight"], out["norm.bias"] = sd["transformer.ln_f.weight"], sd["transformer.ln_f.bias"]
        for i in range(config.n_layer):
            p, q = f"transformer.h.{i}.", f"blocks.{i}."
            for ours, theirs in (("norm_1", "ln_1"), ("norm_2", "ln_2")):
                out[q + ours + ".weight"], out[q + ours + ".bias"] = sd[p + theirs + ".weight"], sd[p + theirs + ".bias"]
            w, b = sd[p + "attn.c_attn.weight"], sd[p + "attn.c_attn.bias"]  # Conv1D: (in, out)
            for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
                out[q + f"attn.{name}.weight"] = w[:, j * d : (j + 1) * d].t()
                out[q + f"attn.{name}.bias"] = b[j * d : (j + 1) * d]
            out[q + "attn.out_proj.weight"] = sd[p + "attn.c_proj.weight"].t()
            out[q + "attn.out_proj.bias"] = sd[p + "attn.c_proj.bias"]
            out[q + "mlp.up.weight"], out[q + "mlp.up.bias"] = sd[p + "mlp.c_fc.weight"].t(), sd[p + "mlp.c_fc.bias"]
            out[q + "mlp.down.weight"] = sd[p + "mlp.c_proj.weight"].t()
            out[q + "mlp.down.bias"] = sd[p + "mlp.c_proj.bias"]
        out["lm_head.weight"] = sd.get("lm_head.weight", out["embed.weight"])
        return out
    sd = fuse_legacy_experts(sd)
    renames = {"self_attn.q_proj": "attn.q_proj", "self_attn.k_proj": "attn.k_proj", "self_attn.v_proj": "attn.v_proj",
               "self_attn.o_proj": "attn.out_proj", "input_layernorm": "norm_1", "post_attention_layernorm": "norm_2",
               "mlp.gate_proj": "mlp.gate", "mlp.up_proj": "mlp.up", "mlp.down_proj": "mlp.down",
               "mlp.gate": "mlp.router", "mlp.experts.gate_up_proj": "mlp.gate_up", "mlp.experts.down_proj": "mlp.down"}
    for name, tensor in sd.items():
        if name == "model.embed_tokens.weight":
            out["embed.weight"] = tensor
        elif name == "model.norm.weight":
            out["norm.weight"] = tensor
        elif name == "lm_head.weight":
            out["lm_head.weight"] = tensor
        elif name.startswith("model.layers."):
            layer, rest = name.split(".", 3)[2:]
            module, _, param = rest.rpartition(".")
            if module == "mlp.experts" or rest in ("mlp.experts.gate_up_proj", "mlp.experts.down_proj"):
                module, param = rest, ""
            if module not in renames:
                raise KeyError(f"unexpected tensor {name!r} in the checkpoint")
            out[f"blocks.{layer}.{renames[module]}" + (f".{param}" if param else "")] = tensor
        elif "rotary_emb" not in name:
            raise KeyError(f"unexpected tensor {name!r} in the checkpoint")
    if config.tie_embeddings:
        out["lm_head.weight"] = out["embed.weight"]
    return out


def state_dict_to_hf(model: GPT, kind: str) -> dict[str, Tensor]:
    """Our state dict under Hugging Face's names (the inverse of `state_dict_from_hf`)."""
    sd, config = model.state_dict(), model.config
    out: dict[str, Tensor] = {}
    if kind == "gpt2":
        out["transformer.wte.weight"], out["transformer.wpe.weight"] = sd["embed.weight"], sd["position.weight"]
        out["transformer.ln_f.weight"], out["transformer.ln_f.bias"] = sd["norm.weight"], sd["norm.bias"]
        for i in range(config.n_layer):
            p, q = f"transformer.h.{i}.", f"blocks.{i}."
            for ours, theirs in (("norm_1", "ln_1"), ("norm_2", "ln_2")):
                out[p + theirs + ".weight"], out[p + theirs + ".bias"] = sd[q + ours + ".weight"], sd[q + ours + ".bias"]
            out[p + "attn.c_attn.weight"] = torch.cat([sd[q + f"attn.{n}.weight"] for n in ("q_proj", "k_proj", "v_proj")]).t()
            out[p + "attn.c_attn.bias"] = torch.cat([sd[q + f"attn.{n}.bias"] for n in ("q_proj", "k_proj", "v_proj")])
            out[p + "attn.c_proj.weight"], out[p + "attn.c_proj.bias"] = sd[q + "attn.out_proj.weight"].t(), sd[q + "attn.out_proj.bias"]
            out[p + "mlp.c_fc.weight"], out[p + "mlp.c_fc.bias"] = sd[q + "mlp.up.weight"].t(), sd[q + "mlp.up.bias"]
            out[p + "mlp.c_proj.weight"], out[p + "mlp.c_proj.bias"] = sd[q + "mlp.down.weight"].t(), sd[q + "mlp.down.bias"]
        return {k: v.contiguous() for k, v in out.items()}
    back = MODULES_TO_HF
    for name, tensor in sd.items():
        if name == "embed.weight":
            out["model.embed_tokens.weight"] = tensor
        elif name == "norm.weight":
            out["model.norm.weight"] = tensor
        elif name == "lm_head.weight":
            if not config.tie_embeddings:
                out["lm_head.weight"] = tensor
        elif name.startswith("blocks."):
            layer, rest = name.split(".", 2)[1:]
            if config.n_experts and rest in ("mlp.gate_up", "mlp.down", "mlp.router.weight"):
                p = f"model.layers.{layer}.block_sparse_moe."  # the on-disk layout of Mixtral checkpoints
                if rest == "mlp.router.weight":
                    out[p + "gate.weight"] = tensor
                for e in range(config.n_experts):
                    if rest == "mlp.gate_up":
                        out[p + f"experts.{e}.w1.weight"], out[p + f"experts.{e}.w3.weight"] = tensor[e].chunk(2)
                    elif rest == "mlp.down":
                        out[p + f"experts.{e}.w2.weight"] = tensor[e]
                continue
            module, _, param = rest.rpartition(".")
            out[f"model.layers.{layer}.{back[module]}.{param}"] = tensor
    return {k: v.contiguous() for k, v in out.items()}


# Our module names inside a block -> Hugging Face's, for the Llama family (GPT-2 fuses query/key/value in one layer).
MODULES_TO_HF = {"attn.q_proj": "self_attn.q_proj", "attn.k_proj": "self_attn.k_proj", "attn.v_proj": "self_attn.v_proj",
                 "attn.out_proj": "self_attn.o_proj", "norm_1": "input_layernorm", "norm_2": "post_attention_layernorm",
                 "mlp.gate": "mlp.gate_proj", "mlp.up": "mlp.up_proj", "mlp.down": "mlp.down_proj", "mlp.router": "mlp.gate"}


def hf_module_name(name: str, kind: str) -> str:
    """A module's Hugging Face name ("blocks.3.attn.q_proj" -> "model.layers.3.self_attn.q_proj"), Llama family."""
    if kind == "gpt2":
        raise ValueError("GPT-2 checkpoints fuse the query, key and value projections (c_attn): name the layers of "
                         "a Llama-family model")
    if name == "lm_head":
        return name
    _, layer, rest = name.split(".", 2)
    return f"model.layers.{layer}.{MODULES_TO_HF[rest]}"


def module_name_from_hf(name: str) -> str:
    """The inverse of `hf_module_name`."""
    if name == "lm_head":
        return name
    layer, rest = name.split(".", 3)[2:]
    ours = {v: k for k, v in MODULES_TO_HF.items()}
    if not name.startswith("model.layers.") or rest not in ours:
        raise KeyError(f"no torchbook layer is named {name!r} in Hugging Face's layout")
    return f"blocks.{layer}.{ours[rest]}"


def hf_config_dict(config: GPTConfig, bos_token_id: int | None = None,
                   eos_token_id: int | None = None) -> dict[str, Any]:
    """A transformers config.json for our config (GPT-2 or the Llama family). The special token ids are written
    even when unknown (None): left out, transformers fills in GPT-2's 50256 or Llama's 1 and 2, which may not exist
    in the model's vocabulary."""
    special = {"bos_token_id": bos_token_id, "eos_token_id": eos_token_id}
    if config.positions == "learned":
        return {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": config.vocab_size,
                "n_embd": config.d_model, "n_layer": config.n_layer, "n_head": config.n_head, "n_inner": config.d_ff,
                "n_positions": config.max_len, "layer_norm_epsilon": config.norm_eps, "activation_function": "gelu_new",
                "tie_word_embeddings": True, **special}
    kind = "mixtral" if config.n_experts else "mistral" if config.sliding_window else "qwen2" if config.qkv_bias else "llama"
    out: dict[str, Any] = {
        "model_type": kind, "architectures": [f"{kind.capitalize() if kind != 'qwen2' else 'Qwen2'}ForCausalLM"],
        "vocab_size": config.vocab_size, "hidden_size": config.d_model, "intermediate_size": config.d_ff,
        "num_hidden_layers": config.n_layer, "num_attention_heads": config.n_head, "num_key_value_heads": config.kv_heads,
        "head_dim": config.head_dim or config.d_model // config.n_head, "max_position_embeddings": config.max_len,
        "rms_norm_eps": config.norm_eps, "tie_word_embeddings": config.tie_embeddings, "hidden_act": "silu",
        "rope_parameters": {"rope_theta": config.rope_theta, "rope_type": "default", **config.rope_scaling},
        "attention_bias": config.out_bias, "mlp_bias": config.mlp_bias, **special,
    }
    if config.sliding_window:
        out["sliding_window"] = config.sliding_window
    if config.n_experts:
        out.update(num_local_experts=config.n_experts, num_experts_per_tok=config.experts_per_token)
    return out


def save_hf(model: GPT, folder: str | Path, tokenizer: Any = None, bos_token_id: int | None = None,
            eos_token_id: int | None = None) -> Path:
    """Write `model` as a Hugging Face folder (config.json + model.safetensors [+ tokenizer.json]); the special
    token ids go into config.json (None where the model has none)."""
    check_savable(model)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = hf_config_dict(model.config, bos_token_id, eos_token_id)
    tensors = state_dict_to_hf(model, config["model_type"])
    payload = save(tensors, metadata={"format": "pt"})
    atomic_write(folder / "model.safetensors", lambda f: f.write(payload))
    atomic_write_json(folder / "config.json", config)
    if tokenizer is not None:
        tokenizer.save(str(folder / "tokenizer.json"))
    return folder


def read_safetensors(folder: Path) -> dict[str, Tensor]:
    """Every tensor of a folder's *.safetensors files (a sharded checkpoint is several)."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{str(folder)!r} holds no *.safetensors weights")
    state: dict[str, Tensor] = {}
    for file in files:
        try:
            state.update(load_file(str(file)))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{str(file)!r} is corrupt or truncated ({e})") from None
    return state


def load_hf_folder(folder: str | Path) -> GPT:
    """Our GPT from a Hugging Face folder (config.json + *.safetensors), without importing the transformers model."""
    from transformers import AutoConfig  # heavy: only Hugging Face folders need it

    folder = Path(folder)
    try:
        kind = json.loads((folder / "config.json").read_text())["model_type"]
        config = config_from_hf(AutoConfig.from_pretrained(str(folder)))
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"{str(folder)!r}: {e}") from None
    try:
        state = state_dict_from_hf(read_safetensors(folder), config, kind)
    except KeyError as e:
        raise CheckpointError(f"{str(folder)!r}: {e.args[0]}") from None
    return load_state(GPT(config), state, repr(str(folder))).eval()  # type: ignore[return-value]


def from_hf_model(hf_model: Any) -> GPT:
    """Our GPT with the weights of a loaded transformers causal LM."""
    config = config_from_hf(hf_model.config)
    state = state_dict_from_hf(hf_model.state_dict(), config, hf_model.config.model_type)
    return load_state(GPT(config), state, f"the {hf_model.config.model_type} model").eval()  # type: ignore[return-value]
