"""Fine-tuning memory and speed (chapter 17): full fine-tuning, LoRA and QLoRA with torchbook against PEFT +
transformers, each setting in a fresh process (peak RSS is per process).

    python benchmarks/finetune.py                       # SmolLM2-135M and GPT-2-124M shapes, batch 8 x 256
    python benchmarks/finetune.py --shapes smollm2 --batch 2 --seq 128 --steps 2 --checkpointing on

Models have the checkpoints' shapes with random weights drawn alike on both sides (`hf_like_init`: normal(0, 0.02)
for every linear and embedding weight, as transformers initialises them; loading SmolLM2's GGUF takes most of a
minute here). Speed depends on the weights' scale: with torch's default initialisation (embeddings normal(0, 1), tied
to the output layer) the logits spread so widely that the softmax's gradient fills with subnormal numbers, which
the CPU multiplies many times more slowly. Ours trains through the one Trainer with `sft_step` (every token
counted); PEFT's model through a plain AdamW loop on `model(input_ids, labels=...).loss`. Both use AdamW on the
trainable parameters, LoRA rank 8, alpha 16 on the attention projections (q, k, v, o). Printed per setting: peak
RSS (GB), tokens/s (after one warm-up step), tokens per CPU-second (user + system time of the process over the
timed steps: on a loaded machine the ratio of these is the comparison to read, with `--threads 1`), and the
gradient + AdamW-state bytes of the trainable parameters. `--repeats N` runs the list of settings N times, one
process after the other (ours and the peer's alternate when the list alternates).
PEFT's QLoRA needs bitsandbytes' CUDA kernels: not measured on this CPU machine. TRL's `SFTTrainer`
(`--settings trl:full,trl:lora`) trains the same transformers model on the same token rows, pre-tokenized.
Our processes start on the allocator the `torchbook` command runs on (`--allocator cli`: jemalloc when installed),
the peers' on the C library's (`--peer-allocator jemalloc` for theirs on jemalloc too).

DPO (chapter 15) against TRL's `DPOTrainer`, `--settings ours:dpo,ours:dpo-lora,trl:dpo,trl:dpo-lora`: `--batch`
pairs per step, each a prompt of seq/2 tokens and two answers of seq/2 (a chosen and a rejected row of `--seq`
tokens, with the end token), the same token ids on both sides (words of one token each in SmolLM2's vocabulary,
tokenized by the same tokenizer.json). Ours trains through the Trainer with `dpo_step`, TRL through its trainer;
both with the reference log-probabilities computed before training (TRL's `precompute_ref_log_probs=True`; not
timed), so a step is one forward and backward of the policy on 2 x batch rows. Tokens/s counts the rows' tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from typing import Any

from torchbook.allocator import allocator_in_use, guard_dirty_pages, with_faster_allocator

SHAPES = {
    "smollm2": dict(vocab_size=49152, n_layer=30, n_head=9, n_kv_head=3, d_model=576, d_ff=1536, max_len=8192,
                    norm="rmsnorm", mlp="swiglu", positions="rope", rope_theta=100000.0, qkv_bias=False,
                    out_bias=False, mlp_bias=False, tie_embeddings=True),
    "gpt2": dict(vocab_size=50257, n_layer=12, n_head=12, d_model=768, d_ff=3072, max_len=1024),
}
TARGETS_OURS = ["*.attn.q_proj", "*.attn.k_proj", "*.attn.v_proj", "*.attn.out_proj"]


WORDS = [" the", " cat", " sat", " on", " a", " mat", " and", " dog", " ran", " to", " house", " with", " red",
         " door", " in", " big", " city", " of", " light", " day"]  # one SmolLM2 token each


def dpo_texts(args: argparse.Namespace) -> list[dict[str, str]]:
    """(steps + 1) x batch pairs of random one-token words: prompt seq/2 - 1 words, answers seq/2 words."""
    import random

    rng = random.Random(0)
    half = args.seq // 2

    def words(n: int) -> str:
        return "".join(rng.choice(WORDS) for _ in range(n))

    return [{"prompt": words(half), "chosen": words(half - 1), "rejected": words(half - 1)}
            for _ in range(args.batch * (args.steps + 1))]


def tokenizer_folder() -> str:
    """SmolLM2's tokenizer as a Hugging Face folder (tokenizer.json + tokenizer_config.json), made once."""
    import tempfile
    from pathlib import Path

    from torchbook.hub.gguf import default_chat_model
    from torchbook.hub.loading import load_gguf_tokenizer
    from torchbook.io import atomic_write_json

    folder = Path(tempfile.gettempdir()) / "torchbook-bench-smollm2-tokenizer"
    if not (folder / "tokenizer_config.json").exists():
        loaded = load_gguf_tokenizer(default_chat_model())
        folder.mkdir(exist_ok=True)
        loaded.tokenizer.save(str(folder / "tokenizer.json"))
        atomic_write_json(folder / "tokenizer_config.json", {"tokenizer_class": "PreTrainedTokenizerFast",
                                                             "eos_token": loaded.meta["eos_token"],
                                                             "pad_token": loaded.meta["eos_token"]})
    return str(folder)


