"""Generation backends behind one small interface.

An engine takes a batch of token-id prompts and returns one completion each, in one call: the agent loop
sends every live trajectory of a turn in a single `generate` (never one request per trajectory), which is what
lets vLLM batch them and share their common prefixes.

    engine = open_engine("vllm", model, adapter=None, seed=0)   # or "hf", or "openai" with base_urls=[...]
    completions = engine.generate([Request(ids, seed=1), ...], Sampling(temperature=0.7, max_tokens=512))
    engine.close()
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

from mathagent.errors import UserError


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
    """`generate` completes a batch in one call. An engine with continuous batching also has
    `submit(key, request, sampling)` (queue one request) and `step() -> [(key, completion), ...]` (advance the
    running batch; the requests that finished), which the agent loop uses so that no trajectory waits for
    another's action or cell (`agent.run_agent`)."""

    tokenizer: object  # a transformers tokenizer with the model's chat template
    stats: EngineStats

    def generate(self, requests: list[Request], sampling: Sampling) -> list[Completion]: ...

    def close(self) -> None: ...


BACKENDS = ("vllm", "hf", "openai")
DTYPES = ("auto", "bfloat16", "float16", "float32")
VERBOSE_ENV = "MATHAGENT_VERBOSE"  # set (or `mathagent -v`): the engines' own logs and warnings are shown


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


@contextlib.contextmanager
def quiet_engines() -> Iterator[None]:
    """Keep vLLM's, torch's and transformers' INFO/WARNING chatter off stderr, unless `verbose()`: stderr is
    where a stage shows its progress and summary. Errors still show (their loggers stay at ERROR), and
    `open_engine` replays everything an engine printed while starting if it then fails.

    Log levels are read from the environment when those libraries are first imported, so this sets both the
    environment and any logger that already exists."""
    if verbose():
        yield
        return
    quiet_libraries()
    try:
        with warnings.catch_warnings():
            for module in ("vllm", "torch", "transformers", "accelerate", "peft"):
                warnings.filterwarnings("ignore", module=module)
                warnings.filterwarnings("ignore", module=rf"{module}\..*")
            yield
    finally:
        _silence_loggers()  # again: importing vLLM configures its loggers anew


def quiet_libraries() -> None:
    """The environment and log levels that keep the libraries' chatter off stderr (see `quiet_engines`); the
    command line sets them first thing, before torch or transformers is imported, unless `verbose()`."""
    for name, value in (("VLLM_LOGGING_LEVEL", "ERROR"), ("TORCH_CPP_LOG_LEVEL", "ERROR"),
                        ("TRANSFORMERS_VERBOSITY", "error"), ("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1"),
                        ("HF_HUB_DISABLE_PROGRESS_BARS", "1")):  # transformers' weight loading and saving bars
        os.environ.setdefault(name, value)
    _silence_loggers()


def _silence_loggers() -> None:
    for name in ("vllm", "transformers", "torch", "accelerate", "peft"):
        logging.getLogger(name).setLevel(logging.ERROR)
    for name in list(logging.root.manager.loggerDict):  # vLLM gives some of its modules' loggers a level
        if name.startswith("vllm."):
            logging.getLogger(name).setLevel(logging.NOTSET)


@contextlib.contextmanager
def captured_stderr() -> Iterator[None]:
    """While an engine starts, whatever reaches file descriptor 2 (C++ warnings, load progress bars, prints)
    goes to a temporary file, which is replayed to stderr if the start fails."""
    if verbose():
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            captured.seek(0)
            sys.stderr.write(captured.read().decode("utf-8", "replace"))
            sys.stderr.flush()
            raise
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


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
    """Create the engine of `backend` for `model` (a local path or a hub id) and an optional peft LoRA.

    "openai" talks to servers that already run (`base_urls=[...]`, see `engines.openai`): `model` is where the
    tokenizer and chat template come from and the name the servers serve, `adapter` the name of a LoRA module
    they serve; dtype and context length are the servers' own settings."""
    if backend not in BACKENDS:
        raise UserError(f"unknown backend {backend!r}: expected one of {', '.join(BACKENDS)}")
    if backend == "openai":
        if dtype != "auto" or max_model_len is not None:
            raise UserError("--dtype and --max-model-len are the servers' settings with --backend openai")
        from mathagent.engines.openai import OpenAIEngine

        with quiet_engines():
            return OpenAIEngine(model, adapter=adapter, **options)
    if options.get("base_urls"):
        raise UserError(f"--base-url is for --backend openai, not {backend}")
    options.pop("base_urls", None)
    options.pop("concurrency", None)
    with quiet_engines(), captured_stderr():
        if backend == "vllm":
            from mathagent.engines.vllm import VLLMEngine

            return VLLMEngine(model, adapter=adapter, seed=seed, dtype=dtype, max_model_len=max_model_len, **options)
        from mathagent.engines.hf import HFEngine

        return HFEngine(model, adapter=adapter, seed=seed, dtype=dtype, **options)


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def check_model(option: str, name: str | None, *, adapter: bool = False) -> None:
    """A model (or adapter) is 'tiny', an existing directory, or something shaped like a hub id
    ("org/name"); a path that does not exist is refused before anything loads."""
    if name is None or (name == "tiny" and not adapter):
        return
    if os.path.exists(name):
        if not os.path.isdir(name):
            raise UserError(f"{option} {name}: is a file; give the model's directory")
        wanted = "adapter_config.json" if adapter else "config.json"
        if not os.path.isfile(os.path.join(name, wanted)):
            raise UserError(f"{option} {name}: no {wanted} in it: not a {'peft adapter' if adapter else 'model'} "
                            "directory")
        return
    if name.startswith((".", "/", "~")) or not _HUB_ID.match(name):
        raise UserError(f"{option} {name}: no such directory (and not a hub id like org/name)")


@dataclass(frozen=True)
class EngineOptions:
    """Everything that opens an engine, as a command's options give it; checked when made, before any work."""

    model: str = "tiny"  # a local path, a hub id, or 'tiny' (`tiny.resolve_model`)
    backend: str = "vllm"
    adapter: str | None = None
    base_urls: tuple[str, ...] = ()  # openai: the servers
    concurrency: int = 64  # openai: the most requests in flight per server
    seed: int = 0
    dtype: str = "auto"
    max_model_len: int | None = None

    def __post_init__(self) -> None:
        check_model("--model", self.model)
        if self.backend == "openai":
            if not self.base_urls:
                raise UserError("--backend openai needs --base-url (a server's endpoint, e.g. http://127.0.0.1:8000/v1)")
            if self.concurrency < 1:
                raise UserError("--concurrency must be at least 1")
            return  # --adapter names a LoRA module of the servers, not a directory here
        if self.base_urls:
            raise UserError(f"--base-url is for --backend openai, not --backend {self.backend}")
        check_model("--adapter", self.adapter, adapter=True)

    @contextlib.contextmanager
    def open(self) -> Iterator[Engine]:
        """The engine, closed when the block ends, however it ends."""
        from mathagent.tiny import resolve_model

        engine = open_engine(self.backend, resolve_model(self.model), adapter=self.adapter, seed=self.seed,
                             dtype=self.dtype, max_model_len=self.max_model_len, base_urls=list(self.base_urls),
                             concurrency=self.concurrency)
        try:
            yield engine
        finally:
            engine.close()


__all__ = ["BACKENDS", "DTYPES", "Completion", "Engine", "EngineOptions", "EngineStats", "Request", "Sampling",
           "captured_stderr", "check_model", "open_engine", "quiet_engines", "quiet_libraries", "verbose"]
