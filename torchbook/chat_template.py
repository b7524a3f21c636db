"""Chat templates (book chapter 15): a checkpoint's own Jinja template, rendered as Hugging Face renders it.

One function, `render_chat`, turns a list of messages ({"role": ..., "content": ...}) into the prompt text, for
inference now and for fine-tuning later. The template runs in Jinja's immutable sandbox with the settings and
helpers Hugging Face's `apply_chat_template` gives templates (block trimming, loop controls, `tojson`,
`raise_exception`, `strftime_now`). A model without a template gets ChatML (`DEFAULT_TEMPLATE`).
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

DEFAULT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


class TemplateError(ValueError):
    """A template rejected the messages (its own `raise_exception`) or could not be parsed."""


def _raise(message: str) -> None:
    raise TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _environment() -> Any:
    import jinja2.ext
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
    import jinja2

    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message:
            raise TemplateError(f"message {i} must be a dict with a 'role' (and usually 'content'), got {message!r}")
    try:
        compiled = _environment().from_string(template or DEFAULT_TEMPLATE)
    except jinja2.TemplateSyntaxError as e:
        raise TemplateError(f"the chat template does not parse: {e.message} (line {e.lineno})") from None
    return str(compiled.render(messages=messages, add_generation_prompt=add_generation_prompt, **variables))
