"""Tool calls (book chapter 15): tool definitions into the prompt, the model's calls out of its text.

The caller declares tools in OpenAI's format (`{"type": "function", "function": {"name", "description",
"parameters"}}`, the parameters a JSON Schema); `render_tools` writes them into the prompt with the checkpoint's own
chat template when the template has a tools section (it reads the `tools` variable, as Qwen's, Hermes' and Llama
3.1's do; Hugging Face's `apply_chat_template(..., tools=...)` passes the same list), else with the stated fallback:
a system message listing the tools and asking for Hermes-style calls,

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

(SmolLM2's template and ChatML have no tools section). `parse_tool_calls` reads the calls out of a reply in the
formats the main families write: Hermes/Qwen `<tool_call>` JSON, Llama 3.x JSON (`<|python_tag|>` or a bare
`{"name": ..., "parameters": ...}`), Mistral `[TOOL_CALLS]` (a JSON list, or `name[ARGS]{...}` in newer
templates); each call gets an id (`call_...`, or Mistral's 9 characters). The result of a call goes back as a
`tool` message (`tool_message`); the assistant's turn that made the calls as `assistant_message`. A template
without tool support sees both in the fallback's text form (`<tool_call>` in the assistant's turn, a user turn
with `<tool_response>`, as Qwen's template writes them), so any chat template renders a tool conversation.
"""

from __future__ import annotations

import json
import re
import secrets
import string
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from torchbook.errors import UserInputError
from torchbook.hub.prompts import chat_prompt

STYLES = ("hermes", "llama3", "mistral")
_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")  # OpenAI's rule for function names


@dataclass
class Tool:
    """One function the model may call: its name, what it does, and its arguments' JSON Schema (an object)."""

    name: str
    description: str = ""
    parameters: dict[str, Any] = field(default_factory=lambda: {"type": "object", "properties": {}})

    @classmethod
    def from_openai(cls, spec: dict[str, Any] | Tool) -> Tool:
        """A tool from OpenAI's `{"type": "function", "function": {...}}` (or the inner function dict)."""
        if isinstance(spec, Tool):
            return spec
        if not isinstance(spec, dict):
            raise UserInputError(f"a tool must be a JSON object, got {spec!r}", param="tools")
        if spec.get("type", "function") != "function":
            raise UserInputError(f"only tools of type 'function' are supported, got {spec.get('type')!r}",
                                 param="tools")
        function = spec.get("function", spec)
        if not isinstance(function, dict):
            raise UserInputError("a tool's 'function' must be a JSON object", param="tools")
        name = function.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise UserInputError(f"a tool's name must be 1-64 letters, digits, '_', '.' or '-', got {name!r}",
                                 param="tools")
        parameters = function.get("parameters") or {"type": "object", "properties": {}}
        if not isinstance(parameters, dict):
            raise UserInputError(f"tool {name!r}: 'parameters' must be a JSON Schema object", param="tools")
        return cls(name, str(function.get("description") or ""), parameters)

    def to_openai(self) -> dict[str, Any]:
        return {"type": "function",
                "function": {"name": self.name, "description": self.description, "parameters": self.parameters}}


def tools_from_openai(tools: Iterable[dict[str, Any] | Tool]) -> list[Tool]:
    """The tools of an OpenAI `tools` list, checked (each a function with a valid name, names distinct)."""
    parsed = [Tool.from_openai(t) for t in tools]
    names = [t.name for t in parsed]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise UserInputError(f"tool names must be distinct; repeated: {', '.join(repeated)}", param="tools")
    return parsed


@dataclass
class ToolCall:
    """A call the model made: an id (to match the `tool` message that answers it), the tool's name, its arguments."""

    id: str
    name: str
    arguments: dict[str, Any]

    def to_openai(self) -> dict[str, Any]:
        """OpenAI's form: the arguments as a JSON string."""
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": json.dumps(self.arguments, ensure_ascii=False)}}

    @classmethod
    def from_openai(cls, call: dict[str, Any]) -> ToolCall:
        function = call.get("function", call)
        arguments = function.get("arguments") or {}
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except json.JSONDecodeError as e:
                raise UserInputError(f"tool call {function.get('name')!r}: arguments are not JSON ({e.msg})",
                                     param="tool_calls") from None
        if not isinstance(arguments, dict):
            raise UserInputError(f"tool call {function.get('name')!r}: arguments must be a JSON object",
                                 param="tool_calls")
        return cls(str(call.get("id") or new_call_id()), str(function.get("name")), arguments)


