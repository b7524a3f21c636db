"""The steps of benchmarks/gpu_check.sh (see there). One line per step: `OK`, `FAIL` (with the error's last line)
or `SKIP` (a package this machine lacks); exit status 1 if any step failed."""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEVICE_TESTS = ["tests/test_devices.py", "tests/test_gpt_parity.py", "tests/test_generate_text.py",
                "tests/test_generate_engine.py", "tests/test_recipes_ch10.py", "tests/test_lm_recipes.py",
                "tests/test_ridership.py", "tests/test_translation_recipes.py", "tests/test_quantized.py"]
MISSING = re.compile(r"No module named '([\w.]+)'")


@dataclasses.dataclass
class Step:
    name: str
    command: list[str]
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    timeout: float = 240.0


def run_step(step: Step) -> tuple[str, str, float]:
    started = time.perf_counter()
    try:
        result = subprocess.run(step.command, capture_output=True, text=True, timeout=step.timeout, cwd=ROOT,
                                env={**os.environ, **step.env})
    except subprocess.TimeoutExpired:
        return "FAIL", f"timed out after {step.timeout:.0f} s", time.perf_counter() - started
    seconds = time.perf_counter() - started
    output = result.stdout + result.stderr
    if result.returncode == 0:
        return "OK", "", seconds
    missing = MISSING.search(output)
    if missing:
        return "SKIP", f"needs {missing.group(1).split('.')[0]}, which this machine lacks", seconds
    last = [line for line in output.strip().splitlines() if line.strip()]
    return "FAIL", (last[-1] if last else f"exit {result.returncode}")[:300], seconds


def recipe_steps(device: str, work: Path) -> list[Step]:
    """The smoke preset of every recipe whose config has `device`, with bf16 where the config has `precision`."""
    sys.path.insert(0, str(ROOT))
    from torchbook.recipes import module_name, recipe_infos

    steps = []
    for name in recipe_infos():
        try:
            module = __import__(module_name(name), fromlist=["Config"])
        except ModuleNotFoundError as e:
            steps.append(Step(f"recipe {name}", [sys.executable, "-c", f"raise ModuleNotFoundError(\"No module named '{e.name}'\")"]))
            continue
        fields = {f.name for f in dataclasses.fields(module.Config)}
        if "device" not in fields:
            continue
        overrides = [f"device={device}"] + (["precision=bf16"] if "precision" in fields else [])
        steps.append(Step(f"recipe {name} ({' '.join(overrides)})",
                          [sys.executable, "-m", "torchbook", "run", name, "--preset", "smoke", *overrides,
                           "--run-dir", str(work / "runs" / name), "--overwrite"]))
    return steps


TINY_LLAMA = """
import sys
from pathlib import Path
import torch
from torchbook.data.tokenizers import train_bpe
from torchbook.hub.hf import save_hf
from torchbook.models.gpt import GPT, GPTConfig
folder = Path(sys.argv[1])
torch.manual_seed(0)
text = "Once upon a time there was a small model that ran on a GPU and on a CPU alike. " * 20
tokenizer = train_bpe([text], 300)
config = GPTConfig(vocab_size=tokenizer.get_vocab_size(), n_layer=2, n_head=4, n_kv_head=2, d_model=64, d_ff=128,
                   max_len=256, norm="rmsnorm", mlp="swiglu", positions="rope", qkv_bias=False, out_bias=False,
                   mlp_bias=False, tie_embeddings=False)
save_hf(GPT(config), folder, tokenizer)
"""


def other_steps(device: str, work: Path, dry_run: bool) -> list[Step]:
    llama = work / "tiny-llama"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                "-m", "torchbook", "run", "image-classifier", "--preset", "smoke", f"device={device}"]
    pytest_env = {} if dry_run else {"CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "0")}
    return [
        Step("tiny random Llama (made here)", [sys.executable, "-c", TINY_LLAMA, str(llama)]),
        Step(f"torchbook generate on the tiny Llama (--device {device})",
             [sys.executable, "-m", "torchbook", "generate", str(llama), "Once upon a time", "--max-new-tokens",
              "16", "--device", device, "--no-stream"]),
        Step(f"torchbook generate --quantize int4 on the tiny Llama (--device {device})",
             [sys.executable, "-m", "torchbook", "generate", str(llama), "Once upon a time", "--max-new-tokens",
              "16", "--device", device, "--quantize", "int4", "--no-stream"]),
        Step("torchrun: 1-process DDP smoke", [*torchrun, "parallel=ddp", "--run-dir", str(work / "ddp")]),
        Step("torchrun: 1-process FSDP smoke", [*torchrun, "parallel=fsdp", "--run-dir", str(work / "fsdp")]),
        Step("pytest: the device-sensitive tests", [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                                                    *DEVICE_TESTS], env=pytest_env, timeout=600.0),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dry-run", action="store_true", help="the same steps on the CPU (device=cpu)")
    parser.add_argument("--jobs", type=int, default=4, help="recipe smoke runs at once (default 4)")
    parser.add_argument("--only", help="run only the steps whose name contains this text")
    args = parser.parse_args()
    import torch

    device = "cpu" if args.dry_run else "cuda"
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; use --dry-run to run the steps on the CPU", file=sys.stderr)
        return 2
    where = "CPU (dry run)" if args.dry_run else torch.cuda.get_device_name(0)
    print(f"gpu_check: torch {torch.__version__}, CUDA {torch.version.cuda}, {where}, Python {sys.version.split()[0]}",
          flush=True)
    os.environ.setdefault("TORCHBOOK_MIRROR", str(ROOT.parent / "shared" / "data"))
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    failed = False
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        work = Path(tmp)
        os.environ["TORCHBOOK_CACHE"] = str(work / "cache")
        steps = recipe_steps(device, work) + other_steps(device, work, args.dry_run)
        if args.only:
            steps = [s for s in steps if args.only in s.name]
        recipes = [s for s in steps if s.name.startswith("recipe ")]
        with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
            for step, (status, detail, seconds) in zip(recipes, pool.map(run_step, recipes)):
                failed |= status == "FAIL"
                print(f"{status:<4}  {step.name}  {seconds:.1f} s{'  ' + detail if detail else ''}", flush=True)
        for step in steps[len(recipes):]:  # in order: the model is made before it is used
            status, detail, seconds = run_step(step)
            failed |= status == "FAIL"
            print(f"{status:<4}  {step.name}  {seconds:.1f} s{'  ' + detail if detail else ''}", flush=True)
    print(f"gpu_check: {'FAILED' if failed else 'all steps passed or skipped'} in {time.perf_counter() - started:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
