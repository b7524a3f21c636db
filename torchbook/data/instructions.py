"""Instruction and dialogue data for fine-tuning a chat model (book chapter 15): Self-Instruct's 175 human-written
seed tasks (training), its 252 user-oriented instructions (held out for evaluation), Anthropic's HH-RLHF
dialogues (split once by a hash of the dialogue: `hh_split`, which preference tuning uses too), the book's Alpaca
(online) and any JSONL file of chat messages.

Every loader gives conversations: lists of messages {"role": "user" | "assistant" | "system", "content": ...}.
An instruction with an input becomes one user message: the instruction, then the input on its own lines.
`book_text` renders a conversation in the book's role tags for a base model ("Human: ...\n\nAssistant: ...").
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
from pathlib import Path
from typing import Any

from torchbook.data.download import RemoteFile, fetch
from torchbook.errors import DataUnavailable, UserInputError

Message = dict[str, str]
Conversation = list[Message]

_MIRROR_HINT = "the shared data mirror (../shared/data) holds it under the same name"
SEED_TASKS = RemoteFile(
    "https://raw.githubusercontent.com/yizhongw/self-instruct/main/data/seed_tasks.jsonl",
    "7779004fa198fdf27cf70a159363879d8a26c53329e11b436af17b3941875f48",
    filename="self-instruct/seed_tasks.jsonl", offline=_MIRROR_HINT)
USER_ORIENTED = RemoteFile(
    "https://raw.githubusercontent.com/yizhongw/self-instruct/main/human_eval/user_oriented_instructions.jsonl",
    "81d60a117db495cecedecd9193504fd07c5b5a42f6699ef6b0f9da10fc22f42e",
    filename="self-instruct/user_oriented_instructions.jsonl", offline=_MIRROR_HINT)
HH_HARMLESS_TEST = RemoteFile(
    "https://github.com/anthropics/hh-rlhf/raw/master/harmless-base/test.jsonl.gz",
    "ebfaaed21162a4de120ae85366075b34425e2a6303fac59b99555002f7016f03",
    filename="hh-rlhf/harmless-base-test.jsonl.gz", offline=_MIRROR_HINT)
# The book's SFT data set (tatsu-lab/alpaca, 52,002 instructions). Its repository publishes no checksum.
ALPACA = RemoteFile(
    "https://raw.githubusercontent.com/tatsu-lab/stanford_alpaca/main/alpaca_data.json", "",
    filename="alpaca_data.json",
    offline="data=self-instruct (Self-Instruct's 175 human-written seed tasks, in the shared data mirror)")

SELF_INSTRUCT_SOURCE = "Self-Instruct (Wang et al., 2023; Apache-2.0): 175 human-written seed tasks"
USER_ORIENTED_SOURCE = "Self-Instruct's 252 human-written user-oriented instructions with reference outputs (held out)"
HH_SOURCE = "Anthropic HH-RLHF, harmless-base test file (MIT): 2,312 dialogues with a chosen and a rejected last turn"
ALPACA_SOURCE = "Stanford Alpaca (tatsu-lab/alpaca, CC BY-NC 4.0): 52,002 generated instructions, the book's SFT data"


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:  # type: ignore[operator]
        return [json.loads(line) for line in f if line.strip()]


def instruction_messages(instruction: str, input_text: str = "", output: str | None = None) -> Conversation:
    """One instruction (and its input, if any) as a user message, with the reference output as the answer."""
    user = instruction.strip() + (f"\n\n{input_text.strip()}" if input_text and input_text.strip() else "")
    messages = [{"role": "user", "content": user}]
    if output is not None:
        messages.append({"role": "assistant", "content": output.strip()})
    return messages


def _instances(rows: list[dict[str, Any]]) -> list[Conversation]:
    return [instruction_messages(row["instruction"], inst.get("input", ""), inst["output"])
            for row in rows for inst in row["instances"]]


def load_seed_tasks() -> list[Conversation]:
    """Self-Instruct's 175 seed tasks, one conversation per input/output instance."""
    return _instances(_read_jsonl(fetch(SEED_TASKS)))


def load_user_oriented() -> list[Conversation]:
    """Self-Instruct's 252 user-oriented instructions (the first instance of each), held out for evaluation."""
    rows = _read_jsonl(fetch(USER_ORIENTED))
    return [instruction_messages(r["instruction"], r["instances"][0].get("input", ""), r["instances"][0]["output"])
            for r in rows]


def load_alpaca() -> list[Conversation]:
    """The book's Alpaca instructions (online; offline, `DataUnavailable` names the offline alternative)."""
    rows = json.loads(fetch(ALPACA).read_text(encoding="utf-8"))
    return [instruction_messages(r["instruction"], r.get("input", ""), r["output"]) for r in rows]


