"""Preference tuning (book chapter 15): what the `reward-model`, `chat-dpo` and `chat-rlhf` recipes share.

- Data: pairs of answers to the same prompt, one chosen and one rejected (`Pair`), from Anthropic HH-RLHF (split
  train/validation/test by a hash of the dialogue, the SFT recipe's `hh_split` for the test part) or a JSONL file of
  `prompt/chosen/rejected`; encoded like SFT examples with only the final answer's tokens labelled (`PairData`),
  batched chosen rows first, then rejected rows (`pair_collate`).
- Summed log-probabilities of the labelled tokens (the book's `sum_of_log_probas`: `sequence_logps`) and the DPO
  loss of equation 15-2 (`dpo_loss`, `dpo_step`), with the reference model's log-probabilities computed once
  before training (`add_reference_logps`): the policy at step 0 is the reference, for full fine-tuning and LoRA
  alike.
- A reward model: a scalar head on a decoder's final hidden state at the last token (`RewardModel`), trained with
  the Bradley-Terry loss (`reward_step`); held-out accuracy with its Wilson 95% interval and a one-sided binomial
  test against 0.5 (`accuracy_summary`).
- RLHF with PPO: rollouts sampled on the serving engine (`rollout`), per-token rewards = the score at the last token
  minus `kl_coef` x (log pi - log pi_ref) at every token (`token_rewards`), advantages by the RL library's `gae`,
  updates by its `ppo_loss` (`ppo_update`), a value head on the policy's hidden states (`ValueHead`), and the
  adaptive KL coefficient of Ziegler et al. (2019) (`KLController`).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from torch.utils.data import Dataset

from torchbook.data.instructions import HH_SOURCE, Conversation, hh_prompt, hh_split, load_hh, parse_hh
from torchbook.errors import DataUnavailable, UserInputError
from torchbook.generate import SamplingConfig
from torchbook.generate.serving import Engine, Request
from torchbook.models.gpt import GPT, GPTConfig
from torchbook.nn.lora import ATTENTION_TARGETS, lora_layers
from torchbook.rl.ppo import gae, ppo_loss
from torchbook.runs import RunDir
from torchbook.train.config import TrainConfig
from torchbook.train.sft import DEFAULT_MODEL, FORMATS, IGNORE, encode_conversation, labels_for, prompt_text
from torchbook.train.trainer import Step

ASSISTANT = "\n\nAssistant:"
SPLITS = ("train", "validation", "test")


# -- data ---------------------------------------------------------------------------------------------------------
@dataclass
class Pair:
    """A prompt (a conversation ending with the user's turn) and two answers to it."""

    prompt: Conversation
    chosen: str
    rejected: str


def hh_pair(record: dict[str, str]) -> Pair | None:
    """An HH-RLHF record as a `Pair`: the shared dialogue (`hh_prompt`) and the two last assistant turns; None when
    the record has no shared dialogue ending before an assistant turn, or the answers are equal or empty."""
    prompt = hh_prompt(record)
    answers = []
    for side in ("chosen", "rejected"):
        rest = record[side][len(prompt):]
        if not rest.startswith(ASSISTANT):
            return None
        answers.append(rest[len(ASSISTANT):].strip())
    messages = parse_hh(prompt)
    if not messages or messages[-1]["role"] != "user" or not all(answers) or answers[0] == answers[1]:
        return None
    return Pair(messages, answers[0], answers[1])


def _fraction(text: str, salt: str) -> float:
    return int.from_bytes(hashlib.sha256((salt + text).encode("utf-8")).digest()[:8], "big") / 2**64


def split_of(prompt_key: str, record: dict[str, str] | None, test_fraction: float = 0.1,
             validation_fraction: float = 0.1) -> str:
    """"train", "validation" or "test": test by the SFT recipe's `hh_split` (HH records), validation by a second hash
    of the dialogue within the rest, so that SFT never trained on a preference test dialogue."""
    if record is not None:
        if hh_split(record, test_fraction) == "test":
            return "test"
    elif _fraction(prompt_key, "") < test_fraction:
        return "test"
    return "validation" if _fraction(prompt_key, "validation:") < validation_fraction else "train"


def load_jsonl_pairs(path: str | Path) -> list[tuple[Pair, str]]:
    """Pairs from a JSONL file of {"prompt", "chosen", "rejected"} (the prompt a string or a list of messages)."""
    pairs = []
    opener: Any = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            lines = [line for line in f if line.strip()]
    except OSError as e:
        raise UserInputError(f"cannot read {str(path)!r}: {e}", param="data") from None
    for i, line in enumerate(lines):
        try:
            row = json.loads(line)
            prompt = row["prompt"]
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [
                {"role": m["role"], "content": m["content"]} for m in prompt]
            pair = Pair(messages, str(row["chosen"]), str(row["rejected"]))
        except (json.JSONDecodeError, KeyError, TypeError):
            raise UserInputError(f"{path}: line {i + 1} is not a JSON object with prompt, chosen and rejected",
                                 param="data") from None
        pairs.append((pair, split_of(json.dumps(messages), None)))
    return pairs


ANTHROPIC_REPO = "Anthropic/hh-rlhf"  # the book's dataset: every part, train and test files (~170k dialogues)
ANTHROPIC_FILES = [f"{part}/{name}.jsonl.gz" for part in ("harmless-base", "helpful-base", "helpful-online",
                                                           "helpful-rejection-sampled") for name in ("train", "test")]
ANTHROPIC_SOURCE = ("Anthropic HH-RLHF (MIT), all of Anthropic/hh-rlhf on the Hugging Face Hub (the book's), re-split "
                    "by a hash of the dialogue (test: hh_split)")


def load_anthropic_hh() -> list[dict[str, str]]:
    """Every record of the book's `Anthropic/hh-rlhf` (online, or huggingface_hub's cache); offline and not cached:
    `DataUnavailable` naming the offline alternative."""
    from huggingface_hub import hf_hub_download  # optional and slow to import: only data=anthropic needs it

    records: list[dict[str, str]] = []
    for name in ANTHROPIC_FILES:
        try:
            path = hf_hub_download(ANTHROPIC_REPO, name, repo_type="dataset")
        except Exception as error:  # offline or unreachable, and not in the cache
            reason = str(error).splitlines()[0][:160] if str(error) else type(error).__name__
            raise DataUnavailable(f"{ANTHROPIC_REPO}/{name} cannot be downloaded ({reason}); offline, use data=hh "
                                  "(its harmless-base test file, in the shared data mirror)", param="data") from None
        with gzip.open(path, "rt", encoding="utf-8") as f:
            records.extend(json.loads(line) for line in f if line.strip())
    return records


def load_pairs(data: str) -> tuple[dict[str, list[Pair]], str]:
    """The preference pairs of every split ("train", "validation", "test") and their source line. `data`: "hh" (the
    HH-RLHF harmless-base test file of the shared data), "anthropic" (all of the book's Anthropic/hh-rlhf, online)
    or a .jsonl file of prompt/chosen/rejected."""
    splits: dict[str, list[Pair]] = {name: [] for name in SPLITS}
    if data == "hh":
        for record in load_hh("all"):
            pair = hh_pair(record)
            if pair is not None:
                splits[split_of(hh_prompt(record), record)].append(pair)
        return splits, HH_SOURCE + "; split by a hash of the dialogue (test: hh_split, the SFT recipe's)"
    if data == "anthropic":
        for record in load_anthropic_hh():
            pair = hh_pair(record)
            if pair is not None:
                splits[split_of(hh_prompt(record), record)].append(pair)
        return splits, ANTHROPIC_SOURCE
    if data.endswith((".jsonl", ".jsonl.gz")):
        for pair, split in load_jsonl_pairs(data):
            splits[split].append(pair)
        return splits, f"preference pairs from {data}"
    raise UserInputError(f"data={data!r}; accepted: hh, anthropic (online) or a .jsonl file of prompt/chosen/rejected",
                         param="data")


@dataclass
class PairExample:
    chosen_ids: list[int]
    chosen_labels: list[int]
    rejected_ids: list[int]
    rejected_labels: list[int]
    ref_chosen: float = math.nan  # the reference model's summed log-probabilities (DPO)
    ref_rejected: float = math.nan


def encode_side(tokenizer: Any, meta: dict[str, Any], fmt: str, prompt: Conversation, text: str,
                max_length: int) -> tuple[list[int], list[int]]:
    """The whole conversation's ids and next-token labels of the final answer only; longer than `max_length`, the
    start of the dialogue is cut (the answer, and the last token a reward model reads, are kept)."""
    ids, mine = encode_conversation(tokenizer, [*prompt, {"role": "assistant", "content": text}], meta, fmt,
                                    last_only=True)
    labels = labels_for(ids, mine)
    if max_length and len(ids) > max_length:
        ids, labels = ids[-max_length:], labels[-max_length:]
    return ids, labels


class PairData(Dataset[PairExample]):
    """Encoded pairs; those with no labelled token on a side (an empty answer) dropped, `cut` counts the shortened."""

    def __init__(self, pairs: Sequence[Pair], tokenizer: Any, meta: dict[str, Any], fmt: str = "template",
                 max_length: int = 512):
        self.examples: list[PairExample] = []
        self.cut = 0
        for pair in pairs:
            c_ids, c_labels = encode_side(tokenizer, meta, fmt, pair.prompt, pair.chosen, 0)
            r_ids, r_labels = encode_side(tokenizer, meta, fmt, pair.prompt, pair.rejected, 0)
            if max_length and max(len(c_ids), len(r_ids)) > max_length:
                self.cut += 1
                c_ids, c_labels, r_ids, r_labels = (c_ids[-max_length:], c_labels[-max_length:],
                                                    r_ids[-max_length:], r_labels[-max_length:])
            if any(label != IGNORE for label in c_labels) and any(label != IGNORE for label in r_labels):
                self.examples.append(PairExample(c_ids, c_labels, r_ids, r_labels))
        self.dropped = len(pairs) - len(self.examples)

    @classmethod
    def of(cls, examples: list[PairExample]) -> PairData:
        """Already encoded examples (benchmarks)."""
        data = cls([], None, {})
        data.examples = examples
        return data

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> PairExample:
        return self.examples[index]


def pair_collate(pad_id: int) -> Callable[[list[PairExample]], tuple[Tensor, Tensor, Tensor, Tensor]]:
    """Pairs -> (inputs (2B, T), labels (2B, T), lengths (2B,), reference log-probabilities (2B,)): the chosen rows
    first, then the rejected ones, right-padded to the longest."""

    def collate(batch: list[PairExample]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        rows = [(e.chosen_ids, e.chosen_labels) for e in batch] + [(e.rejected_ids, e.rejected_labels) for e in batch]
        length = max(len(ids) for ids, _ in rows)
        inputs = torch.full((len(rows), length), pad_id, dtype=torch.long)
        labels = torch.full((len(rows), length), IGNORE, dtype=torch.long)
        for r, (ids, row_labels) in enumerate(rows):
            inputs[r, : len(ids)] = torch.tensor(ids)
            labels[r, : len(ids)] = torch.tensor(row_labels)
        lengths = torch.tensor([len(ids) for ids, _ in rows])
        ref = torch.tensor([e.ref_chosen for e in batch] + [e.ref_rejected for e in batch], dtype=torch.float32)
        return inputs, labels, lengths, ref

    return collate


@dataclass
class PairTrainingConfig(TrainConfig):
    """The settings `reward-model` and `chat-dpo` share: the model, the pairs, their encoding and LoRA."""

    model: str = DEFAULT_MODEL  # smollm2, tiny, or a path / Hub id torchbook.load reads (a chat-sft run)
    data: str = "hh"  # hh (HH-RLHF harmless-base test file), anthropic (all of it, online) or a .jsonl file
    format: str = "template"  # template (the checkpoint's chat template) or book ("Human: ...\n\nAssistant: ...")
    max_length: int = 512  # tokens per answer with its dialogue (longer: the dialogue's start is cut)
    limit: int = 0  # train on the first `limit` pairs only (0: all)
    eval_pairs: int = 0  # validation and test pairs measured (0: all)
    lora: bool = False
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: list[str] = field(default_factory=lambda: list(ATTENTION_TARGETS))
    epochs: int = 1
    optimizer: str = "adamw"
    schedule: str = "constant"
    grad_clip: float = 1.0
    restore_best: bool = False
    log_every: int = 1

    def validate(self) -> None:
        super().validate()
        if self.format not in FORMATS:
            raise UserInputError(f"format={self.format!r}; accepted: {', '.join(FORMATS)}", param="format")
        if self.max_length < 16:
            raise UserInputError(f"max_length={self.max_length} must be at least 16", param="max_length")
        if self.lora and (self.lora_rank < 1 or self.lora_alpha <= 0):
            raise UserInputError(f"lora_rank={self.lora_rank} must be >= 1 and lora_alpha={self.lora_alpha} > 0",
                                 param="lora_rank")


def pair_splits(config: PairTrainingConfig, loaded: Any, run: RunDir) -> tuple[dict[str, PairData], list[Pair], str]:
    """The encoded train / validation / test pairs (the first `limit` and `eval_pairs`), written to `split.json`;
    the test part's raw pairs; the data's source line."""
    max_length = min(config.max_length, loaded.model.config.max_len)
    splits, source = load_pairs(config.data)
    cut = slice(0, config.eval_pairs or None)
    chosen = {"train": splits["train"][: config.limit or None], "validation": splits["validation"][cut],
              "test": splits["test"][cut]}
    data = {name: PairData(pairs, loaded.tokenizer, loaded.meta, config.format, max_length)
            for name, pairs in chosen.items()}
    if not len(data["train"]) or not len(data["test"]):
        raise UserInputError("no training or test pair left after encoding", param="data")
    run.write_json("split.json", {name: {"pairs": len(d), "cut_to_max_length": d.cut, "dropped": d.dropped}
                                  for name, d in data.items()} | {"source": source, "max_length": max_length})
    return data, splits["test"], source


def report_training(report: Any, run: RunDir, config: PairTrainingConfig, results: dict[str, Any], loss: str) -> None:
    """The report rows and plot both pair recipes share: parameters, training time and the loss per step."""
    from torchbook.plots import line_plot  # matplotlib: imported when a report is drawn

    report.compare("trainable parameters", results["trainable_parameters"], None, f"of {results['parameters']:,}")
    report.compare("training time (s)", results["train_time_s"], None,
                   f"{results['steps']} steps of {config.batch_size} pairs, max_length {config.max_length}")
    steps = run.metrics("step")
    if steps:
        line_plot(run.plots / "loss.png", {"training": ([r["step"] for r in steps], [r["loss"] for r in steps])},
                  f"{loss} per step", "step", "loss")
        report.image("Training loss", run.plots / "loss.png", run.path)


def pad_id_of(tokenizer: Any, meta: dict[str, Any]) -> int:
    """The id padding uses: the end-of-sequence token's (never read: right padding, causal attention)."""
    return int(tokenizer.token_to_id(meta.get("eos_token") or "") or 0)


# -- log-probabilities and DPO --------------------------------------------------------------------------------------
def token_logps(logits: Tensor, targets: Tensor) -> Tensor:
    """log p(target) for each row of `logits` (N, vocab), in float32."""
    return logits.float().log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)


def _chunked(head: nn.Module, hidden: Tensor, targets: Tensor, chunk: int, entropy: bool) -> tuple[Tensor, Tensor]:
    """Per-row log p(target) and entropy of `head(hidden)`, `chunk` rows at a time, each recomputed in backward (the
    logits of one chunk exist at once; see `steps.chunked_cross_entropy`)."""

    def part(h: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        logp = head(h).float().log_softmax(-1)
        ent = -(logp.exp() * logp).sum(-1) if entropy else logp.new_zeros(len(y))
        return logp.gather(-1, y[:, None]).squeeze(-1), ent

    logps, ents = [], []
    for start in range(0, hidden.size(0), chunk):
        h, y = hidden[start : start + chunk], targets[start : start + chunk]
        lp, ent = checkpoint(part, h, y, use_reentrant=False) if torch.is_grad_enabled() else part(h, y)
        logps.append(lp)
        ents.append(ent)
    if not logps:
        return hidden.new_zeros(0), hidden.new_zeros(0)
    return torch.cat(logps), torch.cat(ents)


def labelled_logps(model: nn.Module, inputs: Tensor, labels: Tensor, chunk: int = 1024,
                   entropy: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """log p of each labelled next token (`labels` != -100), flattened in row order, their entropies (when asked)
    and the hidden states there (for a value head; None for a model that returns logits only)."""
    counted = labels != IGNORE
    head = getattr(model, "lm_head", None)
    if isinstance(head, nn.Module) and getattr(model, "returns_hidden", False):
        hidden = model(inputs, hidden_only=True)[counted]
        logps, ents = _chunked(head, hidden, labels[counted], chunk, entropy)
        return logps, ents, hidden
    logits = model(inputs)[counted]
    logp = logits.float().log_softmax(-1)
    ents = -(logp.exp() * logp).sum(-1) if entropy else logp.new_zeros(len(logp))
    return logp.gather(-1, labels[counted][:, None]).squeeze(-1), ents, None  # type: ignore[return-value]


def sequence_logps(model: nn.Module, inputs: Tensor, labels: Tensor, chunk: int = 1024) -> Tensor:
    """The book's `sum_of_log_probas`: per row, the sum of log p over the labelled tokens (the answer's)."""
    logps, _, _ = labelled_logps(model, inputs, labels, chunk)
    rows = (labels != IGNORE).nonzero()[:, 0]
    return torch.zeros(len(inputs), device=logps.device, dtype=logps.dtype).index_add(0, rows, logps)


def dpo_loss(chosen: Tensor, rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor,
             beta: float = 0.1) -> tuple[Tensor, Tensor, Tensor]:
    """Equation 15-2: -log sigma(beta [(log pi(y_c|x) - log pi_ref(y_c|x)) - (log pi(y_r|x) - log pi_ref(y_r|x))]),
    the mean over the batch; with the implicit rewards beta (log pi - log pi_ref) of the chosen and rejected answers."""
    chosen_rewards = beta * (chosen - ref_chosen)
    rejected_rewards = beta * (rejected - ref_rejected)
    loss = -F.logsigmoid(chosen_rewards - rejected_rewards).mean()
    return loss, chosen_rewards.detach(), rejected_rewards.detach()


def dpo_step(beta: float) -> Callable[[nn.Module, Any], Step]:
    """The trainer's step for `pair_collate` batches whose reference log-probabilities are filled in."""

    def step(model: nn.Module, batch: tuple[Tensor, Tensor, Tensor, Tensor]) -> Step:
        inputs, labels, _, ref = batch
        logps = sequence_logps(model, inputs, labels)
        n = len(logps) // 2
        loss, chosen, rejected = dpo_loss(logps[:n], logps[n:], ref[:n], ref[n:], beta)
        return Step(loss, preds=(chosen > rejected).long(), target=torch.ones_like(chosen, dtype=torch.long), count=n)

    return step


class PairAccuracy:
    """The share of pairs a step's `preds` (1: chosen scored higher) got right; the trainer's metric interface
    (`to`, `update`, `compute`) without importing torchmetrics for one mean."""

    def __init__(self) -> None:
        self.right, self.total = 0, 0

    def to(self, device: Any) -> PairAccuracy:
        return self

    def update(self, preds: Tensor, target: Tensor) -> None:
        self.right += int((preds == target).sum())
        self.total += len(target)

    def compute(self) -> float:
        return self.right / max(self.total, 1)


@torch.no_grad()
def pair_logps(model: nn.Module, data: PairData, batch_size: int, pad_id: int,
               device: torch.device | None = None) -> tuple[Tensor, Tensor]:
    """Summed log-probabilities of every pair's chosen and rejected answers under `model` (evaluation mode)."""
    was_training = model.training
    model.eval()
    device = device or next(model.parameters()).device
    collate = pair_collate(pad_id)
    chosen, rejected = [], []
    for start in range(0, len(data), batch_size):
        inputs, labels, _, _ = collate([data[i] for i in range(start, min(start + batch_size, len(data)))])
        logps = sequence_logps(model, inputs.to(device), labels.to(device)).cpu()
        n = len(logps) // 2
        chosen.append(logps[:n])
        rejected.append(logps[n:])
    model.train(was_training)
    empty = torch.zeros(0)
    return (torch.cat(chosen) if chosen else empty), (torch.cat(rejected) if rejected else empty)


def add_reference_logps(model: nn.Module, data: PairData, batch_size: int, pad_id: int) -> None:
    """Fill each example's reference log-probabilities with `model`'s (the policy before training)."""
    chosen, rejected = pair_logps(model, data, batch_size, pad_id)
    set_reference_logps(data, chosen.tolist(), rejected.tolist())


def set_reference_logps(data: PairData, chosen: Sequence[float], rejected: Sequence[float]) -> None:
    """Fill each example's reference log-probabilities (chosen, rejected: one per example)."""
    for example, c, r in zip(data.examples, chosen, rejected):
        example.ref_chosen, example.ref_rejected = c, r


def implicit_rewards(model: nn.Module, data: PairData, batch_size: int, pad_id: int, beta: float) -> dict[str, Any]:
    """DPO's implicit rewards on `data` (whose reference log-probabilities are filled): mean chosen and rejected
    reward, margin, preference accuracy (chosen reward strictly higher) and the mean DPO loss."""
    chosen, rejected = pair_logps(model, data, batch_size, pad_id)
    ref_c = torch.tensor([e.ref_chosen for e in data.examples])
    ref_r = torch.tensor([e.ref_rejected for e in data.examples])
    loss, rc, rr = dpo_loss(chosen, rejected, ref_c, ref_r, beta)
    return {"loss": loss.item(), "chosen_reward": rc.mean().item(), "rejected_reward": rr.mean().item(),
            "margin": (rc - rr).mean().item(), "accuracy": (rc > rr).float().mean().item(),
            "correct": int((rc > rr).sum()), "pairs": len(data)}


# -- the reward model ---------------------------------------------------------------------------------------------
class RewardModel(nn.Module):
    """A decoder (`GPT`) with a scalar head on its final hidden state at each row's last token (chapter 15's reward
    model; Hugging Face's `...ForSequenceClassification` with one label, the head without bias)."""

    config_class = GPTConfig

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.backbone = GPT(config)
        self.score = nn.Linear(config.d_model, 1, bias=False)
        nn.init.normal_(self.score.weight, std=1 / math.sqrt(config.d_model + 1))

    @classmethod
    def from_backbone(cls, backbone: GPT) -> RewardModel:
        model = cls(backbone.config)
        model.backbone = backbone
        return model

    def forward(self, tokens: Tensor, lengths: Tensor | None = None) -> Tensor:
        """tokens (B, T), right-padded, and each row's length (None: all T) -> rewards (B,)."""
        hidden = self.backbone(tokens, hidden_only=True)
        last = (lengths - 1 if lengths is not None else torch.full((len(tokens),), tokens.size(1) - 1,
                                                                   device=tokens.device)).to(tokens.device)
        return self.score(hidden[torch.arange(len(tokens), device=tokens.device), last]).squeeze(-1).float()


def reward_meta(meta: dict[str, Any]) -> dict[str, Any]:
    """A loaded reward model's `meta` with the chat template and special tokens its folder keeps (in "extra")."""
    return {**meta, **{k: meta["extra"].get(k) for k in ("chat_template", "bos_token", "eos_token")}}


def bradley_terry_loss(chosen: Tensor, rejected: Tensor) -> Tensor:
    """-log sigma(r_c - r_r), the mean over the pairs (the Bradley-Terry model of which answer people prefer)."""
    return -F.logsigmoid(chosen - rejected).mean()


def reward_step(model: nn.Module, batch: tuple[Tensor, Tensor, Tensor, Tensor]) -> Step:
    inputs, _, lengths, _ = batch
    rewards = model(inputs, lengths)
    n = len(rewards) // 2
    correct = (rewards[:n] > rewards[n:]).long()
    return Step(bradley_terry_loss(rewards[:n], rewards[n:]), preds=correct, target=torch.ones_like(correct), count=n)


@torch.no_grad()
def reward_margins(model: nn.Module, data: PairData, batch_size: int, pad_id: int) -> Tensor:
    """r(chosen) - r(rejected) for every pair of `data`."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    collate = pair_collate(pad_id)
    margins = []
    for start in range(0, len(data), batch_size):
        inputs, _, lengths, _ = collate([data[i] for i in range(start, min(start + batch_size, len(data)))])
        rewards = model(inputs.to(device), lengths.to(device)).cpu()
        n = len(rewards) // 2
        margins.append(rewards[:n] - rewards[n:])
    model.train(was_training)
    return torch.cat(margins) if margins else torch.zeros(0)


def binomial_tail(k: int, n: int, p: float = 0.5) -> float:
    """P(X >= k) for X ~ Binomial(n, p): the one-sided p-value of k successes against chance p."""
    return float(sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k, n + 1)))


def wilson_interval(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """The Wilson score 95% interval of a proportion k/n."""
    if not n:
        return 0.0, 1.0
    p = k / n
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, center - half), min(1.0, center + half)


def accuracy_summary(correct: int, n: int) -> dict[str, float]:
    """Preference accuracy, its 95% interval and the one-sided binomial p-value against 0.5 (ties count wrong)."""
    low, high = wilson_interval(correct, n)
    return {"accuracy": correct / n if n else math.nan, "low": low, "high": high, "p_value": binomial_tail(correct, n),
            "correct": correct, "pairs": n}


# -- RLHF with PPO --------------------------------------------------------------------------------------------------
@contextmanager
def adapters_off(model: nn.Module) -> Iterator[None]:
    """The model without its (unmerged) LoRA updates: the reference policy of a LoRA run."""
    layers = [m for m in lora_layers(model).values() if not m.merged]
    scalings = [m.scaling for m in layers]
    for m in layers:
        m.scaling = 0.0
    try:
        yield
    finally:
        for m, s in zip(layers, scalings):
            m.scaling = s


class ValueHead(nn.Module):
    """V(s) from the policy's final hidden state (starts at 0)."""

    def __init__(self, d_model: int):
        super().__init__()
        self.linear = nn.Linear(d_model, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: Tensor) -> Tensor:
        return self.linear(hidden.float()).squeeze(-1)


@dataclass
class Rollout:
    """Sampled answers as one right-padded batch: `inputs` (N, T) prompt + answer tokens, `labels` (N, T) the next
    token where it is an answer token (-100 elsewhere), so that every per-action tensor below is flat over the
    labelled positions in row order."""

    inputs: Tensor
    labels: Tensor
    texts: list[str]
    old_logps: Tensor | None = None
    ref_logps: Tensor | None = None
    values: Tensor | None = None
    advantages: Tensor | None = None
    returns: Tensor | None = None
    scores: Tensor | None = None
    kl: Tensor | None = None  # per answer: the sum over its tokens of log pi - log pi_ref


def rollout(policy: GPT, tokenizer: Any, prompts: list[list[int]], max_new_tokens: int, temperature: float,
            seed: int, end_ids: Sequence[int], stop: Sequence[str] = ()) -> Rollout:
    """One sampled answer per prompt on the serving engine (request i seeded with seed + i), as a `Rollout`. An
    answer that ended on an end token keeps it as its last action (so the policy learns when to stop)."""
    policy.eval()
    longest = max(len(p) for p in prompts)
    engine = Engine(policy, tokenizer, slots=len(prompts), max_len=longest + max_new_tokens, max_queue=len(prompts),
                    prefill_chunk=max(longest, 1), end_ids=end_ids)
    handles = [engine.submit(Request(p, max_new_tokens, SamplingConfig(temperature=temperature, seed=seed + i), stop))
               for i, p in enumerate(prompts)]
    while engine.step():
        pass
    rows, texts = [], []
    for prompt, handle in zip(prompts, handles):
        choice = handle.result().choices[0]
        answer = list(choice.tokens)
        if choice.end_token is not None and not stop:
            answer.append(choice.end_token)  # the end token sampled (of several, the one it was)
        if not answer:  # an immediate end without an end token to keep: the end token is the answer
            answer = [end_ids[0]] if end_ids else [prompt[-1]]
        rows.append((prompt, answer))
        texts.append(choice.text)
    length = max(len(p) + len(a) for p, a in rows)
    inputs = torch.zeros((len(rows), length), dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE, dtype=torch.long)
    for r, (prompt, answer) in enumerate(rows):
        ids = prompt + answer
        inputs[r, : len(ids)] = torch.tensor(ids)
        labels[r, len(prompt) - 1 : len(ids) - 1] = torch.tensor(answer)
    return Rollout(inputs, labels, texts)


def policy_outputs(policy: nn.Module, value_head: ValueHead | None, inputs: Tensor, labels: Tensor,
                   entropy: bool = False) -> tuple[Tensor, Tensor, Tensor | None]:
    """log pi of each answer token, their entropies and the value estimates at the same positions (flat)."""
    logps, ents, hidden = labelled_logps(policy, inputs, labels, entropy=entropy)
    values = value_head(hidden) if value_head is not None else None
    return logps, ents, values


def token_rewards(scores: Tensor, logps: Tensor, ref_logps: Tensor, labels: Tensor, kl_coef: float) -> Tensor:
    """Per answer token (N, T): -kl_coef (log pi - log pi_ref), plus the answer's score at its last token."""
    counted = labels != IGNORE
    rewards = torch.zeros(labels.shape, dtype=torch.float32)
    rewards[counted] = -kl_coef * (logps - ref_logps)
    last = counted.long().cumsum(1).argmax(1)  # the last labelled position of each row
    rewards[torch.arange(len(labels)), last] += scores
    return rewards


def spread(flat: Tensor, labels: Tensor) -> Tensor:
    """Flat per-answer-token values back onto the (N, T) grid, 0 elsewhere."""
    grid = torch.zeros(labels.shape, dtype=torch.float32)
    grid[labels != IGNORE] = flat.float().cpu()
    return grid


@torch.no_grad()
def score_rollout(rollout_: Rollout, policy: GPT, value_head: ValueHead, reference: nn.Module | None,
                  scores: Tensor, kl_coef: float, gamma: float, lam: float) -> Rollout:
    """The old log-probabilities, the reference's (`reference` None: the policy with its adapters off), values,
    per-token rewards, GAE advantages (`rl.ppo.gae`, over the answer tokens) and returns."""
    device = next(policy.parameters()).device
    policy.eval()
    inputs, labels = rollout_.inputs.to(device), rollout_.labels.to(device)
    old, _, values = policy_outputs(policy, value_head, inputs, labels)
    if reference is None:
        with adapters_off(policy):
            ref, _, _ = policy_outputs(policy, None, inputs, labels)
    else:
        ref, _, _ = policy_outputs(reference, None, inputs, labels)
    old, ref, values = old.cpu(), ref.cpu(), values.cpu()  # type: ignore[union-attr]
    labels = rollout_.labels
    rewards = token_rewards(scores, old, ref, labels, kl_coef)
    value_grid = spread(values, labels)
    dones = torch.zeros_like(rewards.T)
    advantages = gae(rewards.T, value_grid.T, dones, torch.zeros(len(labels)), gamma, lam).T
    counted = labels != IGNORE
    rollout_.old_logps, rollout_.ref_logps, rollout_.values = old, ref, values
    rollout_.advantages, rollout_.returns = advantages[counted], advantages[counted] + values
    rollout_.scores = scores.float()
    rollout_.kl = spread(old - ref, labels).sum(1)
    return rollout_


def ppo_update(policy: GPT, value_head: ValueHead, optimizer: torch.optim.Optimizer, batch: Rollout, epochs: int,
               minibatches: int, clip: float, vf_coef: float, ent_coef: float, max_grad_norm: float,
               generator: torch.Generator) -> dict[str, float]:
    """PPO epochs over the rollout's answers (`rl.ppo.ppo_loss` on their tokens), advantages whitened per minibatch."""
    device = next(policy.parameters()).device
    policy.eval()  # dropout off: the ratio compares the policy with itself before the update (as TRL's PPO does)
    n = len(batch.inputs)
    counted = batch.labels != IGNORE
    row_of = counted.nonzero()[:, 0]  # the row of each flat answer token
    params = [p for p in [*policy.parameters(), *value_head.parameters()] if p.requires_grad]
    totals: dict[str, float] = {}
    count = 0
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator)
        for rows in order.chunk(minibatches):
            rows = rows.sort().values
            keep = torch.isin(row_of, rows)
            inputs, labels = batch.inputs[rows].to(device), batch.labels[rows].to(device)
            new, ents, values = policy_outputs(policy, value_head, inputs, labels, entropy=True)
            adv = batch.advantages[keep].to(device)  # type: ignore[index]
            adv = (adv - adv.mean()) / (adv.std() + 1e-8) if len(adv) > 1 else adv
            loss, stats = ppo_loss(new, batch.old_logps[keep].to(device), adv, values,  # type: ignore[index,arg-type]
                                   batch.returns[keep].to(device), ents, clip, vf_coef, ent_coef)  # type: ignore[index]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if max_grad_norm:
                nn.utils.clip_grad_norm_(params, max_grad_norm)
            optimizer.step()
            for k, v in stats.items():
                totals[k] = totals.get(k, 0.0) + v
            count += 1
    return {k: v / max(count, 1) for k, v in totals.items()}


class KLController:
    """Ziegler et al. (2019)'s adaptive KL coefficient: kl_coef x (1 + clip(KL / target - 1, -0.2, 0.2) x n / horizon)
    after each batch of n answers, pulling the mean KL per answer toward `target` (target 0: a fixed coefficient)."""

    def __init__(self, kl_coef: float, target: float, horizon: int):
        self.value, self.target, self.horizon = kl_coef, target, horizon

    def update(self, kl: float, n: int) -> None:
        if self.target > 0:
            error = min(max(kl / self.target - 1, -0.2), 0.2)
            self.value *= 1 + error * n / self.horizon


def prompt_ids(tokenizer: Any, meta: dict[str, Any], messages: Conversation, fmt: str, max_tokens: int = 0) -> list[int]:
    """The ids a model continues to answer `messages` (its last `max_tokens` when > 0)."""
    ids = list(tokenizer.encode(prompt_text(messages, meta, fmt), add_special_tokens=False).ids)
    return ids[-max_tokens:] if max_tokens else ids


@torch.no_grad()
def sampled_kl(policy: GPT, reference: nn.Module | None, loaded: Any, prompts: list[Conversation], fmt: str,
               max_new_tokens: int, seed: int) -> dict[str, float]:
    """KL(pi || pi_ref) per answer, estimated on answers sampled from `policy` (temperature 1): the mean over the
    answers of the sum over their tokens of log pi - log pi_ref. `reference` None: the policy with its adapters off."""
    if not prompts:
        return {"kl": math.nan, "answers": 0}
    room = policy.config.max_len - max_new_tokens
    ids = [prompt_ids(loaded.tokenizer, loaded.meta, p, fmt, room) for p in prompts]
    batch = rollout(policy, loaded.tokenizer, ids, max_new_tokens, 1.0, seed, loaded.meta["end_token_ids"])
    logps, _, _ = labelled_logps(policy, batch.inputs, batch.labels)
    if reference is None:
        with adapters_off(policy):
            ref, _, _ = labelled_logps(policy, batch.inputs, batch.labels)
    else:
        ref, _, _ = labelled_logps(reference.eval(), batch.inputs, batch.labels)
    kl = spread(logps - ref, batch.labels).sum(1)
    return {"kl": kl.mean().item(), "answers": len(kl)}
