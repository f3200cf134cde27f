"""The transformers backend: batched `model.generate` with left padding.

Slower than vLLM but needs nothing beyond transformers, and it is the one that runs a freshly trained
checkpoint or a peft adapter exactly as training sees it. Rows are sorted by prompt length and generated in
micro-batches of `batch_size` to bound padding and memory. Sampling is seeded once per call (transformers has
no per-row generator), so a sample depends on the batch it was drawn in.

A completion's `token_ids` are the ids a row sampled, through its EOS id or the token that completed its stop
string, and `logprobs` their log-probs under the model at temperature 1, from the raw logits `generate` returns
for each step (`output_logits`). It keeps those of every step of a micro-batch until the batch ends, in float32:
batch_size x max_tokens x vocabulary floats (64 x 512 x 152k for a Qwen2.5 model: 20 GB), so a large
vocabulary wants a smaller `batch_size`.
"""

from __future__ import annotations

import time

from mathagent.engines.interface import Completion, EngineStats, Request, Sampling


def pick_dtype(dtype: str):
    import torch

    if dtype != "auto":
        return getattr(torch, dtype)
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


class HFEngine:
    def __init__(
        self,
        model: str,
        *,
        adapter: str | None = None,
        seed: int = 0,
        dtype: str = "auto",
        batch_size: int = 64,
        device: str | None = None,
    ):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        self.model = AutoModelForCausalLM.from_pretrained(model, dtype=pick_dtype(dtype)).to(self.device)
        if adapter is not None:
            from peft import PeftModel

            self.model = PeftModel.from_pretrained(self.model, adapter)
        self.model.eval()
        self.pad_id = self.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = self.tokenizer.eos_token_id
        self.eos_ids = self._eos_ids()
        self.seed = seed
        self.batch_size = batch_size
        self.stats = EngineStats()
        self.on_cpu = self.device == "cpu"

    def _eos_ids(self) -> set[int]:
        ids = self.model.generation_config.eos_token_id
        ids = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return ids

    def generate(self, requests: list[Request], sampling: Sampling) -> list[Completion]:
        import torch

        if not requests:
            return []
        start = time.perf_counter()
        torch.manual_seed(requests[0].seed if requests[0].seed is not None else self.seed)
        order = sorted(range(len(requests)), key=lambda i: len(requests[i].prompt_ids))
        results: list[Completion | None] = [None] * len(requests)
        for lo in range(0, len(order), self.batch_size):
            rows = order[lo : lo + self.batch_size]
            for i, completion in zip(rows, self._generate_batch([requests[i] for i in rows], sampling), strict=True):
                results[i] = completion
        self.stats.seconds += time.perf_counter() - start
        self.stats.calls += 1
        self.stats.requests += len(requests)
        self.stats.prompt_tokens += sum(len(r.prompt_ids) for r in requests)
        self.stats.generated_tokens += sum(c.num_tokens for c in results)
        return results

    def _generate_batch(self, requests: list[Request], sampling: Sampling) -> list[Completion]:
        import torch
        from transformers import StoppingCriteriaList

        width = max(len(r.prompt_ids) for r in requests)
        input_ids = torch.full((len(requests), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(requests), width), dtype=torch.long)
        for row, r in enumerate(requests):  # left padding: every row's next token is at the same position
            input_ids[row, width - len(r.prompt_ids) :] = torch.tensor(r.prompt_ids)
            attention_mask[row, width - len(r.prompt_ids) :] = 1
        ends = _RowEnds(self.tokenizer, self.eos_ids, sampling.stop, prompt_width=width, rows=len(requests))
        greedy = sampling.temperature <= 0
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=input_ids.to(self.device),
                attention_mask=attention_mask.to(self.device),
                do_sample=not greedy,
                temperature=None if greedy else sampling.temperature,
                top_p=None if greedy else sampling.top_p,
                top_k=None,
                max_new_tokens=sampling.max_tokens,
                stopping_criteria=StoppingCriteriaList([ends]),
                pad_token_id=self.pad_id,
                eos_token_id=sorted(self.eos_ids),  # also what makes `generate` pad the rows that ended
                return_dict_in_generate=True,
                output_logits=True,  # the raw logits of each step, before temperature and top-p
            )
            sampled = out.sequences[:, width:]
            # log pi(token | context) at temperature 1: log_softmax of each step's raw logits (float32 already,
            # as `generate` keeps them) at the id sampled in it; a row's positions after it ended are pads.
            logprobs = torch.stack([torch.log_softmax(step.float(), dim=-1).gather(1, sampled[:, i : i + 1])[:, 0]
                                    for i, step in enumerate(out.logits)], dim=1)
        completions = []
        for row, (ids, lps) in enumerate(zip(sampled.tolist(), logprobs.tolist(), strict=True)):
            length = ends.lengths[row]  # None: it ran to max_tokens, and so did the batch
            ids, lps = ids[:length], lps[:length]
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            for stop in sampling.stop:  # transformers keeps the stop string in the ids; the text excludes it
                cut = text.find(stop)
                if cut >= 0:
                    text = text[:cut]
            finish = "length" if length is None else "stop"
            completions.append(Completion(text=text, num_tokens=len(ids), finish_reason=finish, token_ids=ids,
                                          logprobs=lps))
        return completions

    def close(self) -> None:
        self.model = None


class _RowEnds:
    """The stopping rule of a batch's rows (an EOS id, or a stop string in the text) as a transformers stopping
    criterion, which also notes how many tokens each row had sampled when it stopped.

    `generate` pads a row after it stops, and a row can sample the pad id too, so the ids alone do not say where
    a row ended. A stop string ends a row at the token that completes it, which may run past the string
    (transformers' `StopStringCriteria`, which also matches a string begun in the prompt)."""

    def __init__(self, tokenizer, eos_ids: set[int], stop: tuple[str, ...], *, prompt_width: int, rows: int):
        import torch
        from transformers import StopStringCriteria

        self.eos_ids = torch.tensor(sorted(eos_ids), dtype=torch.long)
        self.stop_strings = StopStringCriteria(tokenizer, list(stop)) if stop else None
        self.prompt_width = prompt_width
        self.lengths: list[int | None] = [None] * rows

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        done = torch.isin(input_ids[:, -1], self.eos_ids.to(input_ids.device))
        if self.stop_strings is not None:
            done |= self.stop_strings(input_ids, scores)
        for row in done.nonzero()[:, 0].tolist():
            if self.lengths[row] is None:  # a row that ended is checked again on its pads
                self.lengths[row] = input_ids.shape[1] - self.prompt_width
        return done
