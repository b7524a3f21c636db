"""Training speed of our ResNet and ViT against `transformers`' ResNet and ViT of the same size.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/vision.py                # CPU: small sizes, a few steps
    .venv/bin/python benchmarks/vision.py --device cuda --precision bf16 --image-size 224 --batch 64

Each pair is the same architecture with the same weights (ours converted from the transformers model by
`torchbook.hub.vision`, so the logits agree): ResNet-34 (basic units 3/4/6/3) and a ViT (by default
ViT-S/16 width 384, 6 heads, 12 layers; `--vit-layers`). A timing is `--steps` training steps (forward,
cross-entropy, backward, SGD step) on one random batch; pairs are timed alternately `--repeats` times and the
report gives each model's best images/s and the median of the per-repeat ratios (ours / transformers': above 1,
ours is faster). timm is not compared: it needs torchvision, which does not install beside the pinned torch.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def train_steps(model: nn.Module, forward: Callable[[nn.Module, torch.Tensor], torch.Tensor], x: torch.Tensor,
                y: torch.Tensor, steps: int, precision: str) -> float:
    """Seconds for `steps` SGD steps (synchronized on CUDA)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    context = torch.autocast(x.device.type, dtype=dtype) if dtype else nullcontext()
    model.train()
    if x.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        with context:
            loss = F.cross_entropy(forward(model, x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    if x.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def pairs(args: argparse.Namespace) -> dict[str, tuple[nn.Module, nn.Module]]:
    import transformers

    from torchbook.hub.vision import convert_resnet, convert_vit

    resnet_config = transformers.ResNetConfig(embedding_size=64, hidden_sizes=[64, 128, 256, 512], depths=[3, 4, 6, 3],
                                              layer_type="basic", num_labels=10)
    hf_resnet = transformers.ResNetForImageClassification(resnet_config)
    vit_config = transformers.ViTConfig(image_size=args.image_size, patch_size=args.patch_size, hidden_size=384,
                                        num_hidden_layers=args.vit_layers, num_attention_heads=6,
                                        intermediate_size=1536, num_labels=10)
    hf_vit = transformers.ViTForImageClassification(vit_config)
    if hasattr(hf_vit, "set_attn_implementation"):
        hf_vit.set_attn_implementation("sdpa")  # the fused kernel, as ours uses
    return {
        "ResNet-34": (convert_resnet(hf_resnet.state_dict(), resnet_config.to_dict()), hf_resnet),
        f"ViT (384 wide, {args.vit_layers} layers, patch {args.patch_size})":
            (convert_vit(hf_vit.state_dict(), vit_config.to_dict()), hf_vit),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--patch-size", type=int, default=16)
    parser.add_argument("--vit-layers", type=int, default=12)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    device = torch.device(args.device)
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, args.image_size, args.image_size, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)

    def ours(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        return model(images)  # type: ignore[no-any-return]

    def theirs(model: nn.Module, images: torch.Tensor) -> Any:
        return model(pixel_values=images).logits

    print(f"torch {torch.__version__}, device {device}, {args.precision}, batch {args.batch}, "
          f"{args.image_size}x{args.image_size} images, {args.steps} steps per timing, {args.repeats} repeats, "
          f"{torch.get_num_threads()} threads")
    print("| model | ours, images/s | transformers, images/s | ours / transformers: best (median) |")
    print("|---|---|---|---|")
    for name, (our_model, hf_model) in pairs(args).items():
        our_model.to(device)
        hf_model.to(device)
        train_steps(our_model, ours, x, y, 1, args.precision)  # warm-up
        train_steps(hf_model, theirs, x, y, 1, args.precision)
        our_times, hf_times = [], []
        for repeat in range(args.repeats):
            order = [(our_model, ours, our_times), (hf_model, theirs, hf_times)]
            for model, forward, times in (order if repeat % 2 == 0 else order[::-1]):
                times.append(train_steps(model, forward, x, y, args.steps, args.precision))
        images = args.steps * args.batch
        best_ours, best_hf = images / min(our_times), images / min(hf_times)
        median = statistics.median(h / o for o, h in zip(our_times, hf_times))
        print(f"| {name} | {best_ours:,.1f} | {best_hf:,.1f} | {best_ours / best_hf:.3f} ({median:.3f}) |")


if __name__ == "__main__":
    main()
