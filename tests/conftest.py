"""Shared fixtures: the tiny model (built once per session), real engines, the float64 reference of the model's
log-probs that the engines' are checked on, and a scripted policy.

The scripted engine is a real `Engine` whose next action is a function of the state. It is used only where
the logic under test is the loop's, not the model's (how many engine calls a rollout costs, how state and
observations flow); everything else runs the tiny model on vLLM or transformers.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable

import pytest

# vLLM on a CPU: in-process engine core (starts in seconds) and a small KV cache instead of ~9 GiB.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("MATHAGENT_VLLM_KV_BYTES", str(64 * 2**20))
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from mathagent.engines import Completion, EngineStats, Request, Sampling  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    from mathagent.tiny import build_tiny_model

    return str(build_tiny_model(tmp_path_factory.mktemp("models") / "tiny"))


@pytest.fixture(scope="session")
def ref_model(tiny_model, tmp_path_factory) -> str:
    """A reference policy different from the tiny model: its weights plus noise."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    out = tmp_path_factory.mktemp("ref")
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(out)
    return str(out)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


@pytest.fixture(scope="session")
def vllm_engine(tiny_model):
    from mathagent.engines import open_engine

    # float32 on every CPU: vLLM would pick bfloat16 where the CPU has bf16 instructions, and the engines'
    # log-probs are checked against float32 transformers.
    engine = open_engine("vllm", tiny_model, seed=0, dtype="float32")
    # The first sampled log-probs compile part of vLLM's sampler (seconds): here, not inside a timed test.
    engine.generate([Request([1, 2, 3], seed=0)], Sampling(temperature=1.0, max_tokens=2))
    engine.stats = EngineStats()
    yield engine
    engine.close()


@pytest.fixture(scope="session")
def hf_engine(tiny_model):
    from mathagent.engines import open_engine

    engine = open_engine("hf", tiny_model, seed=0)
    yield engine
    engine.close()


@pytest.fixture(scope="session")
def reference_model(tiny_model):
    """The tiny model in transformers in float64: the reference the engines' float32 log-probs are checked on."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float64).eval()


@pytest.fixture(scope="session")
def model_logprobs(reference_model) -> Callable[[list[int], list[int]], list[float]]:
    """log pi(token | context) of each of `token_ids` after `prompt_ids`, teacher-forced in one forward pass of
    the reference model: what a trainer recomputes, and so what an engine's `Completion.logprobs` must be."""
    import torch

    def logprobs(prompt_ids: list[int], token_ids: list[int]) -> list[float]:
        with torch.inference_mode():
            logits = reference_model(torch.tensor([[*prompt_ids, *token_ids]])).logits[0, len(prompt_ids) - 1 : -1]
        return torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(token_ids)[:, None])[:, 0].tolist()

    return logprobs


EOS_SEARCH_STEPS = 16


@pytest.fixture(scope="session")
def eos_prompt(reference_model, tiny_tokenizer) -> list[int]:
    """A prompt after which the tiny model's greedy decoding emits EOS within EOS_SEARCH_STEPS tokens, each
    step's choice leading the runner-up by at least 0.01 in logit, so that no engine's float32 rounding (~1e-6)
    changes the path.

    Random weights rarely choose EOS, so it is searched for: the chat prompt followed by each ordinary token of
    the vocabulary in turn; the one whose greedy path to EOS is longest is kept."""
    import torch

    from mathagent.chat import prompt_ids

    tokenizer = tiny_tokenizer
    chat = prompt_ids(tokenizer, [{"role": "user", "content": "What is 2+3?"}])
    candidates = [t for t in range(len(tokenizer)) if t not in tokenizer.all_special_ids]
    prompts = torch.tensor([[*chat, t] for t in candidates])
    with torch.inference_mode():
        out = reference_model.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=False,
                                       max_new_tokens=EOS_SEARCH_STEPS, return_dict_in_generate=True,
                                       output_logits=True, pad_token_id=tokenizer.pad_token_id,
                                       eos_token_id=tokenizer.eos_token_id)
    top_two = [step.topk(2, dim=-1).values for step in out.logits]
    leads = torch.stack([values[:, 0] - values[:, 1] for values in top_two], dim=1)
    best = None  # (length of the path to EOS, row)
    for row, path in enumerate(out.sequences[:, prompts.shape[1] :].tolist()):
        if tokenizer.eos_token_id in path:
            length = path.index(tokenizer.eos_token_id) + 1
            if leads[row, :length].min() >= 0.01 and (best is None or length > best[0]):
                best = (length, row)
    assert best is not None, "no prompt of the search leads the tiny model's greedy decoding to EOS"
    return [*chat, candidates[best[1]]]