def new_call_id(style: str = "hermes") -> str:
    """A fresh call id: `call_` and 24 random letters and digits (OpenAI's look), or 9 for Mistral, whose
    templates accept only 9-character ids."""
    alphabet = string.ascii_letters + string.digits
    if style == "mistral":
        return "".join(secrets.choice(alphabet) for _ in range(9))
    return "call_" + "".join(secrets.choice(alphabet) for _ in range(24))


# -- which format a checkpoint uses -----------------------------------------------------------------------------
def tool_style(template: str | None) -> str:
    """The call format a chat template teaches: "mistral" (`[TOOL_CALLS]`), "llama3" (`<|python_tag|>` or
    `ipython`), else "hermes" (Qwen, Hermes, and the fallback for templates without tools)."""
    template = template or ""
    if "[TOOL_CALLS]" in template:
        return "mistral"
    if "<|python_tag|>" in template or "ipython" in template:
        return "llama3"
    return "hermes"


def template_has_tools(template: str | None) -> bool:
    """Whether a chat template reads the `tools` variable (has a tools section)."""
    if not template:
        return False
    import jinja2  # an optional dependency (the nlp extra), as in hub/prompts.py
    from jinja2 import meta as jinja_meta

    try:
        return "tools" in jinja_meta.find_undeclared_variables(jinja2.Environment().parse(template))
    except jinja2.TemplateSyntaxError:
        return "tools" in template


# -- into the prompt --------------------------------------------------------------------------------------------
FALLBACK_INSTRUCTIONS = (
    "You may call one or more functions to assist with the user query. The functions are listed in <tools></tools> "
    "as JSON signatures:\n<tools>\n{tools}\n</tools>\n\nTo call a function, answer with a JSON object holding its "
    "name and arguments inside <tool_call></tool_call> tags, one per call:\n<tool_call>\n"
    '{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>\n'
    "Otherwise answer the user directly."
)


def tool_system_prompt(tools: Sequence[dict[str, Any] | Tool]) -> str:
    """The fallback's system text: the tools as JSON signatures and how to call them (Hermes' wording)."""
    listed = "\n".join(json.dumps(t.to_openai(), ensure_ascii=False) for t in tools_from_openai(tools))
    return FALLBACK_INSTRUCTIONS.format(tools=listed)


def hermes_call_text(call: ToolCall) -> str:
    return "<tool_call>\n" + json.dumps({"name": call.name, "arguments": call.arguments}, ensure_ascii=False) + \
        "\n</tool_call>"


def fallback_messages(messages: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any] | Tool] = ()
                      ) -> list[dict[str, Any]]:
    """`messages` for a template without tool support: the tool descriptions joined to the system message (or a
    new one first), an assistant turn's `tool_calls` written as `<tool_call>` text after its content, and each
    `tool` message as a user turn holding `<tool_response>` (consecutive ones in one turn), as Qwen writes them."""
    out: list[dict[str, Any]] = []
    for message in messages:
        role = message.get("role")
        if role == "assistant" and message.get("tool_calls"):
            calls = [ToolCall.from_openai(c) for c in message["tool_calls"]]
            text = "\n".join(([message["content"]] if message.get("content") else []) +
                             [hermes_call_text(c) for c in calls])
            out.append({"role": "assistant", "content": text})
        elif role == "tool":
            response = f"<tool_response>\n{_content_text(message.get('content'))}\n</tool_response>"
            if out and out[-1].get("role") == "user" and out[-1].get("_tool_responses"):
                out[-1]["content"] += "\n" + response
            else:
                out.append({"role": "user", "content": response, "_tool_responses": True})
        else:
            out.append({**message, "content": _content_text(message.get("content"))})
    for message in out:
        message.pop("_tool_responses", None)
    if tools:
        instructions = tool_system_prompt(tools)
        if out and out[0].get("role") == "system":
            out[0] = {**out[0], "content": (out[0]["content"] + "\n\n" if out[0]["content"] else "") + instructions}
        else:
            out.insert(0, {"role": "system", "content": instructions})
    return out


