"""Generation backends behind one small interface.

An engine takes a batch of token-id prompts and returns one completion each, in one call: the agent loop
sends every live trajectory of a turn in a single `generate` (never one request per trajectory), which is what
lets vLLM batch them and share their common prefixes.

    engine = open_engine("vllm", model, adapter=None, seed=0)
    completions = engine.generate([Request(ids, seed=1), ...], Sampling(temperature=0.7, max_tokens=512))
    engine.close()
"""

from __future__ import annotations

from dataclasses import dataclass
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


@dataclass
class EngineStats:
    calls: int = 0  # generate calls; the agent loop makes at most one per turn
    requests: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    seconds: float = 0.0


class Engine(Protocol):
    tokenizer: object  # a transformers tokenizer with the model's chat template
    stats: EngineStats

    def generate(self, requests: list[Request], sampling: Sampling) -> list[Completion]: ...

    def close(self) -> None: ...


BACKENDS = ("vllm", "hf")


def open_engine(
    backend: str,
    model: str,
    *,
    adapter: str | None = None,
    seed: int = 0,
    dtype: str = "auto",
    max_model_len: int | None = None,
    **options,
) -> Engine:
    """Create the engine of `backend` for `model` (a local path or a hub id) and an optional peft LoRA."""
    from mathagent.errors import UserError

    if backend == "vllm":
        from mathagent.engines.vllm import VLLMEngine

        return VLLMEngine(model, adapter=adapter, seed=seed, dtype=dtype, max_model_len=max_model_len, **options)
    if backend == "hf":
        from mathagent.engines.hf import HFEngine

        return HFEngine(model, adapter=adapter, seed=seed, dtype=dtype, **options)
    raise UserError(f"unknown backend {backend!r}: expected one of {', '.join(BACKENDS)}")


__all__ = ["BACKENDS", "Completion", "Engine", "EngineStats", "Request", "Sampling", "open_engine"]
