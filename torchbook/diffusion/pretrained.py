"""Hugging Face diffusion checkpoints into our U-Net and samplers.

A diffusers pipeline folder (`model_index.json`, `unet/`, `scheduler/`) or a bare `UNet2DModel` folder
(`config.json` + `diffusion_pytorch_model.safetensors`) loads into `torchbook.models.unet.UNet`, whose module names
are diffusers' own, so the weights load as they are. Supported: `UNet2DModel` with the block types
`DownBlock2D`, `AttnDownBlock2D`, `UpBlock2D`, `AttnUpBlock2D` and the `UNetMidBlock2D` middle (with or without its
attention), positional time embedding, `resnet_time_scale_shift="default"`, conv down/up-sampling, class
embeddings by table (`num_class_embeds`), SiLU; anything else is a one-line error naming the option.

The scheduler config (`DDPMScheduler` or `DDIMScheduler`, epsilon prediction, betas `linear`, `scaled_linear` or
`squaredcos_cap_v2`) becomes our `DDPM` / `DDIM` in `diffusers` mode with the same options (variance type,
clip_sample, set_alpha_to_one, steps_offset, timestep_spacing).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file

from torchbook.diffusion.schedulers import DDIM, DDPM, VarianceSchedule, cosine_schedule, linear_schedule
from torchbook.errors import CheckpointError
from torchbook.models.unet import DOWN_BLOCKS, UP_BLOCKS, UNet, UNetConfig

WEIGHTS = "diffusion_pytorch_model.safetensors"
# UNet2DModel options we implement, with the only value we accept (None: any value of ours is fine).
REQUIRED = {"time_embedding_type": "positional", "center_input_sample": False, "mid_block_type": "UNetMidBlock2D",
            "resnet_time_scale_shift": "default", "downsample_type": "conv", "upsample_type": "conv",
            "class_embed_type": None, "act_fn": "silu", "downsample_padding": 1, "mid_block_scale_factor": 1,
            "attn_norm_num_groups": None, "time_embedding_dim": None}


def read_json(path: Path) -> dict[str, Any]:
    try:
        return dict(json.loads(path.read_text()))
    except FileNotFoundError:
        raise CheckpointError(f"{str(path)!r} is missing") from None
    except json.JSONDecodeError:
        raise CheckpointError(f"{str(path)!r} is corrupt (not valid JSON)") from None


def unet_config(hf: dict[str, Any]) -> UNetConfig:
    """Our UNetConfig for a diffusers UNet2DModel config.json; a clear error for an option we do not implement."""
    if hf.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise CheckpointError(f"{hf.get('_class_name')} is not supported; torchbook loads UNet2DModel checkpoints")
    for key, accepted in REQUIRED.items():
        if key in hf and hf[key] != accepted:
            raise CheckpointError(f"UNet2DModel option {key}={hf[key]!r} is not supported (only {accepted!r})")
    blocks = [*hf.get("down_block_types", ()), *hf.get("up_block_types", ())]
    unsupported = sorted({b for b in blocks if b not in DOWN_BLOCKS + UP_BLOCKS})
    if unsupported:
        raise CheckpointError(f"U-Net block types {unsupported} are not supported; supported: "
                              f"{', '.join(DOWN_BLOCKS + UP_BLOCKS)} and UNetMidBlock2D")
    size = hf.get("sample_size") or 32
    if isinstance(size, (list, tuple)):
        if len(set(size)) != 1:
            raise CheckpointError(f"non-square sample_size {size} is not supported")
        size = size[0]
    heads = hf.get("attention_head_dim", 8)
    if heads is None:
        raise CheckpointError("attention_head_dim=None (one head per block width) is not supported")
    return UNetConfig(
        sample_size=int(size), in_channels=hf.get("in_channels", 3), out_channels=hf.get("out_channels", 3),
        block_out_channels=list(hf["block_out_channels"]), down_block_types=list(hf["down_block_types"]),
        up_block_types=list(hf["up_block_types"]), layers_per_block=hf.get("layers_per_block", 2),
        attention_head_dim=int(heads), norm_num_groups=hf.get("norm_num_groups", 32),
        norm_eps=hf.get("norm_eps", 1e-5), dropout=hf.get("dropout", 0.0), num_class_embeds=hf.get("num_class_embeds"),
        add_attention=hf.get("add_attention", True), flip_sin_to_cos=hf.get("flip_sin_to_cos", True),
        freq_shift=hf.get("freq_shift", 0))


def load_unet(folder: str | Path) -> UNet:
    """A diffusers UNet2DModel folder (config.json + safetensors weights) as our UNet, in eval mode."""
    folder = Path(folder)
    model = UNet(unet_config(read_json(folder / "config.json")))
    path = folder / WEIGHTS
    if not path.exists():
        raise CheckpointError(f"{str(path)!r} is missing (only safetensors weights are read)")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{str(path)!r} is corrupt or truncated ({e})") from None
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{str(path)!r} does not match the U-Net its config describes: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    return model.eval()


@dataclass
class PretrainedScheduler:
    """A diffusers scheduler config, ready to make our samplers (`ddpm()`, `ddim(steps, eta)`)."""

    schedule: VarianceSchedule
    config: dict[str, Any] = field(default_factory=dict)

    def ddpm(self) -> DDPM:
        c = self.config
        clip = c.get("clip_sample_range", 1.0) if c.get("clip_sample", True) else None
        return DDPM(self.schedule, "diffusers", c.get("variance_type", "fixed_small"), clip)

    def ddim(self, steps: int = 50, eta: float = 0.0) -> DDIM:
        c = self.config
        clip = c.get("clip_sample_range", 1.0) if c.get("clip_sample", True) else None
        return DDIM(self.schedule, steps, eta, "diffusers", c.get("timestep_spacing", "leading"), clip,
                    c.get("set_alpha_to_one", True), c.get("steps_offset", 0))


def load_scheduler(folder: str | Path) -> PretrainedScheduler:
    """A diffusers scheduler folder (scheduler_config.json) as our schedule and sampler options."""
    config = read_json(Path(folder) / "scheduler_config.json")
    name = config.get("_class_name")
    if name not in ("DDPMScheduler", "DDIMScheduler"):
        raise CheckpointError(f"scheduler {name!r} is not supported; torchbook reads DDPMScheduler and DDIMScheduler")
    for key, accepted in (("prediction_type", "epsilon"), ("thresholding", False), ("rescale_betas_zero_snr", False)):
        if config.get(key, accepted) != accepted:
            raise CheckpointError(f"scheduler option {key}={config[key]!r} is not supported (only {accepted!r})")
    if config.get("trained_betas") is not None:
        raise CheckpointError("scheduler option trained_betas is not supported")
    variance = config.get("variance_type", "fixed_small")
    if name == "DDPMScheduler" and variance not in ("fixed_small", "fixed_large"):
        raise CheckpointError(f"DDPM variance_type {variance!r} is not supported (fixed_small or fixed_large)")
    T = config.get("num_train_timesteps", 1000)
    kind = config.get("beta_schedule", "linear")
    if kind == "squaredcos_cap_v2":
        schedule = cosine_schedule(T)
    elif kind in ("linear", "scaled_linear"):
        schedule = linear_schedule(T, config.get("beta_start", 1e-4), config.get("beta_end", 0.02), kind == "scaled_linear")
    else:
        raise CheckpointError(f"beta_schedule {kind!r} is not supported (linear, scaled_linear, squaredcos_cap_v2)")
    return PretrainedScheduler(schedule, config)


def load_pipeline(folder: str | Path) -> tuple[UNet, PretrainedScheduler]:
    """A diffusers pipeline folder (unet/ and scheduler/, as DDPMPipeline.save_pretrained writes it)."""
    folder = Path(folder)
    if not (folder / "unet").is_dir() or not (folder / "scheduler").is_dir():
        raise CheckpointError(f"{str(folder)!r} is not a diffusers pipeline folder (it needs unet/ and scheduler/)")
    return load_unet(folder / "unet"), load_scheduler(folder / "scheduler")