LOGPROB_TOLERANCE = 1e-4  # float32 engines against the float64 reference differ by ~1e-6 (see test_engines)


def check_sampled_ids(completion: Completion, prompt: list[int], tokenizer, model_logprobs, sampling: Sampling):
    """What a completion says of the ids it sampled (`Completion.token_ids`, `.logprobs`), for every engine that
    returns them: one log-prob per id, the model's own; the text is their decoding (up to a stop string); EOS,
    when the model emitted it, is the last id."""
    ids = completion.token_ids
    assert len(ids) == len(completion.logprobs) == completion.num_tokens
    assert tokenizer.decode(ids, skip_special_tokens=True).startswith(completion.text)
    assert tokenizer.eos_token_id not in ids[:-1]
    if completion.finish_reason == "length":
        assert len(ids) == sampling.max_tokens and ids[-1] != tokenizer.eos_token_id
    elif not sampling.stop:
        assert ids[-1] == tokenizer.eos_token_id
    reference = model_logprobs(prompt, ids)
    assert max(abs(a - b) for a, b in zip(completion.logprobs, reference, strict=True)) <= LOGPROB_TOLERANCE


class ScriptedEngine:
    """An engine whose action is `policy(state text, observations so far)`; counts its calls like any engine."""

    def __init__(self, tokenizer, policy: Callable[[str, int], str]):
        self.tokenizer = tokenizer
        self.policy = policy
        self.stats = EngineStats()

    def generate(self, requests: list[Request], sampling: Sampling) -> list[Completion]:
        self.stats.calls += 1
        self.stats.requests += len(requests)
        out = []
        for r in requests:
            state = self.tokenizer.decode(r.prompt_ids)
            text = self.policy(state, state.count("```output\n"))
            for stop in sampling.stop:
                if stop in text:
                    text = text[: text.index(stop)]
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            finish = "length" if len(ids) > sampling.max_tokens else "stop"
            ids = ids[: sampling.max_tokens]
            if finish == "length":
                text = self.tokenizer.decode(ids)
            self.stats.generated_tokens += len(ids)
            out.append(Completion(text=text, num_tokens=len(ids), finish_reason=finish, token_ids=ids, logprobs=None))
        return out

    def close(self) -> None:
        pass


def last_output(state: str) -> str | None:
    """The text of the last ```output block in a rendered state."""
    found = re.findall(r"```output\n(.*?)\n```", state, re.DOTALL)
    return found[-1] if found else None


@pytest.fixture
def scripted(tiny_tokenizer):
    return lambda policy: ScriptedEngine(tiny_tokenizer, policy)


@pytest.fixture(scope="session")
def sandbox():
    from mathagent.sandbox import Sandbox

    with Sandbox(timeout=10.0) as box:
        yield box


@pytest.fixture(scope="session")
def grader():
    from mathagent.grading import Grader

    with Grader() as g:
        yield g


@pytest.fixture(scope="session")
def mistral_tokenizer(tmp_path_factory):
    """Mistral-7B's real 32,000-token sentencepiece tokenizer (shipped by mistral_common), with the [INST]
    chat template of `mathagent.chat` (observations as user turns)."""
    import importlib.util
    import json
    import shutil
    from pathlib import Path

    from transformers import AutoTokenizer

    from mathagent.chat import MISTRAL_TEMPLATE

    spec = importlib.util.find_spec("mistral_common")
    if spec is None or spec.origin is None:
        pytest.skip("mistral_common is not installed")
    source = Path(spec.origin).parent / "data" / "tokenizer.model.v1"
    folder = tmp_path_factory.mktemp("mistral")
    shutil.copy(source, folder / "tokenizer.model")
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = MISTRAL_TEMPLATE
    return tokenizer


@pytest.fixture(scope="module")
def one_torch_thread():
    """Training tests run torch on one thread: on two shared, busy cores, two threads run 5-40x slower, and
    results that must agree bit for bit (resume) come from the same kernels."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
