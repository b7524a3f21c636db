"""LoRA adapters in PEFT's format (book chapter 17): `adapter_config.json` and `adapter_model.safetensors` with
PEFT's key names ("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"), so that PEFT loads our
adapters onto the `transformers` model, and we load adapters PEFT saved (Llama-family checkpoints: SmolLM2,
Llama, Qwen2, Mistral). The layers themselves are `torchbook.nn.lora`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save

from torchbook.errors import CheckpointError
from torchbook.hub.hf import hf_config_dict, hf_module_name, module_name_from_hf
from torchbook.io import atomic_write, atomic_write_json
from torchbook.models.gpt import GPT
from torchbook.nn.lora import apply_lora, lora_layers

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."


def save_adapter(model: GPT, folder: str | Path, base_model: str = "") -> Path:
    """Write `model`'s LoRA adapters as a PEFT adapter folder (`base_model`: where the base weights are)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    kind = hf_config_dict(model.config)["model_type"]
    layers = lora_layers(model)
    if not layers:
        raise CheckpointError("the model has no LoRA adapters to save")
    ranks = {m.rank for m in layers.values()}
    alphas = {m.alpha for m in layers.values()}
    if len(ranks) > 1 or len(alphas) > 1:
        raise CheckpointError(f"PEFT's config holds one rank and alpha; these adapters have ranks {sorted(ranks)}")
    tensors, targets = {}, set()
    try:
        for name, layer in layers.items():
            theirs = hf_module_name(name, kind)
            targets.add(theirs.rpartition(".")[2])
            tensors[f"{PREFIX}{theirs}.lora_A.weight"] = layer.lora_A.weight.detach().cpu().contiguous()
            tensors[f"{PREFIX}{theirs}.lora_B.weight"] = layer.lora_B.weight.detach().cpu().contiguous()
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    dropout = next(iter(layers.values())).lora_dropout
    config: dict[str, Any] = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": ranks.pop(), "lora_alpha": alphas.pop(), "lora_dropout": float(getattr(dropout, "p", 0.0)),
        "target_modules": sorted(targets), "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
        "use_rslora": False, "use_dora": False, "init_lora_weights": True, "modules_to_save": None,
    }
    payload = save(tensors, metadata={"format": "pt"})
    atomic_write(folder / ADAPTER_WEIGHTS, lambda f: f.write(payload))
    atomic_write_json(folder / ADAPTER_CONFIG, config)
    return folder


def load_adapter(model: GPT, folder: str | Path) -> GPT:
    """Put the PEFT adapter of `folder` on `model` (in place): LoRA layers where its weights say, with its rank,
    alpha and dropout, and its A and B weights."""
    folder = Path(folder)
    try:
        config = json.loads((folder / ADAPTER_CONFIG).read_text())
        weights = load_file(str(folder / ADAPTER_WEIGHTS))
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{str(folder)!r} is not a PEFT adapter folder ({e})") from None
    if config.get("peft_type") != "LORA" or config.get("use_dora") or config.get("use_rslora"):
        raise CheckpointError(f"{str(folder)!r}: only plain LoRA adapters are supported (peft_type LORA, no DoRA or "
                              "rsLoRA)")
    by_layer: dict[str, dict[str, Any]] = {}
    for key, tensor in weights.items():
        module, _, part = key.removeprefix(PREFIX).rpartition(".lora_")
        try:
            ours = module_name_from_hf(module)
        except (KeyError, ValueError) as e:
            raise CheckpointError(f"{str(folder)!r}: {e}") from None
        by_layer.setdefault(ours, {})[part.split(".")[0]] = tensor  # "A" or "B" (any adapter name dropped)
    rank, alpha = int(config["r"]), float(config["lora_alpha"])
    apply_lora(model, rank, alpha, float(config.get("lora_dropout", 0.0)), targets=sorted(by_layer))
    layers = lora_layers(model)
    for name, parts in by_layer.items():
        layers[name].lora_A.weight.data.copy_(parts["A"])
        layers[name].lora_B.weight.data.copy_(parts["B"])
    return model
