"""The OpenAI-compatible backend: completions from servers that already run (`vllm serve`, SGLang, ...).

Prompts are rendered here, with the model's own chat template, and sent as token ids to the `/completions`
endpoint, so a trajectory's tokens, masks and records are those of the in-process engines; the text that comes
back is the server's detokenization (special tokens skipped, the stop string left out), as in-process vLLM.

One HTTP request per trajectory request (each carries its own seed), spread over the servers by fewest requests
in flight, at most `concurrency` in flight per server. Connection failures, timeouts and HTTP 408/429/5xx are
transient: the request is retried with exponential back-off, on another server where there is one, and the
server that failed is passed over for the length of its back-off. After `retries` tries, or on any other HTTP
error, the call fails with a message naming the server and what it said. Token counts are the server's
(`usage`).

A completion's `token_ids` and `logprobs` are the server's. Each request asks for them: `return_token_ids` (a
vLLM extension) and `logprobs: 0` (the sampled token's log-prob alone), which vLLM's server returns in the choice
as `token_ids` and `logprobs.token_logprobs`, the same as in-process vLLM gives (EOS and stop-string tokens
included; log-probs at temperature 1 under `--logprobs-mode raw_logprobs`, vLLM's default, which
`server_command` also sets). Ids that come back without one log-prob each are an error naming the server. A
server that returns no ids (another implementation) gets its text's tokenization as `token_ids`, which need not
be the ids it sampled, and `logprobs` None: such completions are counted in `stats.retokenized`, and the first
is logged.

    engine = OpenAIEngine("Qwen/Qwen2.5-Math-7B-Instruct", base_urls=["http://node1:8000/v1", "http://node2:8000/v1"])

The servers must serve `model`. `adapter` is a LoRA on it: the name of a module the servers serve (`vllm serve
--lora-modules NAME=DIR`), or a peft adapter directory, which is loaded into every server that does not list it
yet (vLLM's runtime LoRA loading: `vllm serve MODEL --enable-lora --max-lora-rank R` with
VLLM_ALLOW_RUNTIME_LORA_UPDATING=True; the server reads the directory, so it must see the same path). It is
loaded under a name from its contents (`adapter_name`), so that a second engine on the same adapter loads
nothing and a retrained adapter gets a name of its own: one server lasts the whole online loop, one adapter per
iteration. `model` may itself be an adapter directory: the tokenizer comes from it and the servers are to serve
its base model (`base_model_name_or_path` of its adapter_config.json).

Per-request seeds give the in-process engine's samples where the server runs the same engine with the same
settings (`mathagent.engines.vllm.server_command`), up to batch-dependent numerics.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import random
import threading
import time
import urllib.parse
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path

from mathagent.engines.interface import Completion, EngineStats, Request, Sampling
from mathagent.errors import UserError
from mathagent.tiny import base_model, is_adapter_dir

TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
STEP_WAIT = 0.02  # seconds a `step` waits for a request to finish before handing control back to the loop

logger = logging.getLogger(__name__)


class _Transient(Exception):
    """A failure worth retrying (the server may be restarting or overloaded)."""


class _Server:
    """One endpoint: its address, requests in flight, and until when it is passed over after a failure."""

    def __init__(self, base_url: str, concurrency: int):
        url = base_url.rstrip("/")
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UserError(f"base_url {base_url!r}: expected an http(s) URL such as http://127.0.0.1:8000/v1",
                            options=("base_url",))
        self.url = url if parts.path else url + "/v1"  # a bare host:port means the OpenAI layout, /v1
        self.parts = urllib.parse.urlsplit(self.url)
        self.in_flight = 0
        self.failures = 0  # in a row
        self.down_until = 0.0
        self.slots = threading.Semaphore(concurrency)  # requests in flight to this server at most

    def connect(self, timeout: float) -> http.client.HTTPConnection:
        kind = http.client.HTTPSConnection if self.parts.scheme == "https" else http.client.HTTPConnection
        return kind(self.parts.hostname, self.parts.port, timeout=timeout)


def adapter_name(adapter: str) -> str:
    """The name a peft adapter directory is loaded under: `mathagent-` and the start of the sha256 of its weights
    and its adapter_config.json, so that the same adapter keeps its name and a retrained one gets another."""
    digest = hashlib.sha256()
    weights = [Path(adapter, f) for f in ("adapter_model.safetensors", "adapter_model.bin")]
    weights = [path for path in weights if path.is_file()]
    if not weights:
        raise UserError(f"{adapter}: no adapter_model.safetensors in it (the weights of a peft adapter)")
    for path in (weights[0], Path(adapter, "adapter_config.json")):
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(2**20), b""):
                digest.update(block)
    return f"mathagent-{digest.hexdigest()[:12]}"


class OpenAIEngine:
    def __init__(
        self,
        model: str,
        *,
        base_urls: list[str],
        adapter: str | None = None,
        concurrency: int = 64,
        retries: int = 6,
        request_timeout: float = 600.0,
        api_key: str | None = None,
    ):
        from transformers import AutoTokenizer

        if not base_urls:
            raise UserError("backend openai needs at least one base_url (e.g. http://127.0.0.1:8000/v1)",
                            options=("backend", "base_url"))
        if concurrency < 1 or retries < 1:
            raise UserError("concurrency and the number of tries must be at least 1", options=("concurrency",))
        self.servers = [_Server(url, concurrency) for url in base_urls]
        self.retries = retries
        self.request_timeout = request_timeout
        self.headers = {"Content-Type": "application/json"}
        api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self._lock = threading.Lock()
        self._local = threading.local()  # one keep-alive connection per (thread, server)
        tokenizer_from = model
        if is_adapter_dir(model):  # the servers' base model with this adapter
            if adapter is not None:
                raise ValueError(f"model {model} is a peft adapter: a second one ({adapter}) cannot go on it")
            model, adapter = base_model(model), model
        self.served_model = self._served_model(model, adapter)
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_from)
        self.stats = EngineStats()
        self.on_cpu = False  # the servers generate on their own accelerators (agent.resolve_schedule)
        self._pool = ThreadPoolExecutor(max_workers=concurrency * len(self.servers), thread_name_prefix="openai")
        self._running: dict[Future, tuple[str, Request]] = {}
        self._busy_since: float | None = None

    # -- the servers ----------------------------------------------------------------------------------------

    def _served_model(self, model: str, adapter: str | None) -> str:
        """The model name every server is asked for: the LoRA module `adapter`, or an adapter directory once
        loaded (`_load_adapter`), or `model` if served, else the one base model a server serves."""
        listings = [self._models(server, model) for server in self.servers]
        if adapter is not None and not is_adapter_dir(adapter):  # a module the servers were started with
            for server, models in zip(self.servers, listings, strict=True):
                if adapter not in models:
                    raise UserError(f"base_url {server.url}: serves {', '.join(models) or 'no model'}, not the LoRA "
                                    f"module {adapter!r} (vllm serve --lora-modules {adapter}=DIR)",
                                    options=("base_url",))
            return adapter
        picked = {}
        for server, models in zip(self.servers, listings, strict=True):
            bases = [name for name, parent in models.items() if parent is None]
            if model in bases:
                picked[server.url] = model
            elif len(bases) == 1:  # served under another name (--served-model-name)
                picked[server.url] = bases[0]
            else:
                raise UserError(f"base_url {server.url}: serves {', '.join(bases) or 'no model'}, not {model!r}"
                                + (f" (the base model of the adapter {adapter})" if adapter else ""),
                                options=("base_url",))
        if len(set(picked.values())) > 1:
            raise UserError("the servers serve different models: "
                            + "; ".join(f"{url}: {name}" for url, name in picked.items()))
        if adapter is None:
            return next(iter(picked.values()))
        name = adapter_name(adapter)
        for server, models in zip(self.servers, listings, strict=True):
            if name not in models:
                self._load_adapter(server, name, adapter, model)
        return name

    def _models(self, server: _Server, model: str) -> dict[str, str | None]:
        """The names a server serves (`/models`), each with its parent: None for a base model, the base model
        for a LoRA module."""
        try:
            listing = self._call(server, "GET", "/models", None, timeout=30.0)
        except _Transient as e:
            raise UserError(f"base_url {server.url}: no server answers ({e}); start one, e.g. "
                            f"`vllm serve {model}`, or leave this URL out", options=("base_url",)) from None
        return {entry["id"]: entry.get("parent") for entry in listing.get("data", [])}

    def _load_adapter(self, server: _Server, name: str, adapter: str, model: str) -> None:
        """vLLM's runtime LoRA loading: the server reads the adapter directory itself, by its absolute path."""
        path = os.path.abspath(adapter)
        try:
            status, payload = self._exchange(server, "POST", "/load_lora_adapter",
                                             {"lora_name": name, "lora_path": path}, timeout=self.request_timeout)
            said = f"HTTP {status}: {' '.join(payload[:300].decode('utf-8', 'replace').split())}"
        except _Transient as e:
            status, said = None, str(e)
        if status == 200:
            return
        if status is not None and name in self._models(server, model):
            return  # another engine loaded it meanwhile (vLLM: HTTP 400, "has already been loaded")
        rank = json.loads(Path(adapter, "adapter_config.json").read_text()).get("r", "R")
        raise UserError(f"base_url {server.url}: cannot load the LoRA adapter {path} ({said}); start the server with "
                        f"`--enable-lora --max-lora-rank {rank}` (at least) and VLLM_ALLOW_RUNTIME_LORA_UPDATING=True "
                        "in its environment, where it can read that path (the same filesystem)", options=("base_url",))

    def _exchange(self, server: _Server, method: str, path: str, body: dict | None, *,
                  timeout: float) -> tuple[int, bytes]:
        """One HTTP exchange: the status and the body; `_Transient` where no answer came."""
        connections = self._local.__dict__.setdefault("connections", {})
        data = None if body is None else json.dumps(body)
        while True:
            reused = server.url in connections
            if not reused:
                connections[server.url] = server.connect(timeout)
            connection = connections[server.url]
            try:
                connection.request(method, server.parts.path + path, body=data, headers=self.headers)
                response = connection.getresponse()
                return response.status, response.read()
            except (OSError, http.client.HTTPException) as e:  # refused, reset, timed out, cut off
                connection.close()
                del connections[server.url]
                if reused and isinstance(e, (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError)):
                    continue  # a kept-alive connection the server closed while idle: again on a new one, at once
                raise _Transient(f"{type(e).__name__}: {e}" if str(e) else type(e).__name__) from None

    def _call(self, server: _Server, method: str, path: str, body: dict | None, *, timeout: float) -> dict:
        """One HTTP exchange for a JSON answer; `_Transient` for what may pass, `UserError` for what will not."""
        status, payload = self._exchange(server, method, path, body, timeout=timeout)
        if status in TRANSIENT_STATUS:
            raise _Transient(f"HTTP {status}: {payload[:300].decode('utf-8', 'replace')}")
        if status != 200:
            raise UserError(f"{server.url}{path}: HTTP {status}: {payload[:1000].decode('utf-8', 'replace')}")
        try:
            return json.loads(payload)
        except ValueError:
            raise UserError(f"{server.url}{path}: the answer is not JSON: {payload[:300]!r}") from None

    def _pick(self, failed: set[str]) -> _Server:
        """The server with the fewest requests in flight among those not in back-off and not yet failed for
        this request; else the one whose back-off ends first."""
        with self._lock:
            now = time.monotonic()
            up = [s for s in self.servers if s.down_until <= now and s.url not in failed]
            server = min(up, key=lambda s: s.in_flight) if up else min(self.servers, key=lambda s: s.down_until)
            server.in_flight += 1
            return server

    def _complete(self, request: Request, sampling: Sampling) -> Completion:
        body = {
            "model": self.served_model,
            "prompt": list(request.prompt_ids),
            "max_tokens": sampling.max_tokens,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "stop": list(sampling.stop),
            "n": 1,
            "logprobs": 0,
            "return_token_ids": True,
        }
        if request.seed is not None:
            body["seed"] = request.seed
        failures: list[str] = []
        failed: set[str] = set()
        while True:
            server = self._pick(failed)
            wait_for = server.down_until - time.monotonic()
            if wait_for > 0:  # every server is backing off: wait for the first to be tried again
                time.sleep(wait_for)
            try:
                with server.slots:
                    answer = self._call(server, "POST", "/completions", body, timeout=self.request_timeout)
                with self._lock:
                    server.failures = 0
                break
            except _Transient as e:
                failures.append(f"{server.url}: {e}")
                failed.add(server.url)
                with self._lock:  # back off from this server, longer after each failure in a row
                    server.down_until = time.monotonic() + min(30.0, 0.5 * 2**server.failures) * random.uniform(0.5, 1.0)
                    server.failures += 1
                if len(failures) >= self.retries:
                    raise UserError(f"no server completed a request after {self.retries} tries; the last: "
                                    f"{failures[-1]}") from None
                if len(failed) == len(self.servers):
                    failed.clear()  # all tried once: try again in back-off order
            finally:
                with self._lock:
                    server.in_flight -= 1
        choice = answer["choices"][0]
        text = choice.get("text") or ""
        usage = answer.get("usage") or {}
        tokens = int(usage.get("completion_tokens", 0))
        token_ids, logprobs = choice.get("token_ids"), (choice.get("logprobs") or {}).get("token_logprobs")
        retokenized = token_ids is None
        if retokenized:
            token_ids, logprobs = self.tokenizer(text, add_special_tokens=False)["input_ids"], None
        elif logprobs is None or len(logprobs) != len(token_ids) or None in logprobs:
            raise UserError(f"{server.url}/completions: {len(token_ids)} token ids came back without a log-prob "
                            "for each (a vLLM server returns both)")
        with self._lock:
            self.stats.prompt_tokens += int(usage.get("prompt_tokens", len(request.prompt_ids)))
            self.stats.generated_tokens += tokens
            self.stats.retokenized += retokenized
            first_retokenized = retokenized and self.stats.retokenized == 1
        if first_retokenized:
            logger.warning("%s returns no token ids: completions carry their text's tokenization and no log-probs "
                           "(counted in the engine's stats.retokenized)", server.url)
        finish = "length" if choice.get("finish_reason") == "length" else "stop"
        return Completion(text=text, num_tokens=tokens, finish_reason=finish, token_ids=[int(t) for t in token_ids],
                          logprobs=None if logprobs is None else [float(lp) for lp in logprobs])

    # -- the engine interface -------------------------------------------------------------------------------

    def generate(self, requests: list[Request], sampling: Sampling) -> list[Completion]:
        if not requests:
            return []
        start = time.perf_counter()
        futures = [self._pool.submit(self._complete, r, sampling) for r in requests]
        try:
            completions = [f.result() for f in futures]
        except BaseException:
            for f in futures:
                f.cancel()
            raise
        self.stats.seconds += time.perf_counter() - start
        self.stats.calls += 1
        self.stats.requests += len(requests)
        return completions

    def submit(self, key: str, request: Request, sampling: Sampling) -> None:
        """Send one request now; `step` hands it back when its completion is in."""
        if not self._running:
            self._busy_since = time.perf_counter()
        self.stats.requests += 1
        self._running[self._pool.submit(self._complete, request, sampling)] = (key, request)

    def step(self) -> list[tuple[str, Completion]]:
        """The requests that finished, waiting at most STEP_WAIT for the first of them."""
        if not self._running:
            return []
        done, _ = wait(self._running, timeout=STEP_WAIT, return_when=FIRST_COMPLETED)
        finished = []
        for future in done:
            key, _request = self._running.pop(future)
            finished.append((key, future.result()))
        if not self._running and self._busy_since is not None:
            self.stats.seconds += time.perf_counter() - self._busy_since  # time with requests out
            self.stats.calls += 1
            self._busy_since = None
        return finished

    def close(self) -> None:
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
