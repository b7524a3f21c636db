"""LoRA and QLoRA (chapter 17): parity with PEFT's LoraLayer, merge/unmerge, PEFT's adapter format both ways,
the frozen int4 base, gradient checkpointing."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from torchbook.hub.hf import save_hf
from torchbook.hub.peft import load_adapter, save_adapter
from torchbook.models.gpt import GPT, GPTConfig
from torchbook.nn.lora import LoRALinear, apply_lora, lora_layers, lora_state_dict, merge_lora
from torchbook.nn.quantized import Int4Linear
from torchbook.train.config import TrainConfig
from torchbook.train.speed import enable_activation_checkpointing
from torchbook.train.steps import sft_step
from torchbook.train.trainer import Trainer

TARGETS = ["*.attn.q_proj", "*.attn.v_proj", "*.mlp.*"]


def tiny_llama(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=96, n_layer=2, n_head=4, n_kv_head=2, d_model=64, d_ff=128, max_len=64,
                         norm="rmsnorm", mlp="swiglu", positions="rope", qkv_bias=False, out_bias=False,
                         mlp_bias=False, tie_embeddings=False)).eval()


def randomize_b(model: nn.Module, seed: int = 1) -> None:
    """LoRA's B starts at zero; a trained adapter's is not (tests need an update that shows)."""
    torch.manual_seed(seed)
    for layer in lora_layers(model).values():
        nn.init.normal_(layer.lora_B.weight, std=0.05)


def test_equal_to_peft_lora_layer_forward_and_gradients() -> None:
    from peft import LoraConfig
    from peft.tuners.lora.layer import Linear as PeftLinear

    torch.manual_seed(0)
    base = nn.Linear(48, 40).double()
    theirs = PeftLinear(nn.Linear(48, 40).double(), "default", LoraConfig(r=8, lora_alpha=32), r=8, lora_alpha=32)
    theirs.base_layer.load_state_dict(base.state_dict())
    ours = LoRALinear(nn.Linear(48, 40).double(), rank=8, alpha=32)
    ours.base.load_state_dict(base.state_dict())
    ours.lora_A.weight.data.copy_(theirs.lora_A["default"].weight)
    nn.init.normal_(theirs.lora_B["default"].weight)
    ours.lora_B.weight.data.copy_(theirs.lora_B["default"].weight)
    x1 = torch.randn(3, 5, 48, dtype=torch.float64, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    y1, y2 = ours(x1), theirs(x2)
    torch.testing.assert_close(y1, y2, atol=1e-6, rtol=1e-6)
    weights = torch.randn_like(y1)
    (y1 * weights).sum().backward()
    (y2 * weights).sum().backward()
    for a, b in ((x1.grad, x2.grad), (ours.lora_A.weight.grad, theirs.lora_A["default"].weight.grad),
                 (ours.lora_B.weight.grad, theirs.lora_B["default"].weight.grad)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    assert ours.base.weight.grad is None  # the base is frozen


def test_starts_equal_to_the_base_model_and_merge_unmerge() -> None:
    model, reference = tiny_llama(), tiny_llama()
    tokens = torch.randint(0, 96, (2, 12))
    names = apply_lora(model, rank=4, alpha=8, targets=TARGETS)
    assert len(names) == 2 * 5 and all(n.endswith(("q_proj", "v_proj", "gate", "up", "down")) for n in names)
    torch.testing.assert_close(model(tokens), reference(tokens))  # B = 0: no change yet
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{ab}.weight" for n in names for ab in "AB"}
    randomize_b(model)
    adapted = model(tokens)
    assert not torch.allclose(adapted, reference(tokens), atol=1e-3)
    for layer in lora_layers(model).values():
        layer.merge()
    torch.testing.assert_close(model(tokens), adapted, atol=1e-5, rtol=1e-5)
    for layer in lora_layers(model).values():
        layer.unmerge()
    torch.testing.assert_close(model(tokens), adapted, atol=1e-5, rtol=1e-5)
    merge_lora(model)
    assert not lora_layers(model) and set(model.state_dict()) == set(reference.state_dict())
    torch.testing.assert_close(model(tokens), adapted, atol=1e-5, rtol=1e-5)


def test_adapters_in_peft_format_both_ways(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    base = tiny_llama()
    save_hf(base, tmp_path / "base")
    tokens = torch.randint(0, 96, (2, 10))
    # ours -> PEFT on the transformers model
    ours = tiny_llama()
    apply_lora(ours, rank=4, alpha=8, targets=TARGETS)
    randomize_b(ours)
    save_adapter(ours, tmp_path / "ours", base_model=str(tmp_path / "base"))
    assert {p.name for p in (tmp_path / "ours").iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}
    hf = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, ours(tokens), atol=1e-5, rtol=1e-5)
    # PEFT -> ours
    hf_model = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    peft_model = get_peft_model(hf_model, LoraConfig(r=6, lora_alpha=12, target_modules=["k_proj", "o_proj", "up_proj"]))
    torch.manual_seed(3)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(p, std=0.05)
    peft_model.save_pretrained(tmp_path / "theirs")
    loaded = load_adapter(tiny_llama(), tmp_path / "theirs")
    assert sorted(lora_layers(loaded)) == sorted(f"blocks.{i}.{m}" for i in range(2)
                                                 for m in ("attn.k_proj", "attn.out_proj", "mlp.up"))
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens), peft_model.eval()(tokens).logits, atol=1e-5, rtol=1e-5)


def test_qlora_trains_adapters_on_a_frozen_int4_base_with_checkpointing() -> None:
    model, reference = tiny_llama(), tiny_llama()
    apply_lora(model, rank=4, alpha=8, targets=TARGETS, quantize_base=True)
    layer = lora_layers(model)["blocks.0.attn.q_proj"]
    assert isinstance(layer.base, Int4Linear) and not list(layer.base.parameters())
    tokens = torch.randint(0, 96, (2, 12))
    # int4 with a scale and minimum per group of 32 inputs: the float model with those layers' weights dequantised
    for name, adapted in lora_layers(model).items():
        assert isinstance(adapted.base, Int4Linear)
        reference.get_submodule(name).weight.data = adapted.base.dequantize()
    torch.testing.assert_close(model(tokens), reference(tokens), atol=1e-5, rtol=1e-5)
    randomize_b(model)
    model.train()
    loss = model(tokens).logsumexp(-1).mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert set(grads) == set(lora_state_dict(model)) and all(g.abs().sum() > 0 for g in grads.values())
    # the gradient through the int4 layer is the one of the dequantised weight
    x = torch.randn(5, 64, requires_grad=True)
    dense = nn.Linear(64, 64, bias=False)
    dense.weight.data = layer.base.dequantize()
    x2 = x.detach().clone().requires_grad_(True)
    (layer.base_forward(x) ** 2).sum().backward()
    (dense(x2) ** 2).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-5, rtol=1e-5)
    # gradient checkpointing gives the same gradients
    model.zero_grad()
    enable_activation_checkpointing(model)
    model(tokens).logsumexp(-1).mean().backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[n], atol=1e-6, rtol=1e-5)


def test_no_match_is_an_error() -> None:
    with pytest.raises(ValueError, match="no linear layer matches"):
        apply_lora(tiny_llama(), targets=["*.nothing"])


FRAGMENT = """
import os, sys, torch
from torchbook.train.speed import return_freed_buffers
if sys.argv[1] == "fixed":
    assert return_freed_buffers()