def dpo_child(args: argparse.Namespace) -> dict[str, object]:
    import torch

    from torchbook.models.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    texts = dpo_texts(args)
    lora = args.mode == "dpo-lora"
    times: list[float] = []
    tokens = 0
    if args.impl == "ours":
        from tokenizers import Tokenizer

        from torchbook.nn.lora import apply_lora
        from torchbook.train.config import TrainConfig
        from torchbook.train.preference import PairData, PairExample, add_reference_logps, dpo_step, pair_collate
        from torchbook.train.trainer import Trainer

        model = GPT(GPTConfig(**SHAPES[args.shape]))  # type: ignore[arg-type]
        hf_like_init(model)
        tokenizer = Tokenizer.from_file(args.tokenizer + "/tokenizer.json")
        eos: int = tokenizer.token_to_id("<|im_end|>")  # type: ignore[assignment]

        def ids(text: str) -> list[int]:
            return list(tokenizer.encode(text, add_special_tokens=False).ids)

        examples = []
        for t in texts:
            prompt = ids(t["prompt"])
            sides = [ids(t[side]) + [eos] for side in ("chosen", "rejected")]
            (c_ids, c_labels), (r_ids, r_labels) = [(prompt + s, [-100] * (len(prompt) - 1) + s + [-100]) for s in sides]
            examples.append(PairExample(c_ids, c_labels, r_ids, r_labels))
        data = PairData.of(examples)
        add_reference_logps(model, data, args.batch, eos)
        if lora:
            apply_lora(model, 8, 16.0, 0.0, TARGETS_OURS)
        trainable = [p for p in model.parameters() if p.requires_grad]
        config = TrainConfig(epochs=1, batch_size=args.batch, lr=1e-4, optimizer="adamw", device="cpu",
                             progress=False, max_steps=args.steps + 1, restore_best=False, log_every=0,
                             activation_checkpointing=args.checkpointing == "on")
        trainer = Trainer(model, config, None, data, step=dpo_step(0.1), collate_fn=pair_collate(eos))

        class Clock:
            def on_step_end(self, trainer: Trainer, loss: float) -> None:
                times.append(time.perf_counter())

        trainer.callbacks.append(Clock())
        trainer.fit()
        tokens = sum(len(e.chosen_ids) + len(e.rejected_ids) for e in examples[args.batch:])
    else:
        from datasets import Dataset
        from peft import LoraConfig
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, TrainerCallback
        from trl import DPOConfig, DPOTrainer

        from torchbook.hub.hf import hf_config_dict

        hf_config = hf_config_dict(GPTConfig(**SHAPES[args.shape]))  # type: ignore[arg-type]
        kind = hf_config.pop("model_type")
        hf = AutoModelForCausalLM.from_config(AutoConfig.for_model(kind, **hf_config))
        hf_tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
        dpo_args = DPOConfig(output_dir=tempfile_dir(), beta=0.1, per_device_train_batch_size=args.batch,
                             max_steps=args.steps + 1, learning_rate=1e-4, lr_scheduler_type="constant",
                             report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True, bf16=False,
                             max_length=None, precompute_ref_log_probs=True, dataloader_num_workers=0,
                             gradient_checkpointing=args.checkpointing == "on")
        peft_config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]) if lora else None
        dpo_trainer: Any = DPOTrainer(model=hf, args=dpo_args, train_dataset=Dataset.from_list(texts),
                             processing_class=hf_tokenizer, peft_config=peft_config)

        class TrlClock(TrainerCallback):  # type: ignore[misc]
            def on_step_end(self, *a: object, **k: object) -> None:
                times.append(time.perf_counter())

        dpo_trainer.add_callback(TrlClock())
        dpo_trainer.train()
        trainable = [p for p in dpo_trainer.model.parameters() if p.requires_grad]
        tokens = sum(2 * len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"])
                     for r in list(dpo_trainer.train_dataset)[args.batch:])
    n_trainable = sum(p.numel() for p in trainable)
    seconds = times[-1] - times[0]
    return {"shape": args.shape, "impl": args.impl, "mode": args.mode, "checkpointing": args.checkpointing,
            "batch": args.batch, "seq": args.seq, "timed_steps": args.steps,
            "tokens_per_s": tokens / seconds,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "trainable": n_trainable, "grad_and_adam_gb": n_trainable * 4 * 3 / 2**30}


