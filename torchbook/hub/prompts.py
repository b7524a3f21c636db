"""Chat prompts (book chapter 15): a checkpoint's own Jinja template, rendered as Hugging Face renders it, and what
else a chat needs from a checkpoint (its special tokens, the tokens that end a turn, its generation defaults).

`render_chat` turns a list of messages ({"role": "system" | "user" | "assistant" | "tool", "content": ...}) into
the prompt text; `chat_prompt` does it with a loaded checkpoint's template and special tokens (`Loaded.meta`, the
same keys for every format); `end_token_ids` says which token ids end a turn. The CLI, fine-tuning, the
orchestrator and the server all build prompts here. The template runs in Jinja's immutable sandbox with the settings and
helpers Hugging Face's `apply_chat_template` gives templates (block trimming, loop controls, `tojson`,
`raise_exception`, `strftime_now`). A model without a template gets ChatML (`DEFAULT_TEMPLATE`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import datetime
from typing import Any

DEFAULT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


# Tokens that end a turn or a document in the families torchbook loads; used when a checkpoint names none.
END_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>", "</s>", "<eos>", "<|end|>")
ROLES = ("system", "user", "assistant", "tool")


class TemplateError(ValueError):
    """A template rejected the messages (its own `raise_exception`) or could not be parsed."""


def _raise(message: str) -> None:
    raise TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _environment() -> Any:
    import jinja2.ext  # an optional dependency (the nlp extra): only chat prompts need it
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def render_chat(messages: list[dict[str, Any]], template: str | None = None, add_generation_prompt: bool = True,
                **variables: Any) -> str:
    """The prompt text for `messages` under `template` (default: ChatML). `variables` (bos_token, eos_token, tools,
    ...) are passed to the template as Hugging Face passes the tokenizer's special tokens."""
    import jinja2  # an optional dependency (the nlp extra): only chat prompts need it

    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message:
            raise TemplateError(f"message {i} must be a dict with a 'role' (and usually 'content'), got {message!r}")
    try:
        compiled = _environment().from_string(template or DEFAULT_TEMPLATE)
    except jinja2.TemplateSyntaxError as e:
        raise TemplateError(f"the chat template does not parse: {e.message} (line {e.lineno})") from None
    return str(compiled.render(messages=messages, add_generation_prompt=add_generation_prompt, **variables))


def messages_for(user: str, system: str | None = None,
                 history: Iterable[dict[str, Any]] = ()) -> list[dict[str, Any]]:
    """A message list: an optional system message, earlier turns, then the user's new message."""
    messages: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
    messages.extend(history)
    messages.append({"role": "user", "content": user})
    return messages


def chat_prompt(messages: list[dict[str, Any]], meta: dict[str, Any], add_generation_prompt: bool = True,
                **variables: Any) -> str:
    """The prompt text for `messages` with a loaded checkpoint's own template and special tokens (`meta` is
    `Loaded.meta`). Encode it without adding special tokens: the template writes its own."""
    for i, message in enumerate(messages):
        if isinstance(message, dict) and message.get("role") not in ROLES:
            raise TemplateError(f"message {i} has the role {message.get('role')!r}; accepted: {', '.join(ROLES)}")
    return render_chat(messages, meta.get("chat_template"), add_generation_prompt,
                       bos_token=meta.get("bos_token") or "", eos_token=meta.get("eos_token") or "", **variables)


def chat_token_ids(tokenizer: Any, messages: list[dict[str, Any]], meta: dict[str, Any],
                   add_generation_prompt: bool = True) -> list[int]:
    """`chat_prompt` as token ids."""
    text = chat_prompt(messages, meta, add_generation_prompt)
    return list(tokenizer.encode(text, add_special_tokens=False).ids)


def end_token_ids(tokenizer: Any, eos_ids: Iterable[Any] = ()) -> list[int]:
    """The ids that end generation: the checkpoint's own end-of-sequence ids (`eos_ids`: ints or lists of ints,
    from GGUF metadata, generation_config.json or config.json), then the usual end-of-turn tokens the vocabulary
    holds, each once, in that order."""
    ids: list[int] = []
    for value in eos_ids:
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, int) and v not in ids:
                ids.append(v)
    for token in END_TOKENS:
        token_id = tokenizer.token_to_id(token)
        if token_id is not None and token_id not in ids:
            ids.append(token_id)
    return ids