def load_chat_jsonl(path: str | Path) -> list[Conversation]:
    """A JSONL file of chat messages: each line {"messages": [{"role": ..., "content": ...}, ...]} (or the list
    itself); each conversation must end with an assistant message."""
    path = Path(path)
    if not path.is_file():
        raise DataUnavailable(f"{str(path)!r} does not exist; give a JSONL file of chat messages")
    conversations = []
    for i, row in enumerate(_read_jsonl(path)):
        messages = row.get("messages") if isinstance(row, dict) else row
        if not isinstance(messages, list) or not messages or any(
                not isinstance(m, dict) or "role" not in m or "content" not in m for m in messages):
            raise UserInputError(f"{path}: line {i + 1} is not a list of {{'role', 'content'}} messages")
        if messages[-1]["role"] != "assistant":
            raise UserInputError(f"{path}: line {i + 1} does not end with an assistant message")
        conversations.append([{"role": m["role"], "content": m["content"]} for m in messages])
    return conversations


# -- HH-RLHF ------------------------------------------------------------------------------------------------------
_TURN = re.compile(r"\n\n(Human|Assistant): ")


def parse_hh(text: str) -> Conversation:
    """An HH-RLHF transcript ("\\n\\nHuman: ...\\n\\nAssistant: ...") as messages."""
    parts = _TURN.split(text)
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[parts[i]], "content": parts[i + 1].strip()} for i in range(1, len(parts) - 1, 2)]


def hh_prompt(record: dict[str, str]) -> str:
    """The dialogue an HH-RLHF record's two answers share: the chosen and rejected transcripts' common part, up to
    its last "\n\nAssistant:" (a few records' last turns themselves hold "Human:" lines)."""
    chosen, rejected = record["chosen"], record["rejected"]
    n = next((i for i, (a, b) in enumerate(zip(chosen, rejected)) if a != b), min(len(chosen), len(rejected)))
    common = chosen[:n]
    cut = common.rfind("\n\nAssistant:")
    return common[:cut] if cut >= 0 else common


def hh_split(record: dict[str, str], test_fraction: float = 0.1) -> str:
    """"train" or "test" for an HH-RLHF record, by a hash of the dialogue its two answers share (`hh_prompt`): the
    same on every machine and for every recipe (SFT uses the chosen side of the train part, preference tuning both
    sides), whatever order the file comes in, and a dialogue never on both sides."""
    digest = hashlib.sha256(hh_prompt(record).encode("utf-8")).digest()
    return "test" if int.from_bytes(digest[:8], "big") / 2**64 < test_fraction else "train"


def load_hh(split: str = "train", test_fraction: float = 0.1) -> list[dict[str, Any]]:
    """HH-RLHF records of `split` ("train", "test" or "all") by `hh_split`: {"chosen", "rejected"} transcripts."""
    if split not in ("train", "test", "all"):
        raise UserInputError(f"split={split!r}; accepted: train, test, all", param="split")
    rows = _read_jsonl(fetch(HH_HARMLESS_TEST))
    return [r for r in rows if split == "all" or hh_split(r, test_fraction) == split]


def load_hh_chosen(split: str = "train", test_fraction: float = 0.1) -> list[Conversation]:
    """The chosen side of the HH-RLHF dialogues of `split`, as conversations (for SFT)."""
    return [parse_hh(r["chosen"]) for r in load_hh(split, test_fraction)]


# -- the book's role tags -----------------------------------------------------------------------------------------
BOOK_ROLES = {"user": "Human", "assistant": "Assistant", "system": "System"}


def book_text(messages: Conversation, add_generation_prompt: bool = False) -> str:
    """The book's plain format for a base model: "Human: ...\\n\\nAssistant: ..." turns, an instruction's input
    on "-> " lines (how `instruction_messages` separates it from the instruction)."""
    turns = []
    for m in messages:
        content = m["content"]
        if m["role"] == "user" and "\n\n" in content:
            instruction, _, input_text = content.partition("\n\n")
            content = instruction + "".join(f"\n-> {line}" for line in input_text.splitlines())
        turns.append(f"{BOOK_ROLES.get(m['role'], m['role'])}: {content}")
    text = "\n\n".join(turns)
    if add_generation_prompt:
        text += "\n\nAssistant:"
    return text


DATASETS = ("self-instruct", "hh", "alpaca")


def load_conversations(name: str) -> tuple[list[Conversation], str]:
    """Training conversations by name (or a JSONL path) and their source line."""
    if name == "self-instruct":
        return load_seed_tasks(), SELF_INSTRUCT_SOURCE
    if name == "hh":
        return load_hh_chosen("train"), HH_SOURCE + "; the chosen side of the train part (hh_split)"
    if name == "alpaca":
        return load_alpaca(), ALPACA_SOURCE
    if name.endswith((".jsonl", ".jsonl.gz")):
        return load_chat_jsonl(name), f"chat messages from {name}"
    raise UserInputError(f"data={name!r}; accepted: {', '.join(DATASETS)} or a .jsonl file of chat messages",
                         param="data")