def trl_sft(args: argparse.Namespace, hf: Any, tokens: Any, clocks: list[tuple[float, float]],
            lora_config: Any) -> dict[str, object]:
    """TRL's `SFTTrainer` on the same model and token rows (pre-tokenized: no template, every token counted, no
    packing), AdamW at lr 1e-4 without a schedule, LoRA (PEFT's, as for PEFT's setting) through its `peft_config`."""
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    sft_args = SFTConfig(output_dir=tempfile_dir(), per_device_train_batch_size=args.batch, max_steps=args.steps + 1,
                         learning_rate=1e-4, lr_scheduler_type="constant", optim="adamw_torch", report_to=[],
                         save_strategy="no", logging_strategy="no", use_cpu=True, bf16=False, max_length=args.seq,
                         packing=False, dataloader_num_workers=0, gradient_checkpointing=args.checkpointing == "on",
                         gradient_checkpointing_kwargs={"use_reentrant": False}, pad_to_multiple_of=None)
    rows = Dataset.from_list([{"input_ids": row.tolist()} for row in tokens])
    trainer: Any = SFTTrainer(model=hf, args=sft_args, train_dataset=rows, peft_config=lora_config,
                              processing_class=AutoTokenizer.from_pretrained(tokenizer_folder()))
    times: list[float] = []

    class Clock(TrainerCallback):  # type: ignore[misc]
        def on_step_end(self, *a: object, **k: object) -> None:
            times.append(time.perf_counter())
            clocks.append(cpu_seconds())

    trainer.add_callback(Clock())
    trainer.train()
    return sft_record(args, times, clocks, [p for p in trainer.model.parameters() if p.requires_grad])


def sft_record(args: argparse.Namespace, times: list[float], clocks: list[tuple[float, float]],
               trainable: list[Any]) -> dict[str, object]:
    """One SFT setting's figures from its step end times and CPU clocks (the first step is the warm-up)."""
    n_trainable = sum(p.numel() for p in trainable)
    tokens = args.steps * args.batch * args.seq
    cpu, system = clocks[-1][0] - clocks[0][0], clocks[-1][1] - clocks[0][1]
    return {"shape": args.shape, "impl": args.impl, "mode": args.mode, "checkpointing": args.checkpointing,
            "batch": args.batch, "seq": args.seq, "timed_steps": args.steps,
            "tokens_per_s": tokens / (times[-1] - times[0]), "tokens_per_cpu_s": tokens / cpu,
            "cpu_s_per_step": cpu / args.steps, "sys_s_per_step": system / args.steps,
            "release_memory": args.release_memory if args.impl == "ours" else "-", "allocator": allocator_in_use(),
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "trainable": n_trainable, "grad_and_adam_gb": n_trainable * 4 * 3 / 2**30}


def tempfile_dir() -> str:
    import tempfile

    return tempfile.mkdtemp(prefix="torchbook-bench-trl-")


