"""The OpenAI-compatible backend: against a real `vllm serve` on the tiny model (same records as the in-process
engine), and against a scripted HTTP server where the logic under test is the client's (retries, back-off,
errors), which a real server cannot be made to fail on cue."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from conftest import check_sampled_ids

from mathagent.chat import prompt_ids
from mathagent.engines import Request, Sampling, open_engine
from mathagent.errors import UserError


class ScriptedServer:
    """An OpenAI-style endpoint serving the model `name`: each completion request gets the next status of
    `statuses` (then 200 for good); a 200 echoes how many prompt tokens came, and costs 3 tokens. It returns no
    token ids, as servers other than vLLM's, unless `choice` adds fields to the choice it answers. A LoRA load
    (`/load_lora_adapter`) gets `load_status`: 200 lists the adapter in /models from then on, as vLLM does;
    404 is vLLM's answer where runtime loading is off (the route does not exist)."""

    def __init__(self, statuses=(), name="served-tiny", idle_timeout=None, choice=None, load_status=200):
        self.statuses = list(statuses)
        self.bodies: list[dict] = []
        self.loads: list[dict] = []
        self.models = [{"id": name, "object": "model", "parent": None}]
        self.lock = threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            timeout = idle_timeout  # a kept-alive connection idle this long is closed, as uvicorn does after 5 s

            def log_message(self, *args):
                pass

            def reply(self, status: int, payload: dict) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                with owner.lock:
                    self.reply(200, {"object": "list", "data": list(owner.models)})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path.endswith("/load_lora_adapter"):
                    with owner.lock:
                        owner.loads.append(body)
                        if load_status == 200:
                            owner.models.append({"id": body["lora_name"], "object": "model", "root": body["lora_path"],
                                                 "parent": name})
                    self.reply(load_status, {"detail": "Not Found"} if load_status == 404 else "Success")
                    return
                with owner.lock:
                    owner.bodies.append(body)
                    status = owner.statuses.pop(0) if owner.statuses else 200
                if status != 200:
                    self.reply(status, {"error": {"message": f"scripted {status}"}})
                    return
                self.reply(200, {"choices": [{"index": 0, "text": f"saw {len(body['prompt'])} tokens",
                                              "finish_reason": "length", **(choice or {})}],
                                 "usage": {"prompt_tokens": len(body["prompt"]), "completion_tokens": 3}})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def servers():
    started = []

    def start(*args, **kwargs) -> ScriptedServer:
        started.append(ScriptedServer(*args, **kwargs))
        return started[-1]

    yield start
    for server in started:
        server.stop()


def test_requests_go_as_token_ids_with_their_seeds_and_token_counts_come_from_the_server(servers, tiny_model):
    server = servers()
    engine = open_engine("openai", tiny_model, base_urls=[server.url.removesuffix("/v1")])  # host:port is enough
    ids = prompt_ids(engine.tokenizer, [{"role": "user", "content": "What is 2+3?"}])
    sampling = Sampling(temperature=0.5, top_p=0.9, max_tokens=7, stop=("```output",))
    out = engine.generate([Request(ids, seed=11), Request(ids[:5], seed=12), Request(ids)], sampling)
    engine.close()
    assert [c.text for c in out] == [f"saw {len(ids)} tokens", "saw 5 tokens", f"saw {len(ids)} tokens"]
    assert all(c.num_tokens == 3 and c.finish_reason == "length" for c in out)
    bodies = sorted(server.bodies, key=lambda b: (len(b["prompt"]), b.get("seed", -1)))
    assert [b["prompt"] for b in bodies] == [ids[:5], ids, ids]
    assert [b.get("seed") for b in bodies] == [12, None, 11]  # no seed: the server's own randomness
    assert {(b["model"], b["max_tokens"], b["temperature"], b["top_p"], tuple(b["stop"])) for b in bodies} == {
        ("served-tiny", 7, 0.5, 0.9, ("```output",))}
    assert (engine.stats.calls, engine.stats.requests, engine.stats.generated_tokens) == (1, 3, 9)
    assert engine.stats.prompt_tokens == 2 * len(ids) + 5


