"""Tool calls: definitions rendered as transformers renders them, calls parsed from each family's format."""

from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast

from torchbook.errors import UserInputError
from torchbook.generate.tool_calls import (
    HeldText,
    Tool,
    ToolCall,
    assistant_message,
    fallback_messages,
    new_call_id,
    parse_tool_calls,
    render_tools,
    template_has_tools,
    tool_message,
    tool_style,
    tool_system_prompt,
    tools_from_openai,
)
from torchbook.hub.prompts import DEFAULT_TEMPLATE

# Qwen2.5's chat template, the Hermes format (its tools section, tool calls and tool responses).
QWEN = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "description": "The time in a timezone",
                                         "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}}}}


def conversation() -> list[dict]:
    """A whole tool round: the user asks, the assistant calls two tools, both answer, the user goes on."""
    calls = [ToolCall("call_1", "get_weather", {"city": "Paris", "unit": "celsius"}),
             ToolCall("call_2", "get_time", {"tz": "Europe/Paris"})]
    return [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Weather and time in Paris?"},
            assistant_message("", calls),
            tool_message("call_1", {"temperature": 18, "sky": "clear"}, name="get_weather"),
            tool_message("call_2", "14:05", name="get_time"),
            {"role": "assistant", "content": "18 °C and clear; it is 14:05."},
            {"role": "user", "content": "Thanks!"}]


def hf_render(template: str, messages: list[dict], tools: list[dict] | None) -> str:
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE()), bos_token="<s>",
                                        eos_token="</s>", chat_template=template)
    return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)


def test_a_template_with_a_tools_section_renders_as_transformers_does():
    meta = {"chat_template": QWEN, "bos_token": "<s>", "eos_token": "</s>"}
    assert template_has_tools(QWEN) and tool_style(QWEN) == "hermes"
    messages = conversation()
    # transformers' own rendering, with the arguments as objects (its templates dump them with tojson)
    reference = [dict(m) for m in messages]
    reference[2] = {**reference[2], "tool_calls": [
        {"id": c["id"], "type": "function",
         "function": {"name": c["function"]["name"], "arguments": json.loads(c["function"]["arguments"])}}
        for c in messages[2]["tool_calls"]]}
    assert render_tools(messages, [WEATHER, TIME], meta) == hf_render(QWEN, reference, [WEATHER, TIME])
    assert '"name": "get_weather"' in render_tools(messages, [WEATHER], meta)
    assert render_tools(messages[:2], [], meta) == hf_render(QWEN, messages[:2], None)  # no tools: plain chat


def test_a_template_without_tools_gets_the_system_prompt_fallback_and_text_calls():
    assert not template_has_tools(DEFAULT_TEMPLATE) and not template_has_tools(None)
    meta = {"chat_template": None}
    prompt = render_tools(conversation(), [WEATHER, TIME], meta)
    # the tools join the system message; the calls and their results are text a ChatML model reads
    assert prompt.startswith("<|im_start|>system\nBe brief.\n\nYou may call one or more functions")
    assert json.dumps(Tool.from_openai(WEATHER).to_openai()) in prompt
    assert ('<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", '
            '"unit": "celsius"}}\n</tool_call>\n<tool_call>\n{"name": "get_time"') in prompt
    assert ('<|im_start|>user\n<tool_response>\n{"temperature": 18, "sky": "clear"}\n</tool_response>\n'
            '<tool_response>\n14:05\n</tool_response><|im_end|>') in prompt
    assert prompt.endswith("<|im_start|>user\nThanks!<|im_end|>\n<|im_start|>assistant\n")
    # without a system message the fallback adds one first
    first = fallback_messages([{"role": "user", "content": "hi"}], [WEATHER])
    assert first[0] == {"role": "system", "content": tool_system_prompt([WEATHER])}
    # what the fallback renders for an assistant's calls parses back to the same calls
    assistant = fallback_messages([assistant_message("Let me check.", [ToolCall("x", "get_time", {"tz": "UTC"})])])
    content, calls = parse_tool_calls(assistant[0]["content"])
    assert content == "Let me check." and [(c.name, c.arguments) for c in calls] == [("get_time", {"tz": "UTC"})]