def hf_like_init(model: Any) -> None:
    """transformers' initialisation for Llama and GPT-2 (initializer_range 0.02): every linear and embedding weight
    normal(0, 0.02), biases 0; norms keep their ones."""
    import torch
    from torch import nn

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.normal_(0.0, 0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                module.bias.zero_()


def cpu_seconds() -> tuple[float, float]:
    """(user + system, system) CPU seconds of this process so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime, usage.ru_stime


def child(args: argparse.Namespace) -> dict[str, object]:
    import torch

    if args.mode.startswith("dpo"):
        return dpo_child(args)

    from torchbook.models.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    model = GPT(GPTConfig(**SHAPES[args.shape]))  # type: ignore[arg-type]
    hf_like_init(model)
    tokens = torch.randint(0, model.config.vocab_size, (args.batch * (args.steps + 1), args.seq))
    clocks: list[tuple[float, float]] = []
    if args.impl == "ours":
        from torch.utils.data import TensorDataset

        from torchbook.nn.lora import apply_lora
        from torchbook.train.config import TrainConfig
        from torchbook.train.steps import sft_step
        from torchbook.train.trainer import Trainer

        if args.mode != "full":
            targets = TARGETS_OURS if args.shape == "smollm2" else ["*.attn.*_proj"]
            apply_lora(model, 8, 16.0, 0.0, targets, quantize_base=args.mode == "qlora")
        trainable = [p for p in model.parameters() if p.requires_grad]
        config = TrainConfig(epochs=1, batch_size=args.batch, lr=1e-4, optimizer="adamw", device="cpu",
                             progress=False, max_steps=args.steps + 1, restore_best=False, log_every=0,
                             activation_checkpointing=args.checkpointing == "on",
                             release_memory=args.release_memory == "on")
        data = TensorDataset(tokens, tokens.roll(-1, dims=1))
        trainer = Trainer(model, config, None, data, step=sft_step)
        times: list[float] = []

        class Clock:
            def on_step_end(self, trainer: Trainer, loss: float) -> None:
                times.append(time.perf_counter())
                clocks.append(cpu_seconds())

        trainer.callbacks.append(Clock())
        trainer.fit()
    else:
        from peft import LoraConfig, get_peft_model
        from transformers import AutoConfig, AutoModelForCausalLM

        from torchbook.hub.hf import hf_config_dict

        hf_config = hf_config_dict(model.config)
        del model
        kind = hf_config.pop("model_type")
        torch.manual_seed(0)
        hf = AutoModelForCausalLM.from_config(AutoConfig.for_model(kind, **hf_config))  # initialised as hf_like_init
        if args.checkpointing == "on":
            hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            hf.enable_input_require_grads()
        modules = ["q_proj", "k_proj", "v_proj", "o_proj"] if kind != "gpt2" else ["attn.c_attn", "attn.c_proj"]
        lora_config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=modules,
                                 fan_in_fan_out=kind == "gpt2") if args.mode == "lora" else None
        if args.impl == "trl":
            return trl_sft(args, hf, tokens, clocks, lora_config)
        if lora_config is not None:
            hf = get_peft_model(hf, lora_config)
        hf.train()
        trainable = [p for p in hf.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=1e-4)
        times = []
        for step in range(args.steps + 1):
            batch = tokens[step * args.batch : (step + 1) * args.batch]
            hf(input_ids=batch, labels=batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            times.append(time.perf_counter())
            clocks.append(cpu_seconds())
    return sft_record(args, times, clocks, trainable)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="smollm2,gpt2")
    parser.add_argument("--settings", default="ours:full,ours:lora,ours:qlora,peft:full,peft:lora")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3, help="timed steps (after one warm-up step)")
    parser.add_argument("--checkpointing", default="on,off")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1, help="run the settings' list this many times")
    parser.add_argument("--release-memory", default="on", choices=["on", "off"],
                        help="ours: TrainConfig.release_memory (freed buffers returned at once: lower peak, page faults)")
    parser.add_argument("--allocator", default="cli", choices=["cli", "system"],
                        help="ours: the allocator the torchbook command runs on (cli: jemalloc when installed, "
                             "torchbook.allocator) or the C library's (system)")
    parser.add_argument("--peer-allocator", default="system", choices=["system", "jemalloc"],
                        help="the peers' processes: the C library's allocator (what their users get) or jemalloc")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--shape", help=argparse.SUPPRESS)
    parser.add_argument("--impl", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--tokenizer", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        guard = guard_dirty_pages()  # as the torchbook command does: on jemalloc, kept freed pages capped
        result = child(args)
        result["dirty_page_purges"] = guard.purges if guard else "-"
        print("RESULT " + json.dumps(result))
        return
    tokenizer = tokenizer_folder() if "dpo" in args.settings else ""
    system_env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MALLOC_CONF")}
    for shape in args.shapes.split(","):
        for checkpointing in args.checkpointing.split(","):
            for setting in args.settings.split(",") * args.repeats:
                impl, mode = setting.split(":")
                command = [sys.executable, __file__, "--child", "--shape", shape, "--impl", impl, "--mode", mode,
                           "--checkpointing", checkpointing, "--batch", str(args.batch), "--seq", str(args.seq),
                           "--steps", str(args.steps), "--threads", str(args.threads), "--tokenizer", tokenizer,
                           "--release-memory", args.release_memory]
                faster = args.allocator == "cli" if impl == "ours" else args.peer_allocator == "jemalloc"
                env = (with_faster_allocator(system_env) or system_env) if faster else system_env
                out = subprocess.run(command, capture_output=True, text=True, env=env)
                line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
                if line is None:
                    print(json.dumps({"shape": shape, "setting": setting, "checkpointing": checkpointing,
                                      "error": out.stderr.strip().splitlines()[-1:]}), flush=True)
                    continue
                result = json.loads(line[7:])
                print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()}),
                      flush=True)


if __name__ == "__main__":
    main()