def test_a_server_that_returns_no_token_ids_gives_the_texts_tokenization_counted_and_logged_once(
        servers, tiny_model, caplog):
    server = servers()
    engine = open_engine("openai", tiny_model, base_urls=[server.url])
    ids = prompt_ids(engine.tokenizer, [{"role": "user", "content": "Find x."}])
    out = engine.generate([Request(ids, seed=s) for s in range(3)], Sampling(max_tokens=4))
    engine.close()
    text = f"saw {len(ids)} tokens"
    assert [(c.text, c.token_ids, c.logprobs) for c in out] == [
        (text, engine.tokenizer(text, add_special_tokens=False)["input_ids"], None)] * 3
    assert engine.stats.retokenized == 3
    warnings = [r for r in caplog.records if r.name == "mathagent.engines.openai"]
    assert len(warnings) == 1 and "returns no token ids" in warnings[0].getMessage()
    assert all(b["return_token_ids"] is True and b["logprobs"] == 0 for b in server.bodies)


def test_token_ids_without_a_log_prob_each_are_refused_naming_the_server(servers, tiny_model):
    server = servers(choice={"token_ids": [5, 6, 7], "logprobs": {"token_logprobs": [-1.0, -2.0]}})
    engine = open_engine("openai", tiny_model, base_urls=[server.url])
    ids = prompt_ids(engine.tokenizer, [{"role": "user", "content": "Find x."}])
    with pytest.raises(UserError, match=rf"^{server.url}/completions: 3 token ids came back without a log-prob"):
        engine.generate([Request(ids, seed=1)], Sampling(max_tokens=4))
    engine.close()


def test_transient_errors_are_retried_and_a_server_that_went_down_is_passed_over(servers, tiny_model):
    flaky = servers(statuses=[503, 429])
    engine = open_engine("openai", tiny_model, base_urls=[flaky.url])
    ids = prompt_ids(engine.tokenizer, [{"role": "user", "content": "Find x."}])
    first = engine.generate([Request(ids, seed=s) for s in range(2)], Sampling(max_tokens=4))
    engine.close()
    assert [c.text for c in first] == [f"saw {len(ids)} tokens"] * 2
    assert len(flaky.bodies) == 2 + 2  # the two refusals were tried again

    failing, steady = servers(), servers()
    engine = open_engine("openai", tiny_model, base_urls=[failing.url, steady.url], concurrency=2)
    failing.stop()  # nothing listens there any more: connections are refused
    again = engine.generate([Request(ids, seed=s) for s in range(8)], Sampling(max_tokens=4))
    engine.close()
    assert [c.text for c in again] == [f"saw {len(ids)} tokens"] * 8
    assert len(steady.bodies) == 8 and not failing.bodies


def test_a_kept_alive_connection_the_server_closed_while_idle_is_reopened_without_a_back_off(servers, tiny_model):
    import time

    server = servers(idle_timeout=0.2)
    engine = open_engine("openai", tiny_model, base_urls=[server.url], concurrency=1)
    ids = prompt_ids(engine.tokenizer, [{"role": "user", "content": "Find x."}])
    engine.generate([Request(ids, seed=1)], Sampling(max_tokens=4))
    time.sleep(0.5)  # the server has closed the connection by now
    start = time.monotonic()
    again = engine.generate([Request(ids, seed=2)], Sampling(max_tokens=4))
    engine.close()
    assert again[0].text == f"saw {len(ids)} tokens"
    assert time.monotonic() - start < 0.2 and engine.servers[0].failures == 0 and len(server.bodies) == 2


def test_a_server_that_keeps_failing_is_named_after_the_last_try(servers, tiny_model):
    broken = servers(statuses=[503] * 10)
    engine = open_engine("openai", tiny_model, base_urls=[broken.url], retries=3)
    ids = prompt_ids(engine.tokenizer, [{"role": "user", "content": "Find x."}])
    with pytest.raises(UserError, match=r"after 3 tries.*" + broken.url + r".*HTTP 503.*scripted 503"):
        engine.generate([Request(ids, seed=1)], Sampling(max_tokens=4))
    engine.close()
    assert len(broken.bodies) == 3


def test_a_request_the_server_refuses_fails_at_once_with_the_servers_message(servers, tiny_model):
    server = servers(statuses=[400])
    engine = open_engine("openai", tiny_model, base_urls=[server.url])
    ids = prompt_ids(engine.tokenizer, [{"role": "user", "content": "Find x."}])
    with pytest.raises(UserError, match=r"/completions: HTTP 400: .*scripted 400"):
        engine.generate([Request(ids, seed=1)], Sampling(max_tokens=4))
    engine.close()
    assert len(server.bodies) == 1


