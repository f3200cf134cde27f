"""Both backends on the tiny model: one call completes a whole batch, with the interface's finish reasons, and
every completion carries the ids it sampled with their log-probs under the model."""

import re

import pytest
from conftest import LOGPROB_TOLERANCE, check_sampled_ids

from mathagent.chat import prompt_ids
from mathagent.engines import Request, Sampling


@pytest.mark.parametrize("backend", ["vllm", "hf"])
def test_one_generate_call_completes_every_request(backend, request):
    engine = request.getfixturevalue(f"{backend}_engine")
    calls = engine.stats.calls
    ids = prompt_ids(engine.tokenizer, [{"role": "user", "content": "What is 2+3?"}])
    out = engine.generate([Request(ids, seed=s) for s in range(6)], Sampling(temperature=1.0, max_tokens=16))
    assert len(out) == 6
    assert engine.stats.calls == calls + 1
    for c in out:
        assert c.finish_reason in ("stop", "length")
        assert 0 < c.num_tokens <= 16 or c.finish_reason == "stop"
        assert c.finish_reason == "stop" or c.num_tokens == 16


def test_vllm_samples_are_reproducible_per_request_seed(vllm_engine):
    ids = prompt_ids(vllm_engine.tokenizer, [{"role": "user", "content": "Find x."}])
    sampling = Sampling(temperature=1.0, max_tokens=12)
    first = vllm_engine.generate([Request(ids, seed=7), Request(ids, seed=8)], sampling)
    again = vllm_engine.generate([Request(ids, seed=8), Request(ids, seed=7), Request(ids, seed=9)], sampling)
    assert first[0].text == again[1].text and first[1].text == again[0].text
    assert first[0].text != first[1].text


def test_vllm_continuous_batching_samples_what_one_generate_call_samples(vllm_engine):
    """Requests that join the running batch at different steps get the same samples, per seed, as a batch
    sent in one call: the agent loop's schedule does not change its trajectories."""
    ids = [prompt_ids(vllm_engine.tokenizer, [{"role": "user", "content": q}]) for q in ("What is 2+3?", "Find 7*8.")]
    sampling = Sampling(temperature=1.0, max_tokens=24, stop=("```output",))
    requests = [Request(ids[0], seed=7), Request(ids[1], seed=8), Request(ids[0], seed=9)]
    batch = vllm_engine.generate(requests, sampling)
    vllm_engine.submit("0", requests[0], sampling)
    finished = dict(vllm_engine.step())
    vllm_engine.submit("1", requests[1], sampling)
    vllm_engine.submit("2", requests[2], sampling)
    while len(finished) < 3:
        finished.update(vllm_engine.step())
    assert [finished[key].text for key in "012"] == [c.text for c in batch]
    assert [finished[key].token_ids for key in "012"] == [c.token_ids for c in batch]
    for key, c in zip("012", batch, strict=True):
        assert finished[key].logprobs == pytest.approx(c.logprobs, abs=LOGPROB_TOLERANCE)
    assert len({c.text for c in batch}) == 3


@pytest.mark.parametrize("backend", ["vllm", "hf"])
def test_greedy_decoding_is_deterministic(backend, request):
    engine = request.getfixturevalue(f"{backend}_engine")
    ids = prompt_ids(engine.tokenizer, [{"role": "user", "content": "Compute 7*6."}])
    a, b = engine.generate([Request(ids), Request(ids)], Sampling(temperature=0.0, max_tokens=10))
    assert a.text == b.text


@pytest.mark.parametrize("temperature", [0.7, 0.0])
@pytest.mark.parametrize("backend", ["vllm", "hf"])
def test_completions_carry_their_ids_through_eos_and_the_models_log_probs_of_them(
        backend, temperature, request, eos_prompt, model_logprobs):
    """The ids and log-probs of prompts of different lengths (transformers pads them on the left) sampled at
    the agent's temperature and greedily: the log-probs are the model's at temperature 1 whatever the sampling
    temperature, within LOGPROB_TOLERANCE of the float64 reference (the float32 engines are ~1e-6 from it; a
    log-prob taken after the temperature is 0.01-0.3 away on the tiny model, one a position off ~0.7)."""
    engine = request.getfixturevalue(f"{backend}_engine")
    prompts = [prompt_ids(engine.tokenizer, [{"role": "user", "content": q}])
               for q in ("What is 2+3?", "Find the remainder when 2024 is divided by 7, and explain each step.")]
    prompts.append(eos_prompt)  # greedy decoding ends it with EOS
    requests = [Request(p, seed=seed) for seed, p in enumerate(prompts)]
    sampling = Sampling(temperature=temperature, max_tokens=24)
    out = engine.generate(requests, sampling)
    for r, c in zip(requests, out, strict=True):
        check_sampled_ids(c, r.prompt_ids, engine.tokenizer, model_logprobs, sampling)
    if temperature == 0.0:
        assert out[-1].finish_reason == "stop" and out[-1].token_ids[-1] == engine.tokenizer.eos_token_id


