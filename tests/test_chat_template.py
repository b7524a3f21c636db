"""Chat templates render exactly as transformers' apply_chat_template renders them."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast

from torchbook.chat_template import DEFAULT_TEMPLATE, TemplateError, render_chat
from torchbook.hub.gguf import default_chat_model

LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)
CONVERSATIONS = [
    [{"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3? Réponds en français."}],
]


def hf_tokenizer(template: str) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE()), bos_token="<s>", eos_token="</s>",
                                   chat_template=template)


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("generation_prompt", [True, False])
def test_llama_style_and_default_templates_match_transformers(messages, generation_prompt):
    for template in (LLAMA2, DEFAULT_TEMPLATE):
        expected = hf_tokenizer(template).apply_chat_template(messages, tokenize=False,
                                                             add_generation_prompt=generation_prompt)
        ours = render_chat(messages, template, generation_prompt, bos_token="<s>", eos_token="</s>")
        assert ours == expected


def test_smollm2_template_from_its_gguf_matches_transformers():
    import gguf
    from transformers import AutoTokenizer

    from torchbook.hub.gguf import field_value

    path = default_chat_model()
    template = field_value(gguf.GGUFReader(str(path)), "tokenizer.chat_template")  # what our loader reads
    assert template and "<|im_start|>" in template
    reference = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    for messages in CONVERSATIONS:
        expected = reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert render_chat(messages, template, True, bos_token=reference.bos_token, eos_token=reference.eos_token) == expected


def test_template_errors_are_clear():
    with pytest.raises(TemplateError, match="Conversation roles must alternate"):
        render_chat([{"role": "assistant", "content": "x"}], LLAMA2, bos_token="<s>", eos_token="</s>")
    with pytest.raises(TemplateError, match="does not parse"):
        render_chat([{"role": "user", "content": "x"}], "{% for %}")
    with pytest.raises(TemplateError, match="must be a dict with a 'role'"):
        render_chat(["hello"])  # type: ignore[list-item]
