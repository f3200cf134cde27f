"""Shared fixtures: the tiny model (built once per session), real engines, and a scripted policy.

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
def tiny_tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


@pytest.fixture(scope="session")
def vllm_engine(tiny_model):
    from mathagent.engines import open_engine

    engine = open_engine("vllm", tiny_model, seed=0)
    yield engine
    engine.close()


@pytest.fixture(scope="session")
def hf_engine(tiny_model):
    from mathagent.engines import open_engine

    engine = open_engine("hf", tiny_model, seed=0)
    yield engine
    engine.close()


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
            if finish == "length":
                text = self.tokenizer.decode(ids[: sampling.max_tokens])
            self.stats.generated_tokens += min(len(ids), sampling.max_tokens)
            out.append(Completion(text=text, num_tokens=min(len(ids), sampling.max_tokens), finish_reason=finish))
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
