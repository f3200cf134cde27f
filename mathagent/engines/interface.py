"""The one small interface every generation backend implements, and the types it speaks.

An `Engine` completes a batch of `Request`s (token-id prompts) under one `Sampling`, returning one `Completion`
each, and counts its work in `EngineStats`. The backends (`engines.vllm`, `engines.hf`, `engines.openai`) and
the agent loop import these from here; `mathagent.engines` re-exports them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class Request:
    """One prompt to complete once. `seed` makes its sample reproducible where the backend allows it."""

    prompt_ids: list[int]
    seed: int | None = None


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.7
    top_p: float = 1.0
    max_tokens: int = 512
    stop: tuple[str, ...] = ()


@dataclass
class Completion:
    text: str  # the generated text, stop string excluded
    num_tokens: int  # generated tokens (for throughput figures)
    finish_reason: str  # "stop" (EOS or a stop string) or "length" (cut by max_tokens)
    # Every id the engine sampled, in order: through the end-of-turn token when the model emitted one, through
    # the last token of the stop string when one stopped it (the agent keeps the ids of the text it keeps).
    token_ids: list[int] = field(default_factory=list)
    # log pi(token | context) of each of `token_ids` under the model itself: temperature 1, before temperature,
    # top-p and penalties (vLLM's default `logprobs_mode`, "raw_logprobs"), what a trainer recomputes.
    logprobs: list[float] | None = None


@dataclass
class EngineStats:
    calls: int = 0  # generate calls; the agent loop makes at most one per turn
    requests: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    seconds: float = 0.0
    # Completions whose token ids are their text's tokenization, without log-probs: from a server that does not
    # return the ids it sampled (`engines.openai`). Zero for the in-process engines.
    retokenized: int = 0


class Engine(Protocol):
    """`generate` completes a batch in one call. An engine with continuous batching also has
    `submit(key, request, sampling)` (queue one request) and `step() -> [(key, completion), ...]` (advance the
    running batch; the requests that finished), which the agent loop uses so that no trajectory waits for
    another's action or cell (`agent.run_agent`)."""

    tokenizer: object  # a transformers tokenizer with the model's chat template
    stats: EngineStats
    on_cpu: bool  # generates on this machine's CPU, beside the cells (the default schedule: agent.resolve_schedule)

    def generate(self, requests: list[Request], sampling: Sampling) -> list[Completion]: ...

    def close(self) -> None: ...
