"""`chat-rlhf`: reinforcement learning from human feedback with PPO (book chapter 15; PPO itself: chapter 19).

The policy (a chat model: SmolLM2-135M-Instruct offline, a `chat-sft`/`chat-dpo` run, or the `gpt-pretrain` run's
small GPT) answers prompts; each answer is scored by a reward: a `reward-model` run (`reward=<run folder>`) or a
rule (`reward=rule`: 1 when the answer contains `word`, else 0). PPO then raises the expected reward while a
per-token KL penalty keeps the policy near the reference (the model before training, or the policy with its LoRA
adapters off):

    reward of token t = -kl_coef (log pi(a_t|s_t) - log pi_ref(a_t|s_t)) [+ the answer's score at its last token]
    advantages = GAE over the answer's tokens (`torchbook.rl.ppo.gae`), value head V(s) on the policy's hidden states
    loss = the clipped surrogate + value loss (`torchbook.rl.ppo.ppo_loss`), a few epochs per batch of rollouts

Rollouts are sampled on the serving engine (`torchbook.generate.serving.Engine`, one seeded request per prompt).
`kl_coef` adapts toward `kl_target` (Ziegler et al., 2019). The loop is PPO's own (rollout, score, update), like
`rl/ppo.py`'s for environments, not the supervised trainer's: there is no fixed dataset to iterate. Checkpoints
every `checkpoint_every` updates make a run resumable, ending with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import copy
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from tqdm import tqdm

import torchbook
from torchbook.checkpoint import load_latest, save_checkpoint
from torchbook.data.instructions import (
    SELF_INSTRUCT_SOURCE,
    USER_ORIENTED_SOURCE,
    Conversation,
    load_seed_tasks,
    load_user_oriented,
)
from torchbook.devices import device_of
from torchbook.errors import UserInputError
from torchbook.hub.peft import save_adapter
from torchbook.models.gpt import GPT
from torchbook.nn.lora import ATTENTION_TARGETS, apply_lora, merge_lora
from torchbook.recipes import Recipe
from torchbook.report import Report
from torchbook.runs import RUNS_ROOT, RunDir
from torchbook.train.preference import (
    IGNORE,
    KLController,
    Pair,
    PairData,
    RewardModel,
    ValueHead,
    adapters_off,
    labelled_logps,
    load_pairs,
    pad_id_of,
    pair_collate,
    ppo_update,
    prompt_ids,
    reward_meta,
    rollout,
    score_rollout,
    spread,
)
from torchbook.train.sft import DEFAULT_MODEL, FORMATS, TINY, answer, load_chat_model, save_chat_model

NAME = "chat-rlhf"
log = logging.getLogger(__name__)
PRETRAINED = "gpt-pretrain"  # the newest finished gpt-pretrain run under runs/


@dataclass
class Config:
    model: str = DEFAULT_MODEL  # smollm2, tiny, gpt-pretrain (the newest such run) or a path torchbook.load reads
    reward: str = "rule"  # rule, or a reward-model run folder
    word: str = "love"  # reward=rule: an answer scores 1 when it contains this word (any case), else 0
    prompts: str = "hh"  # hh (the train part's dialogues) or self-instruct (the 175 seed tasks)
    format: str = "template"  # template (the checkpoint's chat template) or book ("Human: ...\n\nAssistant:")
    max_prompt_tokens: int = 128  # the last so many tokens of each prompt
    max_new_tokens: int = 48
    temperature: float = 1.0
    updates: int = 100  # batches of rollouts
    batch_size: int = 16  # prompts (one answer each) per update
    ppo_epochs: int = 4
    minibatches: int = 2
    lr: float = 1e-5
    clip: float = 0.2
    vf_coef: float = 0.1
    ent_coef: float = 0.0
    max_grad_norm: float = 1.0
    gamma: float = 1.0
    gae_lambda: float = 0.95
    kl_coef: float = 0.05  # initial coefficient of the per-token KL penalty
    kl_target: float = 6.0  # nats per answer the adaptive coefficient aims at (0: a fixed coefficient)
    kl_horizon: int = 10_000
    eval_prompts: int = 32  # test dialogues answered (sampled, seeded) before and after: mean reward and KL
    answers: int = 3  # user-oriented instructions answered before and after (greedy)
    answer_tokens: int = 64
    lora: bool = False
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: list[str] = field(default_factory=lambda: list(ATTENTION_TARGETS))
    checkpoint_every: int = 0  # updates between checkpoints (0: none); resumable when > 0
    keep_checkpoints: int = 2
    time_budget_s: float = 0.0  # stop cleanly after this much training time (0: no limit)
    seed: int = 42
    device: str = "auto"
    progress: bool = True

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "smoke": {"model": TINY, "updates": 2, "batch_size": 4, "max_new_tokens": 8, "ppo_epochs": 1,
                  "minibatches": 1, "eval_prompts": 4, "answers": 1, "answer_tokens": 8, "max_prompt_tokens": 48,
                  "lr": 1e-3, "word": "the", "progress": False},
        # The gpt-pretrain quick run's small GPT (`torchbook run gpt-pretrain --preset quick` first) learns to say
        # "love": the rule reward, the book's role tags, 32-token answers, under 3 minutes of training.
        "quick": {"model": PRETRAINED, "format": "book", "word": "love", "prompts": "self-instruct",
                  "max_prompt_tokens": 48, "max_new_tokens": 32, "updates": 40, "batch_size": 16, "lr": 3e-4,
                  "kl_coef": 0.1, "kl_target": 10.0, "kl_horizon": 1000, "eval_prompts": 64, "answers": 2,
                  "answer_tokens": 32,
                  "time_budget_s": 170.0},
        # SmolLM2 against a reward-model run (`reward=runs/reward-model/<id>`): 100 updates of 16 answers of up to
        # 48 tokens, lr 1e-5, full fine-tuning (hours on 2 cores, not run here); resumable.
        "book": {"reward": "", "checkpoint_every": 5},
    }

    def validate(self) -> None:
        if self.format not in FORMATS:
            raise UserInputError(f"format={self.format!r}; accepted: {', '.join(FORMATS)}", param="format")
        if self.prompts not in ("hh", "self-instruct"):
            raise UserInputError(f"prompts={self.prompts!r}; accepted: hh, self-instruct", param="prompts")
        if not self.reward:
            raise UserInputError("give reward=rule or reward=<a reward-model run folder>", param="reward")
        if self.reward == "rule" and not self.word.strip():
            raise UserInputError("reward=rule needs a word to look for", param="word")
        for name in ("updates", "batch_size", "ppo_epochs", "minibatches", "max_new_tokens", "max_prompt_tokens"):
            if getattr(self, name) < 1:
                raise UserInputError(f"{name}={getattr(self, name)} must be at least 1", param=name)
        if self.minibatches > self.batch_size:
            raise UserInputError(f"minibatches={self.minibatches} must be at most batch_size={self.batch_size}",
                                 param="minibatches")
        if self.temperature <= 0:
            raise UserInputError(f"temperature={self.temperature} must be > 0 (rollouts are sampled)",
                                 param="temperature")


def resolve_model(name: str) -> str:
    """`gpt-pretrain`: the newest finished run of that recipe under runs/; anything else as it is."""
    if name != PRETRAINED:
        return name
    runs = sorted((p for p in (RUNS_ROOT / PRETRAINED).glob("*") if (p / "model").is_dir()), reverse=True)
    if not runs:
        raise UserInputError(f"model=gpt-pretrain needs a finished gpt-pretrain run under {RUNS_ROOT}/{PRETRAINED}/; "
                             "train one first (its quick preset takes about 2 minutes) or give its folder",
                             param="model")
    return str(runs[0])


Scorer = Callable[[list[Conversation], list[str]], torch.Tensor]


def rule_scorer(word: str) -> Scorer:
    def score(prompts: list[Conversation], texts: list[str]) -> torch.Tensor:
        return torch.tensor([1.0 if word.lower() in text.lower() else 0.0 for text in texts])

    return score


def model_scorer(path: str) -> Scorer:
    """Scores from a `reward-model` run: its reward of the dialogue with the answer, in its own format."""
    loaded = torchbook.load(path)
    if not isinstance(loaded.model, RewardModel):
        raise UserInputError(f"reward={path!r} is not a reward-model run", param="reward")
    reward_model, meta = loaded.model.eval(), reward_meta(loaded.meta)
    fmt = meta["extra"].get("format", "template")
    pad_id = pad_id_of(loaded.tokenizer, meta)

    @torch.no_grad()
    def score(prompts: list[Conversation], texts: list[str]) -> torch.Tensor:
        data = PairData([Pair(p, t or " ", t or " ") for p, t in zip(prompts, texts)], loaded.tokenizer, meta, fmt,
                        reward_model.config.max_len)
        inputs, _, lengths, _ = pair_collate(pad_id)(data.examples)
        return reward_model(inputs, lengths)[: len(data)].float()

    return score


def training_prompts(config: Config) -> tuple[list[Conversation], list[Conversation], str]:
    """Training prompts, evaluation prompts (the test part's dialogues) and the training prompts' source."""
    splits, source = load_pairs("hh")
    evaluation = [p.prompt for p in splits["test"][: config.eval_prompts]]
    if config.prompts == "self-instruct":
        return [c[:1] for c in load_seed_tasks()], evaluation, SELF_INSTRUCT_SOURCE
    return [p.prompt for p in splits["train"]], evaluation, source + "; the train part's dialogues"


@torch.no_grad()
def measure(policy: GPT, reference: torch.nn.Module | None, loaded: Any, prompts: list[Conversation],
            scorer: Scorer, config: Config) -> dict[str, Any]:
    """Mean reward and KL to the reference of answers sampled (seeded) to the evaluation prompts."""
    room = policy.config.max_len - config.max_new_tokens
    ids = [prompt_ids(loaded.tokenizer, loaded.meta, p, config.format, min(config.max_prompt_tokens, room))
           for p in prompts]
    batch = rollout(policy, loaded.tokenizer, ids, config.max_new_tokens, config.temperature, config.seed + 10**6,
                    loaded.meta["end_token_ids"], stop_strings(config))
    scores = scorer(prompts, batch.texts)
    logps, _, _ = labelled_logps(policy, batch.inputs, batch.labels)
    if reference is None:
        with adapters_off(policy):
            ref, _, _ = labelled_logps(policy, batch.inputs, batch.labels)
    else:
        ref, _, _ = labelled_logps(reference, batch.inputs, batch.labels)
    kl = spread(logps - ref, batch.labels).sum(1)
    return {"reward": scores.mean().item(), "reward_std": scores.std().item() if len(scores) > 1 else 0.0,
            "kl": kl.mean().item(), "answers": len(scores), "examples": batch.texts[:3]}


def stop_strings(config: Config) -> list[str]:
    return ["\n\nHuman:"] if config.format == "book" else []


def run(config: Config, run_dir: RunDir | str | None = None) -> RunDir:
    started = time.time()
    config.validate()
    run = RunDir.start(run_dir, NAME, config)
    base_model = resolve_model(config.model)
    loaded = load_chat_model(base_model, config.seed)
    if config.format == "template" and not loaded.meta.get("chat_template"):
        raise UserInputError(f"model={config.model!r} has no chat template; use format=book", param="format")
    policy: GPT = loaded.model.float()
    device = torch.device("cuda" if config.device == "auto" and torch.cuda.is_available() else
                          "cpu" if config.device == "auto" else config.device)
    scorer = rule_scorer(config.word) if config.reward == "rule" else model_scorer(config.reward)
    train_prompts, eval_prompts, source = training_prompts(config)
    room = policy.config.max_len - config.max_new_tokens
    if room < 8:
        raise UserInputError(f"max_new_tokens={config.max_new_tokens} leaves no room for a prompt in the model's "
                             f"{policy.config.max_len} positions", param="max_new_tokens")
    prompt_limit = min(config.max_prompt_tokens, room)
    encoded = [prompt_ids(loaded.tokenizer, loaded.meta, p, config.format, prompt_limit) for p in train_prompts]
    run.write_json("split.json", {"train_prompts": {"source": source, "prompts": len(encoded)},
                                  "evaluation": {"source": "HH-RLHF test part's dialogues (load_pairs)",
                                                 "prompts": len(eval_prompts)},
                                  "answered": {"source": USER_ORIENTED_SOURCE, "first": config.answers}})
    questions = load_user_oriented()[: config.answers]
    reference = None
    if config.lora:
        apply_lora(policy, config.lora_rank, config.lora_alpha, 0.0, config.lora_targets)
    else:
        reference = copy.deepcopy(policy).eval().requires_grad_(False)
    value_head = ValueHead(policy.config.d_model)
    policy.to(device), value_head.to(device)
    reference = reference.to(device) if reference is not None else None
    before = measure(policy, reference, loaded, eval_prompts, scorer, config)
    answers_before = answer(policy, loaded, questions, config.format, config.answer_tokens)
    params = [p for p in [*policy.parameters(), *value_head.parameters()] if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, eps=1e-5)
    controller = KLController(config.kl_coef, config.kl_target, config.kl_horizon)
    first, train_time = 0, 0.0
    if config.checkpoint_every:
        state, _ = load_latest(run.checkpoints)
        if state is not None:
            policy.load_state_dict(state["policy"])
            value_head.load_state_dict(state["value_head"])
            optimizer.load_state_dict(state["optimizer"])
            first, train_time, controller.value = state["update"], state["train_time"], state["kl_coef"]
            run.truncate_metrics(lambda r: r.get("kind") != "update" or r["update"] <= first)
            log.info("resumed at update %d", first)
    end_ids = loaded.meta["end_token_ids"]
    update = first
    bar = tqdm(total=config.updates, initial=first, desc="PPO updates", disable=None if config.progress else True,
               leave=False, file=sys.stderr)
    for update in range(first, config.updates):
        tick = time.perf_counter()
        torch.manual_seed(config.seed * 100_003 + update)
        rows = torch.randint(len(encoded), (config.batch_size,)).tolist()
        batch = rollout(policy, loaded.tokenizer, [encoded[r] for r in rows], config.max_new_tokens,
                        config.temperature, config.seed * 100_003 + update * config.batch_size, end_ids,
                        stop_strings(config))
        scores = scorer([train_prompts[r] for r in rows], batch.texts)
        score_rollout(batch, policy, value_head, reference, scores, controller.value, config.gamma, config.gae_lambda)
        generator = torch.Generator().manual_seed(config.seed + update)
        stats = ppo_update(policy, value_head, optimizer, batch, config.ppo_epochs, config.minibatches, config.clip,
                           config.vf_coef, config.ent_coef, config.max_grad_norm, generator)
        kl = batch.kl.mean().item()  # type: ignore[union-attr]
        run.log(kind="update", update=update + 1, reward=scores.mean().item(), kl=kl, kl_coef=controller.value,
                answer_tokens=int((batch.labels != IGNORE).sum()) / len(rows), **stats)
        controller.update(kl, len(rows))
        bar.update(1)
        bar.set_postfix(reward=f"{scores.mean().item():.3f}", kl=f"{kl:.2f}")
        train_time += time.perf_counter() - tick
        done = update + 1
        budget_out = bool(config.time_budget_s and train_time >= config.time_budget_s)
        if config.checkpoint_every and (done % config.checkpoint_every == 0 or done == config.updates or budget_out):
            save_checkpoint(run.checkpoints, done, {
                "policy": policy.state_dict(), "value_head": value_head.state_dict(),
                "optimizer": optimizer.state_dict(), "update": done, "train_time": train_time,
                "kl_coef": controller.value}, config.keep_checkpoints)
        if budget_out:
            log.info("time budget reached after %d updates", done)
            break
    bar.close()
    after = measure(policy, reference, loaded, eval_prompts, scorer, config)
    policy.cpu()
    if config.lora:
        save_adapter(policy, run.path / "adapter", base_model=config.model)
        merge_lora(policy)
    answers_after = answer(policy, loaded, questions, config.format, config.answer_tokens)
    save_chat_model(policy, run.model_dir, loaded)
    updates = run.metrics("update")
    results = {"base_model": base_model, "before": before, "after": after, "train_time_s": train_time, "updates": len(updates),
               "max_kl": max((r["kl"] for r in updates), default=0.0), "kl_target": config.kl_target,
               "answers": [{"instruction": q[0]["content"], "before": b, "after": a}
                           for q, b, a in zip(questions, answers_before, answers_after)]}
    run.write_json("results.json", results)
    run.log(kind="eval", reward_before=before["reward"], reward_after=after["reward"], kl_after=after["kl"])
    report_run(run, config, results, source, started, updates)
    return run


def report_run(run: RunDir, config: Config, results: dict[str, Any], source: str, started: float,
               updates: list[dict[str, Any]]) -> None:
    from torchbook.plots import line_plot  # matplotlib: imported when a report is drawn

    report = Report("RLHF with PPO", NAME, "15, 19", source)
    reward = f"the rule reward (contains {config.word!r})" if config.reward == "rule" else f"the reward model {config.reward}"
    before, after = results["before"], results["after"]
    note = f"{after['answers']} test dialogues, one sampled answer each (seeded); the book prints no figure"
    report.compare("mean reward before", before["reward"], None, f"{reward}; {note}")
    report.compare("mean reward after", after["reward"], None, f"gain {after['reward'] - before['reward']:+.3f}")
    report.compare("KL to the reference after (nats per answer)", after["kl"], None,
                   f"target {config.kl_target}; 0 before (the same model)")
    report.compare("largest training-batch KL", results["max_kl"], None, f"over {results['updates']} updates")
    report.compare("training time (s)", results["train_time_s"], None,
                   f"{results['updates']} updates of {config.batch_size} answers of up to {config.max_new_tokens} "
                   "tokens" + (f", LoRA rank {config.lora_rank}" if config.lora else ", full fine-tuning"))
    if updates:
        x = [r["update"] for r in updates]
        line_plot(run.plots / "reward.png", {"mean reward": (x, [r["reward"] for r in updates])},
                  "Mean reward of each batch of rollouts", "update", "reward")
        line_plot(run.plots / "kl.png", {"KL to the reference": (x, [r["kl"] for r in updates]),
                                         "target": (x, [config.kl_target] * len(x))},
                  "KL per answer (nats)", "update", "KL")
        report.image("Reward", run.plots / "reward.png", run.path)
        report.image("KL to the reference", run.plots / "kl.png", run.path)
    rows = [(a["instruction"][:160].replace("\n", " "), a["before"][:300].replace("\n", " "),
             a["after"][:300].replace("\n", " ")) for a in results["answers"]]
    report.table("Held-out instructions, answered before and after (greedy)", ["instruction", "before", "after"],
                 rows)
    report.text("Model", f"`{config.model}` in the {config.format} format; the run's `model/` folder loads with "
                         "`torchbook.load` and `torchbook generate --chat`"
                + ("; `adapter/` holds the LoRA adapter in PEFT's format." if config.lora else "."))
    report.write(run.path, time.time() - started)


def evaluate(run_dir: RunDir | str | Path, device: str = "auto") -> dict[str, Any]:
    """Reload a finished run's policy and measure the mean reward and KL on the evaluation prompts again."""
    run = RunDir.open(run_dir)
    config = run.load_config(Config)
    loaded = torchbook.load(run.path, map_location=device)
    reference = load_chat_model(run.read_json("results.json")["base_model"], config.seed).model.float().eval()
    reference.to(device_of(loaded.model))
    scorer = rule_scorer(config.word) if config.reward == "rule" else model_scorer(config.reward)
    _, eval_prompts, _ = training_prompts(config)
    return measure(loaded.model.float(), reference, loaded, eval_prompts, scorer, config)


RECIPE = Recipe(NAME, "15", "RLHF: PPO on a chat model against a reward model or a rule, per-token KL penalty",
                Config, run, evaluate)
