"""The context budget (book chapter 15): a conversation that outgrows the model's context loses its oldest turns.

The rule, in order:

1. The system message (the first message, when it is one) is always kept, and so is the current turn (the last
   user message and what follows it: tool calls and their results).
2. Earlier turns (a turn starts at a user message) are dropped whole, oldest first, until the prompt fits in
   `budget` tokens (the model's context less the tokens kept for the reply).
3. With a `summarize` function, the dropped turns are replaced by its summary of them (the model's own, written
   once and kept in the conversation), added to the system message as "Summary of the earlier conversation: ...";
   when the summary itself does not fit, one more turn is dropped and summarised, and so on.
4. When even the system message and the current turn do not fit, it is a `UserInputError` (the message is too
   long for this model): nothing the user wrote is silently cut.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from torchbook.errors import UserInputError

Messages = list[dict[str, Any]]
SUMMARY_HEADING = "Summary of the earlier conversation: "


@dataclass
class Fitted:
    messages: Messages  # what the prompt holds
    dropped: int  # messages of the history left out (replaced by the summary, when there is one)
    summary: str | None


def turns(messages: Sequence[dict[str, Any]]) -> list[Messages]:
    """Messages grouped into turns: each starts at a user message (messages before the first user one form
    a turn of their own)."""
    groups: list[Messages] = []
    for message in messages:
        if message.get("role") == "user" or not groups:
            groups.append([])
        groups[-1].append(message)
    return groups


def with_summary(system: Messages, summary: str | None) -> Messages:
    if not summary:
        return list(system)
    if system:
        content = system[0].get("content") or ""
        return [{**system[0], "content": f"{content}\n\n{SUMMARY_HEADING}{summary}".strip()}]
    return [{"role": "system", "content": SUMMARY_HEADING + summary}]


def fit(messages: Sequence[dict[str, Any]], count: Callable[[Messages], int], budget: int,
        summarize: Callable[[Messages, str | None], str] | None = None,
        known: tuple[int, str | None] = (0, None)) -> Fitted:
    """The messages to send under `budget` tokens by the rule of the module docstring. `count(messages)` gives a
    prompt's tokens; `summarize(messages, earlier)` summarises `messages` (following the summary `earlier` of what
    came before them, or None); `known`: (messages covered, summary) written earlier: reused when it covers what
    is dropped, extended with the newly dropped messages when it covers less."""
    messages = list(messages)
    system = messages[:1] if messages and messages[0].get("role") == "system" else []
    rest = messages[len(system):]
    groups = turns(rest)
    if not groups:
        return Fitted(messages, 0, None)
    history, current = groups[:-1], groups[-1]
    kept_first = 0  # the first kept turn of `history`
    summary: str | None = None

    def prompt(first: int, summary: str | None) -> Messages:
        return with_summary(system, summary) + [m for g in history[first:] for m in g] + current

    if count(prompt(0, None)) <= budget:
        return Fitted(messages, 0, None)
    while kept_first <= len(history):
        dropped = sum(len(g) for g in history[:kept_first])
        if kept_first and summarize is not None:
            old = [m for g in history[:kept_first] for m in g]
            if known[0] == dropped and known[1]:
                summary = known[1]
            elif 0 < known[0] < dropped and known[1]:  # a summary of the start, and more dropped since
                summary = summarize(old[known[0]:], known[1])
            else:
                summary = summarize(old, None)
            known = (dropped, summary)
        if count(prompt(kept_first, summary)) <= budget:
            return Fitted(prompt(kept_first, summary), dropped, summary)
        kept_first += 1
    if count(with_summary(system, None) + current) <= budget:
        return Fitted(with_summary(system, None) + current, sum(len(g) for g in history), None)
    raise UserInputError(f"the message is too long for the model's context ({count(system + current)} tokens with "
                         f"the system prompt; at most {budget}): shorten it", param="message")
