"""A stand-in for vLLM on one GPU: the tokens the real engine produced, in the wall time a GPU would take.

The rollout benchmark's GPU regime (`benchmarks/rollout.py --regime gpu`) runs the agent loops on a machine
without a GPU. A `Recorder` wraps the real in-process engine for one untimed pass and keeps, per request, what
it completed; `GPUStandIn` then answers the same requests with those completions (looked up by prompt ids,
seed and sampling: `request_key`) and spends the time that continuous batching of a ~1.5B model on one A100
would take, asleep, so that the CPU is left to the loop and its cells as on a GPU node. A request it has no
recording of is a miss: it is answered empty and counted, and the benchmark fails on any.

The latency model, one engine step at a time (vLLM's scheduler: the running sequences decode one token each,
then prompts are prefilled, chunked, within the step's token budget; a prompt's last prefill chunk samples its
first token):

    t_step = a + sum over the sequences sampling in the step of (c + k * context) + p * prefill tokens

with at most `max_num_seqs` sequences running and `max_batched_tokens` tokens a step, and prefix caching: a
prompt is prefilled only from its first 16-token block that no earlier sequence computed (the engines here run
with `enable_prefix_caching`; a fully cached prompt still recomputes its last token).

The constants, for Qwen2.5-1.5B (the size of Qwen2.5-Math-1.5B: 1.54e9 parameters, 28 layers, 2 KV heads of
128) in bfloat16 on one A100-80GB:

- a = 5.45 ms, the step at batch 1: Qwen2.5-1.5B-Instruct generates 183.33 tokens/s at batch 1 on one A100-80GB
  with vLLM 0.6.3 (Qwen2.5 speed benchmark, input length 1, BF16:
  https://qwen.readthedocs.io/en/latest/getting_started/speed_benchmark.html, source
  QwenLM/Qwen2.5 docs/source/benchmark/speed_benchmark.rst). 1 / 183.33 = 5.45 ms.
- k = 30.5 ns per context token: a decode step reads each context token's K and V, 2 x 28 layers x 2 heads x
  128 x 2 bytes = 28,672 bytes, at the bandwidth the same table shows the A100 reaching: Qwen2.5-0.5B-Instruct
  does 311.55 tokens/s there (3.21 ms a step), so 1.05e9 more parameters (2.1 GB of bfloat16 weights read a
  step) cost 5.45 - 3.21 = 2.24 ms: 0.94 TB/s, and 28,672 B / 0.94 TB/s = 30.5 ns.
- c = 0.020 ms per sequence and p = 0.020 ms per prefilled token: a token of a 1.54e9-parameter model is
  2 x 1.54e9 = 3.1 GFLOP, at half of the A100's 312 bfloat16 TFLOPS (NVIDIA's A100 datasheet; the searched
  vLLM measurements of 1.5B models had no batch sweep on an A100 or H100), 3.1e9 / 156e12 = 19.8 us.
  Check against the table: generating 2048 tokens after a 6144-token prompt instead of a 1-token one takes
  2048/176.68 - 2048/183.33 = 0.42 s longer, 68 us per prompt token; the model gives p + 2048 k = 20 + 62 =
  82 us (it overstates long contexts a little, which a rollout of ~100-600-token contexts hardly has).
- max_num_seqs = 256 and max_batched_tokens = 8192: vLLM 0.32's defaults for the LLM class on a GPU that is
  not an H100/H200-class one (vllm/engine/arg_utils.py, `EngineArgs.get_batch_defaults`).

At 256 running sequences of ~300-token contexts a step is then 5.45 + 256 x (0.020 + 0.009) = 12.9 ms, ~20k
generated tokens/s. The constants are `Latency` fields (`--gpu-*` options of the benchmark) for other numbers.

Clock: the engine core runs on its own, as vLLM's engine core process does on a GPU (and a server does): steps
follow each other while any request runs or waits, whether or not the caller is in `step()`; a request joins
the first step that starts after its `submit`, and an idle core starts `IDLE_START` after the first submit (the
time it takes to drain its input queue). With `background=False` the core is in the caller's process, as
mathagent's VLLMEngine runs it (VLLM_ENABLE_V1_MULTIPROCESSING=0): each `step()` runs one step and nothing runs
between calls. The schedule is computed, not timed: each call brings it up to the present and then sleeps to
the instant it waits for, so the stand-in takes no CPU beyond that bookkeeping. `busy_seconds` is the time
during which steps ran (a request was running): the generation the loops cannot beat.
"""

from __future__ import annotations

import hashlib
import time
from array import array
from collections import deque
from dataclasses import asdict, dataclass, field

from mathagent.engines import Completion, EngineStats, Request, Sampling

IDLE_START = 0.001  # seconds an idle engine core waits before it schedules what was submitted


