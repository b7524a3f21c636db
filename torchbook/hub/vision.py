"""Hugging Face vision checkpoints -> torchbook models: ResNet (`ResNetForImageClassification`), ConvNeXt
(`ConvNextForImageClassification`), ViT (`ViTForImageClassification`) and DeiT (`DeiTForImageClassification`,
`...WithTeacher`).

Each converter takes a checkpoint's state dict and its `config.json` as a dict and returns our model with those
weights (eval mode), whose logits equal `transformers`' on the same `pixel_values` (tests/test_vision_models.py,
on tiny random models). The input normalization of the image processor is not in the weights: the model gets
mean 0 and std 1 unless `pixel_mean`/`pixel_std` are given (preprocessor_config.json's `image_mean`/`image_std`).
`CONVERTERS` maps a config's `model_type` to its converter, for the hub loader to dispatch on.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from torchbook.errors import CheckpointError
from torchbook.hub.hf import read_safetensors
from torchbook.models.cnn import ConvNeXt, ConvNeXtConfig, ResNet, ResNetConfig
from torchbook.models.vit import ViT, ViTConfig


def _labels(config: Mapping[str, Any]) -> int:
    labels = config.get("id2label") or {}
    return int(config.get("num_labels") or len(labels) or 2)


def _normalization(channels: int, mean: list[float] | None, std: list[float] | None) -> dict[str, Any]:
    return {"pixel_mean": list(mean) if mean else [0.0] * channels, "pixel_std": list(std) if std else [1.0] * channels}


def _require_activation(config: Mapping[str, Any], name: str, family: str) -> None:
    if config.get("hidden_act", name) != name:
        raise CheckpointError(f"{family} with hidden_act={config['hidden_act']!r}: only {name} is supported")


def _convert(model: Any, state: Mapping[str, Tensor], key: Callable[[str], str | None], family: str,
             heads: tuple[str, ...] = ("classifier.",)) -> Any:
    """Rename the checkpoint's tensors with `key` and load them into `model` (eval mode). A backbone-only
    checkpoint (no tensor under `heads`) keeps the model's freshly initialized classifier."""
    ours = {new: value for name, value in state.items() if (new := key(name)) is not None}
    if not any(name.startswith(heads) for name in state):
        ours.update({f"head.{k}": v for k, v in model.head.state_dict().items()})
    missing, unexpected = model.load_state_dict(ours, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{family} checkpoint does not match: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.eval()


# -- ResNet ---------------------------------------------------------------------------------------------------
def resnet_config(config: Mapping[str, Any], pixel_mean: list[float] | None = None,
                  pixel_std: list[float] | None = None) -> ResNetConfig:
    _require_activation(config, "relu", "ResNet")
    channels = int(config.get("num_channels", 3))
    return ResNetConfig(
        in_channels=channels,
        n_classes=_labels(config),
        stem_width=int(config.get("embedding_size", 64)),
        widths=list(config.get("hidden_sizes", [256, 512, 1024, 2048])),
        depths=list(config.get("depths", [3, 4, 6, 3])),
        block=config.get("layer_type", "bottleneck"),
        downsample_in_first_stage=bool(config.get("downsample_in_first_stage", False)),
        downsample_in_bottleneck=bool(config.get("downsample_in_bottleneck", False)),
        **_normalization(channels, pixel_mean, pixel_std),
    )


def resnet_key(key: str) -> str | None:
    """A Hugging Face ResNet key -> ours (None: not used for classification)."""
    key = key.removeprefix("resnet.")
    if key.startswith("embedder.embedder."):  # the stem's conv and batch norm: stem.0, stem.1
        rest = key.removeprefix("embedder.embedder.")
        return "stem." + rest.replace("convolution.", "0.").replace("normalization.", "1.")
    if m := re.match(r"encoder\.stages\.(\d+)\.layers\.(\d+)\.(.*)", key):
        stage, unit, rest = m.groups()
        prefix = f"stages.{stage}.{unit}."
        if m2 := re.match(r"layer\.(\d+)\.(convolution|normalization)\.(.*)", rest):
            index, kind, name = m2.groups()  # conv layer i is main.(3i) and its batch norm main.(3i + 1)
            return prefix + f"main.{3 * int(index) + (kind == 'normalization')}.{name}"
        if rest.startswith("shortcut."):
            return prefix + "skip." + rest.removeprefix("shortcut.").replace("convolution.", "0.").replace(
                "normalization.", "1.")
    if key.startswith("classifier.1."):
        return "head." + key.removeprefix("classifier.1.")
    return None


def convert_resnet(state: Mapping[str, Tensor], config: Mapping[str, Any], pixel_mean: list[float] | None = None,
                   pixel_std: list[float] | None = None) -> ResNet:
    """`ResNetForImageClassification` (or a bare `ResNetModel`, whose head then stays freshly initialized)."""
    return _convert(ResNet(resnet_config(config, pixel_mean, pixel_std)), state, resnet_key, "ResNet")  # type: ignore[no-any-return]


# -- ConvNeXt -------------------------------------------------------------------------------------------------
def convnext_config(config: Mapping[str, Any], pixel_mean: list[float] | None = None,
                    pixel_std: list[float] | None = None) -> ConvNeXtConfig:
    _require_activation(config, "gelu", "ConvNeXt")
    channels = int(config.get("num_channels", 3))
    return ConvNeXtConfig(
        in_channels=channels,
        n_classes=_labels(config),
        patch_size=int(config.get("patch_size", 4)),
        widths=list(config.get("hidden_sizes", [96, 192, 384, 768])),
        depths=list(config.get("depths", [3, 3, 9, 3])),
        layer_scale=float(config.get("layer_scale_init_value", 1e-6)),
        eps=float(config.get("layer_norm_eps", 1e-12)),
        **_normalization(channels, pixel_mean, pixel_std),
    )


_CONVNEXT_BLOCK = {"dwconv.": "dwconv.", "layernorm.": "norm.", "pwconv1.": "pwconv1.", "pwconv2.": "pwconv2.",
                   "layer_scale_parameter": "scale"}


def convnext_key(key: str) -> str | None:
    """A Hugging Face ConvNeXt key -> ours (stage s > 0 starts with its LayerNorm and 2x2 convolution)."""
    key = key.removeprefix("convnext.")
    top = {"embeddings.patch_embeddings.": "stem.0.", "embeddings.layernorm.": "stem.1.", "layernorm.": "final_norm.",
           "classifier.": "head."}
    for theirs, ours in top.items():
        if key.startswith(theirs):
            return ours + key.removeprefix(theirs)
    if m := re.match(r"encoder\.stages\.(\d+)\.downsampling_layer\.(\d+)\.(.*)", key):
        return "stages.{}.{}.{}".format(*m.groups())
    if m := re.match(r"encoder\.stages\.(\d+)\.layers\.(\d+)\.(.*)", key):
        stage, block, rest = m.groups()
        index = int(block) + (2 if int(stage) > 0 else 0)
        for theirs, ours in _CONVNEXT_BLOCK.items():
            if rest.startswith(theirs):
                return f"stages.{stage}.{index}.{ours}{rest.removeprefix(theirs)}"
    return None


def convert_convnext(state: Mapping[str, Tensor], config: Mapping[str, Any], pixel_mean: list[float] | None = None,
                     pixel_std: list[float] | None = None) -> ConvNeXt:
    """`ConvNextForImageClassification` (or a bare `ConvNextModel`, whose head then stays freshly initialized)."""
    return _convert(ConvNeXt(convnext_config(config, pixel_mean, pixel_std)), state, convnext_key, "ConvNeXt")  # type: ignore[no-any-return]


# -- ViT and DeiT ---------------------------------------------------------------------------------------------
def vit_config(config: Mapping[str, Any], pixel_mean: list[float] | None = None,
               pixel_std: list[float] | None = None, distillation_head: bool = False) -> ViTConfig:
    _require_activation(config, "gelu", "ViT")
    if not config.get("qkv_bias", True):
        raise CheckpointError("ViT with qkv_bias=false is not supported")
    channels = int(config.get("num_channels", 3))
    return ViTConfig(
        image_size=int(config.get("image_size", 224)),
        patch_size=int(config.get("patch_size", 16)),
        in_channels=channels,
        n_classes=_labels(config),
        d_model=int(config["hidden_size"]),
        n_layers=int(config["num_hidden_layers"]),
        n_heads=int(config["num_attention_heads"]),
        d_ff=int(config["intermediate_size"]),
        eps=float(config.get("layer_norm_eps", 1e-12)),
        distillation_token=config.get("model_type") == "deit",
        distillation_head=distillation_head,
        **_normalization(channels, pixel_mean, pixel_std),
    )


_VIT_LAYER = {  # Hub files (transformers 4 names), then transformers 5's in-memory names
    "attention.attention.query.": "self_attn.q_proj.",
    "attention.attention.key.": "self_attn.k_proj.",
    "attention.attention.value.": "self_attn.v_proj.",
    "attention.output.dense.": "self_attn.out_proj.",
    "intermediate.dense.": "ff.linear1.",
    "output.dense.": "ff.linear2.",
    "layernorm_before.": "norm1.",
    "layernorm_after.": "norm2.",
    "attention.q_proj.": "self_attn.q_proj.",
    "attention.k_proj.": "self_attn.k_proj.",
    "attention.v_proj.": "self_attn.v_proj.",
    "attention.o_proj.": "self_attn.out_proj.",
    "mlp.fc1.": "ff.linear1.",
    "mlp.fc2.": "ff.linear2.",
}
_VIT_TOP = {
    "embeddings.cls_token": "cls_token",
    "embeddings.distillation_token": "dist_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.bias",
    "layernorm.weight": "encoder.norm.weight",
    "layernorm.bias": "encoder.norm.bias",
}


def vit_key(key: str) -> str | None:
    """A Hugging Face ViT/DeiT key, as the Hub's files or transformers 5 name it -> ours (None: the pooler and
    mask token, unused for classification)."""
    key = re.sub(r"^(vit|deit)\.", "", key)
    if key in _VIT_TOP:
        return _VIT_TOP[key]
    if m := re.match(r"(?:encoder\.layer|layers)\.(\d+)\.(.*)", key):
        index, rest = m.groups()
        for theirs, ours in _VIT_LAYER.items():
            if rest.startswith(theirs):
                return f"encoder.layers.{index}.{ours}{rest.removeprefix(theirs)}"
    for head, ours in (("classifier.", "head."), ("cls_classifier.", "head."), ("distillation_classifier.", "dist_head.")):
        if key.startswith(head):
            return ours + key.removeprefix(head)
    return None


def convert_vit(state: Mapping[str, Tensor], config: Mapping[str, Any], pixel_mean: list[float] | None = None,
                pixel_std: list[float] | None = None) -> ViT:
    """`ViTForImageClassification`, `DeiTForImageClassification` (class token's classifier only) or
    `DeiTForImageClassificationWithTeacher` (the mean of both classifiers)."""
    with_teacher = any(k.startswith("distillation_classifier.") for k in state)
    model = ViT(vit_config(config, pixel_mean, pixel_std, distillation_head=with_teacher))
    return _convert(model, state, vit_key, "ViT", heads=("classifier.", "cls_classifier."))  # type: ignore[no-any-return]


CONVERTERS: dict[str, Callable[..., nn.Module]] = {"resnet": convert_resnet, "convnext": convert_convnext,
                                                   "vit": convert_vit, "deit": convert_vit}


def load_vision_folder(folder: Path) -> nn.Module:
    """Our model from a Hugging Face vision folder (config.json, *.safetensors, and preprocessor_config.json's
    normalization when there is one), for `torchbook.load`."""
    config = json.loads((folder / "config.json").read_text())
    processor = folder / "preprocessor_config.json"
    norm = json.loads(processor.read_text()) if processor.exists() else {}
    convert = CONVERTERS[config["model_type"]]
    return convert(read_safetensors(folder), config, norm.get("image_mean"), norm.get("image_std"))
