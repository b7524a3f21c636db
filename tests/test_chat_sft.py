"""The `chat-sft` recipe (chapters 15 and 17): a smoke run whose folder loads with torchbook.load, transformers and
the chat CLI; the quick preset (SmolLM2 with LoRA) lowers the held-out loss (slow)."""

from __future__ import annotations

import json

import pytest
import torch

import torchbook
from torchbook.config import build_config
from torchbook.recipes import chat_sft


def test_smoke_run_folder_loads_everywhere(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = build_config(chat_sft.Config, "smoke", ["pack=true"])
    run = chat_sft.run(config, tmp_path / "run")
    results = json.loads((run.path / "results.json").read_text())
    assert results["trainable_parameters"] < results["parameters"] / 100  # LoRA: adapters only
    assert results["held_out_loss_after"] < results["held_out_loss_before"]
    report = (run.path / "report.md").read_text()
    assert "held-out loss before" in report and "answered before and after" in report
    loaded = torchbook.load(run.path)
    assert loaded.recipe == "chat-sft" and loaded.meta["chat_template"] and loaded.meta["end_token_ids"]
    # transformers reads the same weights, tokenizer and chat template
    hf_tokenizer = AutoTokenizer.from_pretrained(run.model_dir)
    messages = [{"role": "user", "content": "Name a colour."}]
    ids = torch.tensor([hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                         return_dict=True)["input_ids"]])
    expected = torchbook.hub.prompts.chat_token_ids(loaded.tokenizer, messages, loaded.meta)
    assert ids[0].tolist() == expected
    hf_model = AutoModelForCausalLM.from_pretrained(run.model_dir).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf_model(ids).logits, loaded.model(ids), atol=1e-4, rtol=1e-4)
    # the special tokens are the tokenizer's own, never transformers' defaults for another vocabulary
    assert hf_model.config.eos_token_id == hf_tokenizer.convert_tokens_to_ids(loaded.meta["eos_token"])
    assert hf_model.config.eos_token_id < hf_model.config.vocab_size
    # the PEFT adapter on the base weights gives the merged model's logits
    assert (run.path / "adapter" / "adapter_config.json").exists()
    base = chat_sft.load_base(run.load_config(chat_sft.Config)).model
    torchbook.hub.save_hf(base, tmp_path / "base")
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), run.path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(peft.eval()(ids).logits, loaded.model(ids), atol=1e-4, rtol=1e-4)
    assert chat_sft.evaluate(run.path)["held_out_loss"] == pytest.approx(results["held_out_loss_after"], rel=1e-4)


def test_settings_are_checked() -> None:
    with pytest.raises(torchbook.errors.UserInputError, match="qlora=true needs lora=true"):
        build_config(chat_sft.Config, "smoke", ["lora=false", "qlora=true"]).validate()
    with pytest.raises(torchbook.errors.UserInputError, match="format="):
        build_config(chat_sft.Config, "smoke", ["format=chatml"]).validate()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_quick_lora_on_smollm2_lowers_the_held_out_loss(tmp_path) -> None:  # type: ignore[no-untyped-def]
    run = chat_sft.run(build_config(chat_sft.Config, "quick", ["progress=false"]), tmp_path / "run")
    results = json.loads((run.path / "results.json").read_text())
    assert results["held_out_loss_after"] < results["held_out_loss_before"] - 0.05