def request_key(request: Request, sampling: Sampling) -> str:
    """What a completion is recorded under: the prompt's ids, the request's seed and the sampling."""
    digest = hashlib.blake2b(array("q", request.prompt_ids).tobytes(), digest_size=16)
    digest.update(repr((request.seed, sampling)).encode())
    return digest.hexdigest()


class Recorder:
    """An engine that completes with `engine` and keeps every completion under its `request_key`."""

    def __init__(self, engine):
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.completions: dict[str, dict] = {}

    @property
    def stats(self) -> EngineStats:
        return self.engine.stats

    def generate(self, requests: list[Request], sampling: Sampling) -> list[Completion]:
        completions = self.engine.generate(requests, sampling)
        for request, completion in zip(requests, completions, strict=True):
            self.completions[request_key(request, sampling)] = asdict(completion)
        return completions

    def close(self) -> None:
        self.engine.close()


@dataclass(frozen=True)
class Latency:
    """The latency model's constants (module docstring: where each comes from)."""

    step_ms: float = 5.45  # a
    per_sequence_ms: float = 0.020  # c
    per_context_token_ns: float = 30.5  # k
    prefill_ms_per_token: float = 0.020  # p
    max_num_seqs: int = 256
    max_batched_tokens: int = 8192
    block_size: int = 16


@dataclass(eq=False)
class _Sequence:
    key: str
    prompt: list[int]
    completion: Completion
    submitted: float
    left: int = 0  # prompt tokens still to prefill
    blocks: list[int] = field(default_factory=list)  # chain hashes of the prompt's full blocks


