"""The embedded tiny model: built locally, loads in both backends' loaders, has the chat template we rely on."""

import json

import pytest
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


def test_a_model_option_is_tiny_a_model_directory_or_a_hub_id(tmp_path, tiny_model):
    from mathagent.errors import UserError
    from mathagent.tiny import check_model

    for name in ("tiny", "Qwen/Qwen2.5-Math-1.5B-Instruct", tiny_model, None):
        check_model("--model", name)
    (tmp_path / "file").write_text("x")
    for name, message in ((str(tmp_path / "file"), "is a file"), (str(tmp_path), "no config.json in it"),
                          (str(tmp_path / "missing"), "no such directory")):
        with pytest.raises(UserError, match=f"^--ref-model {name}: {message}"):
            check_model("--ref-model", name)
    with pytest.raises(UserError, match="no adapter_config.json in it: not a peft adapter directory"):
        check_model("--adapter", tiny_model, adapter=True)


def test_tiny_resolves_to_the_cached_default_build_and_anything_else_to_itself(tmp_path, monkeypatch):
    from mathagent import tiny

    monkeypatch.setenv("MATHAGENT_CACHE", str(tmp_path))
    assert tiny.resolve_model("org/name") == "org/name"
    built = []
    monkeypatch.setattr(tiny, "build_tiny_model", lambda path, **kwargs: built.append((path, kwargs)))
    cached = tiny.tiny_model_dir()
    cached.mkdir(parents=True)
    (cached / "mathagent_tiny.json").write_text(json.dumps(
        {"version": tiny.TINY_VERSION, "seed": 0, "warmup_steps": tiny.TINY_WARMUP_STEPS}))
    assert tiny.resolve_model("tiny") == str(cached) and built == []  # built once: the stamp says so
    (cached / "mathagent_tiny.json").write_text(json.dumps({"version": tiny.TINY_VERSION - 1}))
    assert tiny.resolve_model("tiny") == str(cached)
    assert built == [(cached, {"warmup_steps": tiny.TINY_WARMUP_STEPS})]  # a stale build is rebuilt
