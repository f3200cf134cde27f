"""The tiny models of real families (tests/families.py): their tokenizers render a tool conversation with the
family's own chat template, their special tokens are single ids, and the models load in transformers and vLLM."""

from __future__ import annotations

import pytest
from families import FAMILIES, SPECS, build_family_model, chat_template_dir

ACTION = "<think>\nreasoning\n</think>\n\ntext ```python\nprint(1)\n```"
CONVERSATION = [{"role": "user", "content": "What is 1?"}, {"role": "assistant", "content": ACTION},
                {"role": "user", "content": "```output\n1\n```"}, {"role": "assistant", "content": "\\boxed{1}"}]

# What each template writes for the model to continue after the question: its generation prompt.
GENERATION_PROMPTS = {
    "qwen2_5": "<|im_start|>assistant\n",
    "qwen3": "<|im_start|>assistant\n",
    "qwen3_5_think": "<|im_start|>assistant\n<think>\n",
    "qwen3_6": "<|im_start|>assistant\n<think>\n",
    "deepseek_r1_distill": "<｜Assistant｜><think>\n",
    "deepseekv3": "<｜Assistant｜><think>\n",
    "llama3_1": "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "gemma3": "<start_of_turn>model\n",
    "phi3_5": "<|assistant|>\n",
    "glm4moe": "<|assistant|>",
    "cohere2": "<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|><|START_RESPONSE|>",
    "nemotron_3_nano": "<|im_start|>assistant\n<think>\n",
    "lfm2_2_5": "<|im_start|>assistant\n",
}


@pytest.fixture(scope="module")
def family_models(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("families")
    return {family: str(build_family_model(root / family, family)) for family in FAMILIES}


def load_tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def test_the_families_cover_the_templates_asked_for_and_use_the_original_files():
    assert {"qwen2_5", "qwen3", "qwen3_5_think", "deepseek_r1_distill", "deepseekv3", "llama3_1", "gemma3",
            "phi3_5", "glm4moe"} <= set(FAMILIES)
    assert set(GENERATION_PROMPTS) == set(FAMILIES)
    for file in FAMILIES.values():
        assert "_training" not in file and (chat_template_dir() / file).is_file()


@pytest.mark.parametrize("family", FAMILIES)
def test_the_tokenizer_renders_a_tool_conversation_with_the_family_template(family, family_models):
    tokenizer = load_tokenizer(family_models[family])
    assert tokenizer.chat_template == (chat_template_dir() / FAMILIES[family]).read_text(encoding="utf-8")
    text = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert "What is 1?" in text and "```output\n1\n```" in text and "\\boxed{1}" in text
    assert "print(1)\n```" in text  # the code survives even where the template drops the reasoning
    prompt = tokenizer.apply_chat_template(CONVERSATION[:1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith(GENERATION_PROMPTS[family]) and "What is 1?" in prompt


@pytest.mark.parametrize("family", FAMILIES)
def test_special_tokens_are_single_ids_and_only_the_special_ones_count_as_special(family, family_models):
    from mathagent.chat import special_token_ids

    spec = SPECS[family]
    tokenizer = load_tokenizer(family_models[family])
    special = special_token_ids(tokenizer)
    for token in spec.special + spec.plain:
        ids = tokenizer(token, add_special_tokens=False)["input_ids"]
        assert ids == [tokenizer.convert_tokens_to_ids(token)], token
        assert (ids[0] in special) == (token in spec.special), token
    assert (tokenizer.eos_token, tokenizer.pad_token, tokenizer.bos_token) == (spec.eos, spec.pad, spec.bos)
    # in a rendered conversation every marker the template writes is one token
    text = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    for token in spec.special + spec.plain:
        assert ids.count(tokenizer.convert_tokens_to_ids(token)) == text.count(token), token
    if spec.add_bos:
        assert tokenizer("x")["input_ids"][0] == tokenizer.bos_token_id


def test_phi3_5_turn_markers_swallow_the_whitespace_after_them_as_in_the_real_tokenizer(family_models):
    tokenizer = load_tokenizer(family_models["phi3_5"])
    ids = tokenizer("<|user|>\nhi<|end|>\n<|assistant|>\n", add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == "<|user|>hi<|end|><|assistant|>"


@pytest.mark.parametrize("family", FAMILIES)
def test_the_model_loads_with_transformers_and_a_forward_pass_runs(family, family_models):
    import torch
    from transformers import AutoModelForCausalLM

    spec = SPECS[family]
    tokenizer = load_tokenizer(family_models[family])
    model = AutoModelForCausalLM.from_pretrained(family_models[family]).eval()
    assert model.config.head_dim == 64 and model.config.vocab_size == len(tokenizer)
    stops = [tokenizer.convert_tokens_to_ids(t) for t in (spec.eos, *spec.stops)]
    assert model.generation_config.eos_token_id == (stops if len(stops) > 1 else stops[0])
    ids = tokenizer(tokenizer.apply_chat_template(CONVERSATION, tokenize=False), add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), len(tokenizer)) and torch.isfinite(logits).all()


def test_vllm_rolls_out_a_family_model_with_its_ids(family_models, tmp_path):
    """In its own process: an in-process vLLM engine tears down vLLM's process groups when it closes, which
    would break the session's engine (tests/conftest.py) for every test after this one."""
    import json
    import os
    import subprocess
    import sys

    problem = json.dumps({"id": "p", "question": "What is 2+3?", "answer": "5"}) + "\n"
    proc = subprocess.run([sys.executable, "-m", "mathagent.cli", "rollout", "--model", family_models["qwen3"],
                           "--max-tokens", "4", "--max-turns", "1", "--temperature", "1.0"], input=problem,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "MATHAGENT_VERBOSE": "0"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    [trajectory] = [json.loads(line) for line in proc.stdout.splitlines()]
    [prompt, action] = trajectory["messages"]
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(family_models["qwen3"])
    assert tokenizer.decode(trajectory["prompt_ids"]).endswith(GENERATION_PROMPTS["qwen3"])
    assert 1 <= len(action["token_ids"]) <= 4 and len(action["logprobs"]) == len(action["token_ids"])