def test_hermes_calls_are_parsed_with_the_text_around_them():
    text = ('I will look it up.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>\n'
            '<tool_call>\n{"name": "get_time", "arguments": "{\\"tz\\": \\"CET\\"}"}\n</tool_call>')
    content, calls = parse_tool_calls(text)
    assert content == "I will look it up."
    assert [(c.name, c.arguments) for c in calls] == [("get_weather", {"city": "Oslo"}), ("get_time", {"tz": "CET"})]
    assert all(c.id.startswith("call_") and len(c.id) == 29 for c in calls) and calls[0].id != calls[1].id
    # a call whose JSON is broken stays in the text; an unclosed last tag (the end token came first) still parses
    broken = '<tool_call>\n{"name": "get_weather", "arguments": {"city": }\n</tool_call>'
    assert parse_tool_calls(broken) == (broken, [])
    _, calls = parse_tool_calls('<tool_call>\n{"name": "get_time", "arguments": {}}\n')
    assert [(c.name, c.arguments) for c in calls] == [("get_time", {})]
    # a call to an undeclared tool is text when the tools are given
    assert parse_tool_calls(text, tools=[TIME])[1][0].name == "get_time"
    assert len(parse_tool_calls(text, tools=[TIME])[1]) == 1


def test_llama3_calls_bare_json_and_python_tag():
    content, calls = parse_tool_calls('{"name": "get_weather", "parameters": {"city": "Rome"}}', style="llama3")
    assert content == "" and [(c.name, c.arguments) for c in calls] == [("get_weather", {"city": "Rome"})]
    text = '<|python_tag|>{"name": "get_time", "parameters": {"tz": "UTC"}}; {"name": "get_weather", ' \
           '"parameters": {"city": "Rome"}}<|eom_id|>'
    assert [c.name for c in parse_tool_calls(text)[1]] == ["get_time", "get_weather"]
    # plain text, or JSON that is an answer rather than a call of a declared tool, is content
    assert parse_tool_calls("It is sunny.") == ("It is sunny.", [])
    answer = '{"name": "Ada", "parameters": {"age": 36}}'
    assert parse_tool_calls(answer, tools=[WEATHER, TIME]) == (answer, [])
    assert parse_tool_calls('{"name": "get_time", "parameters": {}} trailing words') == (
        '{"name": "get_time", "parameters": {}} trailing words', [])


def test_mistral_calls_both_forms_keep_their_ids():
    text = '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Lima"}, "id": "abc123XYZ"}, ' \
           '{"name": "get_time", "arguments": {"tz": "PET"}}]</s>'
    content, calls = parse_tool_calls(text)
    assert content == "" and calls[0].id == "abc123XYZ" and len(calls[1].id) == 9 and calls[1].id.isalnum()
    assert [(c.name, c.arguments) for c in calls] == [("get_weather", {"city": "Lima"}), ("get_time", {"tz": "PET"})]
    newer = 'Sure.[TOOL_CALLS]get_weather[ARGS]{"city": "Lima"}[TOOL_CALLS]get_time[ARGS]{"tz": "PET"}'
    content, calls = parse_tool_calls(newer, style="mistral")
    assert content == "Sure." and [c.name for c in calls] == ["get_weather", "get_time"]
    assert parse_tool_calls(newer, style="hermes") == (newer, [])  # one style only looks for its own format


def test_openai_round_trip_and_bad_tools():
    call = ToolCall(new_call_id(), "get_weather", {"city": "Zürich"})
    assert ToolCall.from_openai(call.to_openai()) == call
    assert json.loads(call.to_openai()["function"]["arguments"]) == {"city": "Zürich"}
    assert tools_from_openai([WEATHER])[0] == Tool("get_weather", "Current weather in a city",
                                                   WEATHER["function"]["parameters"])
    assert Tool.from_openai({"name": "ping"}).parameters == {"type": "object", "properties": {}}
    for bad, words in [({"type": "code_interpreter"}, "type 'function'"), ({"function": {"name": "a b"}}, "name"),
                       ({"function": {"name": "f", "parameters": [1]}}, "parameters")]:
        with pytest.raises(UserInputError, match=words):
            tools_from_openai([bad])
    with pytest.raises(UserInputError, match="repeated: get_time"):
        tools_from_openai([TIME, TIME])
    with pytest.raises(UserInputError, match="not JSON"):
        ToolCall.from_openai({"function": {"name": "f", "arguments": "{oops"}})
    with pytest.raises(UserInputError, match="style"):
        parse_tool_calls("x", style="gemma")


def test_held_text_streams_until_a_call_may_start() -> None:
    held = HeldText()
    assert held.push("Let me check") == "Let me check"
    assert held.push(" <tool") == " "  # "<tool" may begin "<tool_call>": held back
    assert held.push("_call>{\"name\": \"x\"}") == "" and held.holding
    assert held.rest("Let me check") == ""  # the parsed content (calls removed) was sent already
    text = HeldText()
    assert text.push("a <") == "a " and text.push("b") == "<b" and text.rest("a <b!") == "!"
    assert HeldText().push(' {"name"') == ""  # a reply opening with JSON may be a Llama 3 call
