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
import sys
import tempfile
import warnings
from collections.abc import Iterator

from mathagent.engines.interface import Completion, Engine, EngineStats, Request, Sampling

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

    "openai" talks to servers that already run (`base_urls=[...]`, `concurrency`: see `engines.openai`):
    `model` is where the tokenizer and chat template come from and the name the servers serve (or a peft
    adapter directory on the base model they serve), `adapter` the name of a LoRA module they serve or a peft
    adapter directory they load; dtype and context length are the servers' own settings. A command's
    options are checked where they are parsed (`stages.EngineOptions`); a wrong call here is a bug."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}: expected one of {', '.join(BACKENDS)}")
    if backend == "openai":
        if dtype != "auto" or max_model_len is not None:
            raise ValueError("dtype and max_model_len are the servers' settings with the openai backend")
        from mathagent.engines.openai import OpenAIEngine

        with quiet_engines():
            return OpenAIEngine(model, adapter=adapter, **options)
    with quiet_engines(), captured_stderr():
        if backend == "vllm":
            from mathagent.engines.vllm import VLLMEngine

            return VLLMEngine(model, adapter=adapter, seed=seed, dtype=dtype, max_model_len=max_model_len, **options)
        from mathagent.engines.hf import HFEngine

        return HFEngine(model, adapter=adapter, seed=seed, dtype=dtype, **options)


__all__ = ["BACKENDS", "DTYPES", "Completion", "Engine", "EngineStats", "Request", "Sampling", "captured_stderr",
           "open_engine", "quiet_engines", "quiet_libraries", "verbose"]
