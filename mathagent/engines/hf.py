"""The transformers backend: batched `model.generate` with left padding.

Slower than vLLM but needs nothing beyond transformers, and it is the one that runs a freshly trained
checkpoint or a peft adapter exactly as training sees it. Rows are sorted by prompt length and generated in
micro-batches of `batch_size` to bound padding and memory. Sampling is seeded once per call (transformers has
no per-row generator), so a sample depends on the batch it was drawn in.
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

        width = max(len(r.prompt_ids) for r in requests)
        input_ids = torch.full((len(requests), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(requests), width), dtype=torch.long)
        for row, r in enumerate(requests):  # left padding: every row's next token is at the same position
            input_ids[row, width - len(r.prompt_ids) :] = torch.tensor(r.prompt_ids)
            attention_mask[row, width - len(r.prompt_ids) :] = 1
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
                stop_strings=list(sampling.stop) or None,
                tokenizer=self.tokenizer,
                pad_token_id=self.pad_id,
                eos_token_id=sorted(self.eos_ids),
            )
        completions = []
        for row in out[:, width:].tolist():
            ids, ended = [], False
            for t in row:
                if t in self.eos_ids:
                    ended = True
                    break
                ids.append(t)
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            for stop in sampling.stop:  # transformers keeps the stop string; the interface excludes it
                cut = text.find(stop)
                if cut >= 0:
                    text = text[:cut]
                    if not ended:
                        # A row stopped by a string is padded after it; the pads were never generated.
                        while ids and ids[-1] == self.pad_id:
                            ids.pop()
                    ended = True
            finish = "stop" if ended or len(ids) < sampling.max_tokens else "length"
            completions.append(Completion(text=text, num_tokens=len(ids), finish_reason=finish))
        return completions

    def close(self) -> None:
        self.model = None