def _content_text(content: Any) -> str:
    """A message's content as text: a string, OpenAI's list of {"type": "text", "text"} parts, or JSON."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return "".join(str(p.get("text", "")) for p in content)
    return json.dumps(content, ensure_ascii=False)


def render_tools(messages: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any] | Tool], meta: dict[str, Any],
                 add_generation_prompt: bool = True) -> str:
    """The prompt text for a conversation with `tools` (OpenAI format) under a loaded checkpoint's template
    (`meta` is `Loaded.meta`): the template's own tools section when it has one (`tools` passed to it as Hugging
    Face passes them; `tool_calls` and `tool` messages as they are, with arguments as objects), else the fallback
    (`fallback_messages`). No tools: the plain chat prompt (tool messages still rendered)."""
    parsed = tools_from_openai(tools)
    template = meta.get("chat_template")
    if template_has_tools(template):
        native = [_native_message(m) for m in messages]
        if not parsed:
            return chat_prompt(native, meta, add_generation_prompt)
        return chat_prompt(native, meta, add_generation_prompt, tools=[t.to_openai() for t in parsed])
    return chat_prompt(fallback_messages(messages, parsed), meta, add_generation_prompt)


def _native_message(message: dict[str, Any]) -> dict[str, Any]:
    """A message for a template with tool support: tool calls' arguments as objects (Hugging Face's templates
    dump them with `tojson`), content never None."""
    out = dict(message)
    if message.get("tool_calls"):
        out["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in (ToolCall.from_openai(call) for call in message["tool_calls"])]
    if "content" in out and not isinstance(out["content"], str):
        out["content"] = _content_text(out["content"])
    return out


def tool_message(call_id: str, content: Any, name: str | None = None) -> dict[str, Any]:
    """The message that feeds a call's result back: role `tool`, the call's id, the result as text (JSON for
    anything but a string)."""
    message: dict[str, Any] = {"role": "tool", "tool_call_id": call_id, "content": _content_text(content)}
    if name is not None:
        message["name"] = name
    return message


def assistant_message(content: str, calls: Sequence[ToolCall]) -> dict[str, Any]:
    """The assistant's turn that made `calls` (OpenAI's form: `content` None when it said nothing else)."""
    message: dict[str, Any] = {"role": "assistant", "content": content or None}
    if calls:
        message["tool_calls"] = [c.to_openai() for c in calls]
    return message


# -- out of the reply -------------------------------------------------------------------------------------------
_HERMES = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)
_MISTRAL_ARGS = re.compile(r"([A-Za-z0-9_.\-]+)\[ARGS\]")


def parse_tool_calls(text: str, style: str | None = None,
                     tools: Sequence[dict[str, Any] | Tool] | None = None) -> tuple[str, list[ToolCall]]:
    """(the reply's text without its calls, the calls) from a model's reply. `style`: "hermes", "llama3",
    "mistral" or None (recognise any of them). `tools`: when given, a JSON object naming none of them is text, not a
    call (a bare JSON answer is then never mistaken for a Llama 3 call). A call whose JSON does not parse stays in
    the text. Calls get fresh ids (Mistral's own ids are kept)."""
    if style is not None and style not in STYLES:
        raise UserInputError(f"unknown tool-call style {style!r}; accepted: {', '.join(STYLES)}", param="style")
    names = None if tools is None else {t.name for t in tools_from_openai(tools)}
    if style in (None, "mistral") and "[TOOL_CALLS]" in text:
        return _parse_mistral(text, names)
    if style in (None, "hermes") and "<tool_call>" in text:
        return _parse_hermes(text, names)
    if style in (None, "llama3"):
        return _parse_llama3(text, names)
    return text.strip(), []


def _call(obj: Any, names: set[str] | None, style: str) -> ToolCall | None:
    """A call from a decoded `{"name", "arguments" | "parameters"}` object (None when it is not one)."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    if names is not None and obj["name"] not in names:
        return None
    arguments = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return None
    if not isinstance(arguments, dict):
        return None
    call_id = obj.get("id")
    return ToolCall(call_id if isinstance(call_id, str) else new_call_id(style), obj["name"], arguments)


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


def _parse_hermes(text: str, names: set[str] | None) -> tuple[str, list[ToolCall]]:
    calls: list[ToolCall] = []
    kept: list[str] = []
    last = 0
    for match in _HERMES.finditer(text):
        call = _call(_loads(match.group(1).strip()), names, "hermes")
        kept.append(text[last: match.start()])
        if call is None:
            kept.append(match.group(0))
        else:
            calls.append(call)
        last = match.end()
    kept.append(text[last:])
    return "".join(kept).strip(), calls


def _parse_llama3(text: str, names: set[str] | None) -> tuple[str, list[ToolCall]]:
    """Llama 3.1-3.3: `<|python_tag|>` then JSON, or a reply that is only JSON object(s) with "name" and
    "parameters" (several separated by ";"); anything else is text."""
    body = text.strip()
    prefix = ""
    if "<|python_tag|>" in body:
        prefix, body = body.split("<|python_tag|>", 1)
        body = body.replace("<|eom_id|>", "").replace("<|eot_id|>", "").strip()
    if not body.startswith("{"):
        return text.strip(), []
    decoder = json.JSONDecoder()
    calls: list[ToolCall] = []
    position = 0
    while position < len(body):
        try:
            obj, end = decoder.raw_decode(body, position)
        except json.JSONDecodeError:
            return text.strip(), []
        call = _call(obj, names, "llama3")
        if call is None:
            return text.strip(), []
        calls.append(call)
        position = end
        while position < len(body) and body[position] in " \t\n;":
            position += 1
    return prefix.strip(), calls


def _parse_mistral(text: str, names: set[str] | None) -> tuple[str, list[ToolCall]]:
    """`[TOOL_CALLS][{"name", "arguments", "id"?}, ...]` (v3 templates) or `[TOOL_CALLS]name[ARGS]{...}` (v11+),
    one or more, after optional text."""
    content, _, rest = text.partition("[TOOL_CALLS]")
    calls: list[ToolCall] = []
    decoder = json.JSONDecoder()
    for part in rest.split("[TOOL_CALLS]"):
        part = part.replace("</s>", "").strip()
        args = _MISTRAL_ARGS.match(part)
        if args:
            obj, _ = _raw(decoder, part, args.end())
            call = _call({"name": args.group(1), "arguments": obj}, names, "mistral")
            if call is not None:
                calls.append(call)
            continue
        obj, _ = _raw(decoder, part, 0)
        for item in obj if isinstance(obj, list) else [obj]:
            call = _call(item, names, "mistral")
            if call is not None:
                calls.append(call)
    if not calls:
        return text.strip(), []
    return content.strip(), calls


def _raw(decoder: json.JSONDecoder, text: str, start: int) -> tuple[Any, int]:
    try:
        return decoder.raw_decode(text, start)
    except json.JSONDecodeError:
        return None, start


CALL_STARTS = ("<tool_call>", "[TOOL_CALLS]", "<|python_tag|>")  # how a reply starts a call, in each style


class HeldText:
    """A streamed reply that may turn into tool calls: its text goes out as it comes, except what may be the start
    of a call (a marker, a part of one at the end, a reply that opens with `{`): from there on it is held."""

    def __init__(self) -> None:
        self.text, self.sent, self.holding = "", 0, False

    def push(self, piece: str) -> str:
        """What of the text so far may go out now."""
        self.text += piece
        if self.holding or not self.text.strip():
            return ""
        if any(m in self.text for m in CALL_STARTS) or self.text.lstrip().startswith("{"):
            self.holding = True
            return ""
        safe = len(self.text)
        for marker in CALL_STARTS:  # hold a tail that could be a marker's beginning
            for n in range(len(marker) - 1, 0, -1):
                if self.text.endswith(marker[:n]):
                    safe = min(safe, len(self.text) - n)
                    break
        out, self.sent = self.text[self.sent : max(safe, self.sent)], max(safe, self.sent)
        return out

    def rest(self, content: str) -> str:
        """What of the final content was not sent yet."""
        sent = self.text[: self.sent]
        return content[len(sent):] if content.startswith(sent) else ""