@pytest.mark.parametrize("temperature", [0.7, 0.0])
@pytest.mark.parametrize("backend", ["vllm", "hf"])
def test_a_stop_string_ends_the_ids_at_the_token_that_completes_it(backend, temperature, request, model_logprobs):
    """A stop string cuts the text before it, and the ids after the token that completes it (which may run past
    the string): they are the same sample's ids as without the stop string, up to that token."""
    engine = request.getfixturevalue(f"{backend}_engine")
    ids = prompt_ids(engine.tokenizer, [{"role": "user", "content": "Compute."}])
    (full,) = engine.generate([Request(ids, seed=5)], Sampling(temperature=temperature, max_tokens=24))
    # Three letters from the second half, so that a dozen tokens come before; letters only, since the tiny model
    # writes stray bytes, whose characters a tokenizer decodes differently alone.
    stop = re.search(r"[A-Za-z]{3}", full.text[len(full.text) // 2 :]).group()
    sampling = Sampling(temperature=temperature, max_tokens=24, stop=(stop,))
    (cut,) = engine.generate([Request(ids, seed=5)], sampling)
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.index(stop)]
    assert cut.token_ids == full.token_ids[: len(cut.token_ids)]
    decode = engine.tokenizer.decode
    assert stop in decode(cut.token_ids) and stop not in decode(cut.token_ids[:-1])
    check_sampled_ids(cut, ids, engine.tokenizer, model_logprobs, sampling)


def test_stop_strings_are_excluded_from_the_text(hf_engine):
    ids = prompt_ids(hf_engine.tokenizer, [{"role": "user", "content": "Compute."}])
    sampling = Sampling(temperature=0.0, max_tokens=20)
    (full,) = hf_engine.generate([Request(ids)], sampling)
    stop = full.text[3:6]
    (cut,) = hf_engine.generate([Request(ids)], Sampling(temperature=0.0, max_tokens=20, stop=(stop,)))
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.index(stop)]


@pytest.fixture(scope="module")
def lora_adapter(tiny_model, tmp_path_factory):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    path = tmp_path_factory.mktemp("adapter") / "lora"
    get_peft_model(model, config).save_pretrained(path)
    return str(path)


def test_a_lora_adapter_changes_what_transformers_generates(tiny_model, lora_adapter, hf_engine):
    from mathagent.engines import open_engine

    ids = prompt_ids(hf_engine.tokenizer, [{"role": "user", "content": "What is 2+3?"}])
    greedy = Sampling(temperature=0.0, max_tokens=8)
    adapted = open_engine("hf", tiny_model, adapter=lora_adapter)
    (with_adapter,) = adapted.generate([Request(ids)], greedy)
    (without,) = hf_engine.generate([Request(ids)], greedy)
    assert with_adapter.text != without.text


@pytest.mark.slow
def test_rollout_with_an_adapter_on_vllm_generates_like_transformers_with_it(tiny_model, lora_adapter):
    """vLLM keeps process-wide state, so a second engine runs in its own process: the CLI's."""
    import json
    import subprocess
    import sys

    problem = '{"id": "p", "question": "What is 2+3?"}\n'
    texts = {}
    for backend in ("vllm", "hf"):
        args = [sys.executable, "-m", "mathagent.cli", "rollout", "--model", tiny_model, "--backend", backend,
                "--adapter", lora_adapter, "--temperature", "0", "--max-tokens", "6", "--max-turns", "1"]
        proc = subprocess.run(args, input=problem, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        texts[backend] = json.loads(proc.stdout)["messages"][-1]["content"]
    # the backends may compute in different precisions (vLLM uses bf16 on CPUs that have it): compare the start
    assert texts["vllm"][:3] == texts["hf"][:3]


def test_what_an_engine_prints_while_starting_is_shown_only_if_the_start_fails(capfd, monkeypatch):
    """Load bars and C++ warnings written straight to file descriptor 2 while an engine starts are held back;
    a start that fails shows them, then its error."""
    import os

    from mathagent.engines import VERBOSE_ENV, captured_stderr

    monkeypatch.delenv(VERBOSE_ENV, raising=False)
    with captured_stderr():
        os.write(2, b"Loading checkpoint shards: 100%\n")
    assert capfd.readouterr().err == ""
    with pytest.raises(RuntimeError, match="no weights"), captured_stderr():
        os.write(2, b"config.json read\n")
        raise RuntimeError("no weights")
    assert capfd.readouterr().err == "config.json read\n"
    monkeypatch.setenv(VERBOSE_ENV, "1")
    with captured_stderr():
        os.write(2, b"shown at once\n")
    assert capfd.readouterr().err == "shown at once\n"
