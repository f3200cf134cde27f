"""The embedded tiny model: built locally, loads in both backends' loaders, has the chat template we rely on."""

import json

from transformers import AutoConfig, AutoTokenizer

from mathagent.tiny import build_tiny_model


def test_the_tiny_model_has_chatml_eos_and_a_vllm_friendly_head_dim(tiny_model):
    config = AutoConfig.from_pretrained(tiny_model)
    assert config.head_dim == 64 and config.num_hidden_layers == 2
    tok = AutoTokenizer.from_pretrained(tiny_model)
    assert tok.eos_token == "<|im_end|>" and config.eos_token_id == tok.eos_token_id
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    # byte-level BPE: any text round-trips, observations with odd characters included
    sample = "```output\nZeroDivisionError: división ∞\n```"
    assert tok.decode(tok(sample, add_special_tokens=False)["input_ids"]) == sample


def test_builds_are_deterministic_and_warm_up_is_recorded(tmp_path):
    a = build_tiny_model(tmp_path / "a", seed=3, warmup_steps=2)
    b = build_tiny_model(tmp_path / "b", seed=3, warmup_steps=2)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert json.loads((a / "mathagent_tiny.json").read_text())["warmup_steps"] == 2