class GPUStandIn:
    """The Engine interface (`generate`, and `submit`/`step` for continuous batching) over a recording, on the
    latency model's clock. Counts its work in `stats` like the real engines, plus `busy_seconds`, `misses`,
    `steps`, `prefilled_tokens` and `cached_tokens`."""

    def __init__(self, completions: dict[str, dict], tokenizer, latency: Latency = Latency(), *,
                 background: bool = True):
        self.completions = completions
        self.background = background
        self.on_cpu = False  # it stands for an engine on an accelerator
        self.tokenizer = tokenizer
        self.latency = latency
        self.stats = EngineStats()
        self.busy_seconds = 0.0
        self.misses = 0
        self.steps = 0
        self.sampled = 0  # sequence-steps: sum over steps of the sequences sampling in them
        self.prefilled_tokens = 0
        self.cached_tokens = 0
        self._cache: set[int] = set()  # chain hashes of the blocks in the prefix cache
        self._waiting: deque[_Sequence] = deque()
        self._prefilling: list[_Sequence] = []  # admitted, prompt not all computed yet
        self._decoding = 0
        self._context = 0  # summed context of the decoding sequences
        self._finishing: dict[int, list[_Sequence]] = {}  # step number -> sequences sampling their last token
        self._free_at = 0.0  # when the last step ended
        self._step: tuple[float, float, list[_Sequence]] | None = None  # start, end, prompts done in it
        self._done: list[tuple[_Sequence, float]] = []  # finished, with when, not yet handed out
        self._joined = False  # requests submitted since the last step() (counted as one call)

    # -- the Engine interface --------------------------------------------------------------------------------

    def generate(self, requests: list[Request], sampling: Sampling) -> list[Completion]:
        """All requests join the running batch; returns when the last is done (asleep until then)."""
        begun = time.perf_counter()
        self._advance(begun)
        batch = [self._queue(str(i), r, sampling, begun) for i, r in enumerate(requests)]
        self.stats.calls += 1
        # Nobody else submits while the caller waits here: the schedule can be computed to the end at once.
        pending = set(batch)
        last = begun
        while pending:
            self._plan(begun, force=True)
            _, end, _ = self._step
            for seq, _ in self._finish_step():
                pending.discard(seq)
            last = end
        mine = set(batch)
        self._done = [(seq, when) for seq, when in self._done if seq not in mine]
        self._sleep_until(last)
        self.stats.seconds += time.perf_counter() - begun
        return [seq.completion for seq in batch]

    def submit(self, key: str, request: Request, sampling: Sampling) -> None:
        now = time.perf_counter()
        self._advance(now)
        self._queue(key, request, sampling, now)
        self._joined = True

    def step(self) -> list[tuple[str, Completion]]:
        """The requests that finished since the last call; when none has, waits for the end of the step in
        flight (one step at most). With an in-process engine core, runs one step."""
        begun = time.perf_counter()
        self._advance(begun)
        if self._joined:
            self.stats.calls += 1
            self._joined = False
        if not self._done and self._plan(begun, force=True):
            _, end, _ = self._step
            self._sleep_until(end)
            if self.background:
                self._advance(max(end, time.perf_counter()))
            else:
                self._finish_step()
        done, self._done = self._done, []
        self.stats.seconds += time.perf_counter() - begun
        return [(seq.key, seq.completion) for seq, _ in done]

    def close(self) -> None:
        pass

    # -- the schedule ----------------------------------------------------------------------------------------

    def _queue(self, key: str, request: Request, sampling: Sampling, now: float) -> _Sequence:
        recorded = self.completions.get(request_key(request, sampling))
        if recorded is None:
            self.misses += 1
            completion = Completion(text="", num_tokens=0, finish_reason="stop", token_ids=[], logprobs=[])
        else:
            completion = Completion(**recorded)
        seq = _Sequence(key, list(request.prompt_ids), completion, now)
        self._waiting.append(seq)
        self.stats.requests += 1
        self.stats.prompt_tokens += len(seq.prompt)
        return seq

    def _advance(self, now: float) -> None:
        """Run the schedule up to `now`: every step that ended by then is done. An in-process engine core does
        nothing between calls."""
        while self.background and self._plan(now, force=False):
            _, end, _ = self._step
            if end > now:
                return
            self._finish_step()

    def _plan(self, now: float, *, force: bool) -> bool:
        """Make sure the step in flight is planned, if the engine has work; False when it is idle (or, unless
        `force`d, when its next step starts after `now`). A running engine core starts its next step when the
        last ends, an idle one `IDLE_START` after the first submit; an in-process one when it is called."""
        if self._step is not None:
            return True
        if not (self._waiting or self._prefilling or self._decoding):
            return False
        if not self.background:
            start = max(self._free_at, now)
        elif self._prefilling or self._decoding:
            start = self._free_at
        else:
            start = max(self._free_at, self._waiting[0].submitted + IDLE_START)
        if start > now and not force:
            return False
        lat = self.latency
        budget = lat.max_batched_tokens - self._decoding
        prefill = 0
        for seq in self._prefilling:  # prompts already under way go first
            take = min(seq.left, budget)
            seq.left -= take
            budget -= take
            prefill += take
        while self._waiting and budget > 0 and self._decoding + len(self._prefilling) < lat.max_num_seqs:
            seq = self._waiting.popleft()
            seq.left = self._uncached(seq)
            take = min(seq.left, budget)
            seq.left -= take
            budget -= take
            prefill += take
            self._prefilling.append(seq)
        done = [seq for seq in self._prefilling if seq.left == 0]
        self._prefilling = [seq for seq in self._prefilling if seq.left > 0]
        sampling = self._decoding + len(done)
        context = self._context + sum(len(seq.prompt) for seq in done)
        seconds = (lat.step_ms + lat.per_sequence_ms * sampling + lat.prefill_ms_per_token * prefill) / 1e3
        seconds += lat.per_context_token_ns * context / 1e9
        self._step = (start, start + seconds, done)
        self.prefilled_tokens += prefill
        self.sampled += sampling
        return True

    def _finish_step(self) -> list[tuple[_Sequence, float]]:
        start, end, prompted = self._step
        self._step = None
        self.steps += 1
        self.busy_seconds += end - start
        self._free_at = end
        number = self.steps
        finished = self._finishing.pop(number, [])
        for seq in finished:
            self._decoding -= 1
            self._context -= len(seq.prompt) + seq.completion.num_tokens - 1
        self._context += self._decoding  # every decoding sequence's context grew by its new token
        for seq in prompted:
            self._cache.update(seq.blocks)
            if seq.completion.num_tokens <= 1:
                finished.append(seq)
            else:
                self._finishing.setdefault(number + seq.completion.num_tokens - 1, []).append(seq)
                self._decoding += 1
                self._context += len(seq.prompt) + 1
        out = [(seq, end) for seq in finished]
        for seq, _ in out:
            # The KV of the prompt and of every sampled token but the last (never fed back) stays cached.
            self._cache.update(self._chain(seq.prompt + seq.completion.token_ids[:-1]))
            self.stats.generated_tokens += seq.completion.num_tokens
        self._done.extend(out)
        return out

    def _uncached(self, seq: _Sequence) -> int:
        """Prompt tokens to prefill: from the first full block not in the prefix cache (at least the last)."""
        seq.blocks = self._chain(seq.prompt)
        hit = 0
        for block in seq.blocks:
            if block not in self._cache:
                break
            hit += 1
        cached = min(hit * self.latency.block_size, len(seq.prompt) - 1)
        self.cached_tokens += cached
        return len(seq.prompt) - cached

    def _chain(self, ids: list[int]) -> list[int]:
        """A hash per full block that stands for the block and everything before it, as vLLM's block hashes."""
        size, chain, h = self.latency.block_size, [], 0
        for i in range(0, len(ids) - size + 1, size):
            h = hash((h, tuple(ids[i : i + size])))
            chain.append(h)
        return chain

    @staticmethod
    def _sleep_until(when: float) -> None:
        delay = when - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