page = os.sysconf("SC_PAGE_SIZE")
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * page
torch.ones(4 << 20).sum()  # a 16 MB buffer freed: glibc raises its mmap threshold to 16 MB
before = rss()
keep, big = [], []
for _ in range(100):  # what a checkpointed step does: a 4 MB activation freed, a small tensor kept after it
    big.append(torch.ones(1 << 20))
    keep.append(torch.ones(4096))
del big
print((rss() - before) / 2**20)
"""


def test_freed_activations_leave_the_process_with_checkpointing_on_cpu() -> None:
    """What set a LoRA step's peak RSS (docs/benchmarks.md): freed activation buffers kept in glibc's heap. With
    `return_freed_buffers` (the trainer's, when checkpointing on CPU) freed 4 MB buffers leave the
    process; without it they stay (measured: 400 MB of 100 freed 4 MB buffers stay)."""
    kept = {mode: float(subprocess.run([sys.executable, "-c", FRAGMENT, mode], capture_output=True, text=True,
                                       check=True).stdout) for mode in ("default", "fixed")}
    assert kept["default"] > 200 and kept["fixed"] < 20, kept


def test_a_lora_step_with_checkpointing_keeps_no_gradient_on_frozen_weights() -> None:
    model = tiny_llama()
    apply_lora(model, rank=4, alpha=8, targets=TARGETS)
    tokens = torch.randint(0, 96, (4, 12))
    config = TrainConfig(epochs=1, batch_size=2, lr=1e-3, optimizer="adamw", device="cpu", progress=False,
                         max_steps=2, restore_best=False, log_every=0, activation_checkpointing=True)
    trainer = Trainer(model, config, None, TensorDataset(tokens, tokens.roll(-1, 1)), step=sft_step)
    trainer.fit()
    assert all(getattr(block, "_torchbook_checkpointed", False) for block in model.blocks)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen and all(model.get_parameter(n).grad is None for n in frozen)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(lora_state_dict(model))


def test_release_memory_switches_the_allocator_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    """`release_memory=false` keeps glibc's default allocator under checkpointing on the CPU: the fixed 1 MiB mmap
    threshold costs page faults (about 6.5 s of system time per 13 s step at SmolLM2's shape, batch 8 x 256,
    docs/benchmarks.md); the default (true) applies it."""
    import torchbook.train.trainer as trainer_module

    calls: list[int] = []
    monkeypatch.setattr(trainer_module, "return_freed_buffers", lambda: calls.append(1) or True)
    tokens = torch.randint(0, 96, (4, 12))
    for release in (True, False):
        config = TrainConfig(epochs=1, batch_size=2, device="cpu", progress=False, activation_checkpointing=True,
                             release_memory=release)
        Trainer(tiny_llama(), config, None, TensorDataset(tokens, tokens.roll(-1, 1)), step=sft_step)
    assert calls == [1]