def test_opening_names_a_server_that_is_down_and_a_model_that_is_not_served(servers, tiny_model):
    server = servers()
    gone = servers()
    gone.stop()
    with pytest.raises(UserError, match=rf"^base_url {gone.url}: no server answers"):
        open_engine("openai", tiny_model, base_urls=[server.url, gone.url])
    with pytest.raises(UserError, match=r"serves served-tiny, not the LoRA module 'sft'"):
        open_engine("openai", tiny_model, base_urls=[server.url], adapter="sft")
    other = servers(name="another-model")
    with pytest.raises(UserError, match=rf"different models: {server.url}: served-tiny; {other.url}: another-model"):
        open_engine("openai", tiny_model, base_urls=[server.url, other.url])


@pytest.fixture(scope="module")
def lora_dir(tiny_model, tmp_path_factory) -> str:
    """A peft LoRA adapter of the tiny model as train-mdpo --lora saves one (rank 8 on every linear layer, the
    tokenizer beside it), its B weights moved off zero so that it changes what the model generates."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model),
                           LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    path = tmp_path_factory.mktemp("adapter") / "model"
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(path)
    return str(path)


def test_an_adapter_directory_is_loaded_into_each_server_once_under_a_name_from_its_contents(
        servers, tiny_model, lora_dir, tmp_path):
    import shutil

    from mathagent.engines.openai import adapter_name

    first, second = servers(), servers()
    engine = open_engine("openai", tiny_model, base_urls=[first.url, second.url], adapter=lora_dir)
    name = adapter_name(lora_dir)
    assert re.fullmatch(r"mathagent-[0-9a-f]{12}", name) and engine.served_model == name
    assert first.loads == second.loads == [{"lora_name": name, "lora_path": os.path.abspath(lora_dir)}]
    engine.generate([Request([1, 2, 3], seed=1)], Sampling(max_tokens=4))
    engine.close()
    assert [b["model"] for b in first.bodies + second.bodies] == [name]

    # --model DIR: the tokenizer from it, the servers' one base model with it; already loaded, so not again
    again = open_engine("openai", lora_dir, base_urls=[first.url, second.url])
    again.close()
    assert again.served_model == name and len(first.loads) == len(second.loads) == 1

    retrained = tmp_path / "iter2-model"  # what the next iteration saves: other contents, another name
    shutil.copytree(lora_dir, retrained)
    config = json.loads((retrained / "adapter_config.json").read_text())
    (retrained / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": 32}))
    newer = open_engine("openai", str(retrained), base_urls=[first.url])
    newer.close()
    assert newer.served_model != name and first.loads[-1]["lora_path"] == str(retrained)
    assert newer.served_model in [m["id"] for m in first.models] and len(first.loads) == 2


def test_a_server_that_cannot_load_adapters_is_named_in_one_line_with_how_to_start_it(servers, tiny_model,
                                                                                      lora_dir, tmp_path):
    server = servers(load_status=404)  # vLLM without VLLM_ALLOW_RUNTIME_LORA_UPDATING: no such route
    problems = tmp_path / "p.jsonl"
    problems.write_text(json.dumps({"id": "p", "question": "1+1?", "answer": "2"}) + "\n")
    proc = subprocess.run([sys.executable, "-m", "mathagent.cli", "rollout", str(problems), "--model", tiny_model,
                           "--adapter", lora_dir, "--backend", "openai", "--base-url", server.url],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    (line,) = proc.stderr.splitlines()
    assert line.startswith(f"error: --base-url {server.url}: cannot load the LoRA adapter {lora_dir} (HTTP 404: ")
    for advice in ("--enable-lora --max-lora-rank 8", "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True", "same filesystem"):
        assert advice in line
    assert server.loads and not server.bodies  # nothing was sampled


def test_the_openai_options_are_checked_before_anything_loads(tmp_path):
    from typer.testing import CliRunner

    from mathagent.cli import app

    problems = tmp_path / "p.jsonl"
    problems.write_text(json.dumps({"id": "p", "question": "1+1?", "answer": "2"}) + "\n")
    for args, message in ((["--backend", "openai"], "--backend openai needs --base-url"),
                          (["--backend", "vllm", "--base-url", "http://127.0.0.1:9/v1"], "--base-url is for --backend openai"),
                          (["--backend", "openai", "--base-url", "ftp://x"], "expected an http(s) URL"),
                          (["--backend", "openai", "--base-url", "http://127.0.0.1:9", "--dtype", "float16"],
                           "the servers' settings")):
        result = CliRunner().invoke(app, ["rollout", str(problems), *args])  # in-process: nothing starts
        assert result.exit_code == 2, result.output
        assert message in result.stderr


@pytest.fixture(scope="module")
def tiny_server(tiny_model, tmp_path_factory) -> str:
    """vLLM's server for the tiny model on 127.0.0.1, in float32 as the `vllm_engine` fixture (the log-probs are
    checked against float64 transformers), loading LoRA adapters of rank 8 at most at runtime. About 50 s to
    start on two cores."""
    from mathagent.engines.vllm import local_server

    kv = int(os.environ.get("MATHAGENT_VLLM_KV_BYTES", 64 * 2**20))
    with local_server(tiny_model, log=tmp_path_factory.mktemp("server") / "server.log", kv_cache_memory_bytes=kv,
                      dtype="float32", max_lora_rank=8) as url:
        yield url


@pytest.mark.slow
def test_a_vllm_server_returns_the_ids_it_sampled_and_the_models_log_probs_of_them(
        tiny_server, tiny_model, eos_prompt, model_logprobs):
    """The in-process engines' checks (test_engines) through the server: ids through EOS and through the token
    that completes a stop string, and each id's log-prob under the model at temperature 1."""
    engine = open_engine("openai", tiny_model, base_urls=[tiny_server])
    tokenizer = engine.tokenizer
    chat = prompt_ids(tokenizer, [{"role": "user", "content": "What is 2+3?"}])
    for temperature in (0.7, 0.0):
        sampling = Sampling(temperature=temperature, max_tokens=24)
        out = engine.generate([Request(chat, seed=1), Request(eos_prompt, seed=2)], sampling)
        for prompt, c in zip((chat, eos_prompt), out, strict=True):
            check_sampled_ids(c, prompt, tokenizer, model_logprobs, sampling)
    assert out[1].finish_reason == "stop" and out[1].token_ids[-1] == tokenizer.eos_token_id  # greedy
    full = out[0]
    stop = re.search(r"[A-Za-z]{3}", full.text[len(full.text) // 2 :]).group()  # as in test_engines
    sampling = Sampling(temperature=0.0, max_tokens=24, stop=(stop,))
    (cut,) = engine.generate([Request(chat, seed=1)], sampling)
    engine.close()
    assert cut.finish_reason == "stop" and cut.text == full.text[: full.text.index(stop)]
    assert cut.token_ids == full.token_ids[: len(cut.token_ids)]
    assert stop in tokenizer.decode(cut.token_ids) and stop not in tokenizer.decode(cut.token_ids[:-1])
    check_sampled_ids(cut, chat, tokenizer, model_logprobs, sampling)
    assert engine.stats.retokenized == 0


@pytest.mark.slow
def test_a_vllm_server_loads_an_adapter_directory_once_and_generates_with_it_as_transformers_does(
        tiny_server, tiny_model, lora_dir):
    """One server for the whole online loop: each iteration's adapter directory is loaded into it at runtime,
    and greedy completions with it are transformers' with the adapter (not the base model's)."""
    import urllib.request

    def served() -> list[str]:
        with urllib.request.urlopen(tiny_server + "/models", timeout=10) as answer:
            return [m["id"] for m in json.load(answer)["data"]]

    before = served()
    engine = open_engine("openai", tiny_model, base_urls=[tiny_server], adapter=lora_dir)
    assert engine.served_model not in before and served() == [*before, engine.served_model]
    again = open_engine("openai", lora_dir, base_urls=[tiny_server])  # --model DIR: the same adapter, not reloaded
    assert again.served_model == engine.served_model and served() == [*before, engine.served_model]
    base = open_engine("openai", tiny_model, base_urls=[tiny_server])
    hf = open_engine("hf", tiny_model, adapter=lora_dir)
    prompts = [Request(prompt_ids(engine.tokenizer, [{"role": "user", "content": q}]), seed=1)
               for q in ("What is 2+3?", "Find x if 2x = 8.")]
    greedy = Sampling(temperature=0.0, max_tokens=12)
    outs = {name: [c.token_ids for c in e.generate(prompts, greedy)]
            for name, e in (("adapter", engine), ("again", again), ("base", base), ("hf", hf))}
    for e in (engine, again, base, hf):
        e.close()
    assert outs["adapter"] == outs["again"] == outs["hf"]
    assert all(a != b for a, b in zip(outs["adapter"], outs["base"], strict=True))


@pytest.fixture(scope="module")
def agent_model(tmp_path_factory) -> str:
    """The tiny model warmed up to write the agent's format (python cells, then answers)."""
    from mathagent.tiny import build_tiny_model

    return str(build_tiny_model(tmp_path_factory.mktemp("models") / "agent", seed=1, warmup_steps=60))


def assert_same_records(got: str, expected: str) -> None:
    """The same JSONL records, in order, equal but for log-probs, which may differ by float32 rounding."""

    from mathagent.records import LOGPROBS

    def split(value, logprobs: list):
        """`value` with each list of log-probs taken out into `logprobs`, a marker in its place."""
        if isinstance(value, dict):
            return {k: (logprobs.append(v) or LOGPROBS) if k == LOGPROBS and v is not None else split(v, logprobs)
                    for k, v in value.items()}
        return [split(v, logprobs) for v in value] if isinstance(value, list) else value

    got_logprobs, expected_logprobs = [], []
    assert [split(json.loads(line), got_logprobs) for line in got.splitlines()] == [
        split(json.loads(line), expected_logprobs) for line in expected.splitlines()]
    for mine, theirs in zip(got_logprobs, expected_logprobs):
        assert mine == pytest.approx(theirs, abs=1e-4)


@pytest.mark.slow
def test_rollout_and_mc_label_through_a_vllm_server_give_the_in_process_engines_records(agent_model, tmp_path):
    """`python -m vllm.entrypoints.openai.api_server` on 127.0.0.1 with the in-process engine's settings
    (`server_command`): sampled rollouts (per-request seeds), the continuous schedule, --resume and mc-label
    give the records of `--backend vllm`, up to the last digits of the log-probs: how requests meet in a batch
    depends on timing, and a batch of another size takes other float32 kernels (bfloat16, which vLLM picks on
    a CPU with bf16 instructions, rounds enough to move the third digit)."""
    from mathagent.engines.vllm import local_server
    from mathagent.tasks.arith import make_problems

    problems = tmp_path / "problems.jsonl"
    problems.write_text("".join(json.dumps(p) + "\n" for p in make_problems(8, seed=5)))
    common = ["--n", "2", "--max-tokens", "64", "--max-turns", "3", "--prompt", "bare", "--seed", "1"]
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}

    def mathagent(*args: str) -> str:
        proc = subprocess.run([sys.executable, "-m", "mathagent.cli", *args], capture_output=True, text=True,
                              env=env, timeout=400)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout

    inprocess = mathagent("rollout", str(problems), "--model", agent_model, "--backend", "vllm", "--dtype", "float32",
                          *common)
    records = inprocess.split("\n")[:-1]
    assert len(records) == 16 and sum("```output" in line for line in records) >= 2  # multi-turn
    trajectories = tmp_path / "trajectories.jsonl"
    trajectories.write_text("\n".join(records[:4]) + "\n")
    labeled_inprocess = mathagent("mc-label", str(trajectories), "--model", agent_model, "--m", "2", "--max-tokens",
                                  "48", "--seed", "3", "--backend", "vllm", "--dtype", "float32")
    kv = int(os.environ.get("MATHAGENT_VLLM_KV_BYTES", 64 * 2**20))
    with local_server(agent_model, log=tmp_path / "server.log", kv_cache_memory_bytes=kv, dtype="float32") as url:
        served = ["--model", agent_model, "--backend", "openai", "--base-url", url]
        assert_same_records(mathagent("rollout", str(problems), *served, *common, "--schedule", "continuous"),
                            inprocess)
        partial = tmp_path / "partial.jsonl"
        partial.write_text("\n".join(records[:6]) + "\n")  # a killed run's output: 3 problems done, 5 to do
        mathagent("rollout", str(problems), *served, *common, "--resume", "-o", str(partial))
        assert_same_records(partial.read_text(), inprocess)
        assert_same_records(mathagent("mc-label", str(trajectories), *served, "--m", "2", "--max-tokens", "48",
                                      "--seed", "3"), labeled_inprocess)
    assert "Application startup complete" in (tmp_path / "server.log").read_text()
