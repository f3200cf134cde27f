"""The embedded tiny model: a random-weight Llama with a locally trained byte-level BPE tokenizer.

Built in seconds with no network, deterministic for a seed, for the tests of every backend and for the demo.
It has the ChatML chat template (`<|im_start|>role\\n...<|im_end|>`), `<|im_end|>` as EOS, and head_dim 64
(vLLM's CPU attention wants head_dim in {32, 64, 80, ...}).

This is also where a model option's value comes from: `check_model` (the name is 'tiny', a model directory
or a hub id) and `resolve_model` ('tiny' is the default build, made once into the cache), which the commands
call; and the demo's SFT policy (`sft_policy`: the tiny model warm-started with train-sft, cached likewise).

    python -m mathagent.tiny OUT_DIR [WARMUP_STEPS]   # build one
    mathagent rollout --model tiny ...    # "tiny" means the cached default build (see `resolve_model`)
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from mathagent.errors import UserError
from mathagent.prompts import PROMPTS
from mathagent.records import atomic_path, publish

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
TINY_NAME = "tiny"
TINY_VERSION = 3  # bump when the build changes, so caches rebuild
TINY_WARMUP_STEPS = 150  # the default `tiny` writes the agent's format (see _warm_up); ~1 min, once


def _corpus(rng: random.Random) -> list[str]:
    """Text with the shapes the agent sees: questions, reasoning, python cells, output blocks, LaTeX."""
    words = (
        "the of a to and is in what find how many each total number sum product value if then so we have let "
        "compute answer final solve equation integer remainder divided times plus minus equals apples dollars "
        "hours minutes students books price cost more less than twice half percent area perimeter triangle "
        "circle radius square root probability expected"
    ).split()
    code = [
        "```python\nfrom sympy import symbols, solve\nx = symbols('x')\nprint(solve(x**2 - {a}, x))\n```",
        "```python\nresult = {a} * {b} + {c}\nprint(result)\n```",
        "```python\nimport math\nprint(math.comb({a}, {b}))\n```",
        "```python\nfrom fractions import Fraction\nprint(Fraction({a}, {b}) + Fraction(1, {c}))\n```",
        "```python\ntotal = 0\nfor i in range({a}):\n    total += i * {b}\nprint(total)\n```",
        "```python\nimport numpy as np\nprint(np.array([{a}, {b}, {c}]).sum())\n```",
    ]
    from mathagent.tasks.arith import gold_messages, make_problems

    # The prompt templates and the synthetic task's conversations, often, so that they become few tokens.
    texts = [template.replace("{question}", "") for template in PROMPTS.values()] * 200
    for problem in make_problems(1000, seed=rng.randint(0, 2**31)):
        texts.extend(m["content"] for m in gold_messages(problem, PROMPTS["tool"]))
        texts.extend(m["content"] for m in gold_messages(problem, PROMPTS["bare"]))
    for _ in range(3000):
        a, b, c = rng.randint(1, 999), rng.randint(1, 99), rng.randint(1, 9)
        sentence = " ".join(rng.choice(words) for _ in range(rng.randint(4, 14)))
        texts.append(sentence.capitalize() + f" {a} + {b} = {a + b}.")
        texts.append(rng.choice(code).format(a=a, b=b, c=c))
        texts.append(f"```output\n{a * b + c}\n```")
        texts.append(f"The answer is $\\boxed{{{a * c}}}$. \\frac{{{a}}}{{{b}}} \\sqrt{{{c}}} x^{{2}}")
    return texts


def _warm_up(model, tokenizer, steps: int, seed: int, kind: str = "tool") -> None:
    """A few steps of next-token training on gold tool-integrated solutions of the synthetic arithmetic task,
    so the model writes the agent's format (text, a python block, then \\boxed{}) instead of noise; with
    `kind` "self-rewarding", on its self-rewarding demonstrations (answer, verdict, revision with the tool:
    `arith.self_rewarding_demonstrations`) under the bare prompt."""
    import torch

    from mathagent.tasks.arith import gold_messages, make_problems, self_rewarding_demonstrations

    rng = random.Random(seed)
    if kind == "tool":
        conversations = [gold_messages(p, PROMPTS["tool"]) for p in make_problems(512, seed=seed + 1)]
    else:
        conversations = [d["messages"] for d in self_rewarding_demonstrations(1024, seed + 1, PROMPTS["bare"])]
    examples = [tokenizer(tokenizer.apply_chat_template(c, tokenize=False), add_special_tokens=False)["input_ids"]
                for c in conversations]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        batch = rng.sample(examples, 16)
        width = max(map(len, batch))
        ids = torch.full((len(batch), width), tokenizer.pad_token_id)
        labels = torch.full((len(batch), width), -100)
        for row, example in enumerate(batch):
            ids[row, : len(example)] = torch.tensor(example)
            labels[row, : len(example)] = torch.tensor(example)
        model(input_ids=ids, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def build_tiny_model(
    out_dir: str | os.PathLike, *, seed: int = 0, vocab_size: int = 1024, warmup_steps: int = 0, warmup: str = "tool"
) -> Path:
    """Build the tiny model into `out_dir` (created; replaced atomically if it exists) and return its path.

    With `warmup_steps`, it is first trained that many steps on the synthetic task's gold solutions
    (`mathagent.tasks.arith`): it then writes multi-turn tool-integrated actions, though rarely right ones.
    `warmup="self-rewarding"` trains on the task's self-rewarding demonstrations instead (`_warm_up`).
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    bpe = Tokenizer(models.BPE(unk_token=None))
    # Numbers split into single digits, as Llama's and Qwen's tokenizers do: a model can then copy and
    # compare numbers digit by digit instead of learning a token per number.
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_corpus(rng), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        unk_token=None,
    )
    tokenizer.chat_template = CHATML_TEMPLATE

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="float32",
    )
    model = LlamaForCausalLM(config)
    if warmup_steps:
        _warm_up(model, tokenizer, warmup_steps, seed, warmup)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id

    # Built beside the target and renamed, so a concurrent reader never sees half a model.
    with atomic_path(out, directory=True) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / "mathagent_tiny.json").write_text(
            json.dumps({"version": TINY_VERSION, "seed": seed, "warmup_steps": warmup_steps,
                        **({"warmup": warmup} if warmup != "tool" else {})})
        )
    return out


def cache_dir() -> Path:
    """Where built models are kept: $MATHAGENT_CACHE, else ~/.cache/mathagent."""
    return Path(os.environ.get("MATHAGENT_CACHE", Path.home() / ".cache" / "mathagent"))


def tiny_model_dir() -> Path:
    return cache_dir() / f"tiny-v{TINY_VERSION}"


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def is_adapter_dir(path: str) -> bool:
    """A peft adapter directory (its adapter_config.json), rather than a model or a LoRA module's name."""
    return os.path.isfile(os.path.join(path, "adapter_config.json"))


def base_model(adapter: str) -> str:
    """The model a peft adapter directory was trained on (its `base_model_name_or_path`)."""
    path = Path(adapter, "adapter_config.json")
    try:
        base = json.loads(path.read_text()).get("base_model_name_or_path")
    except ValueError as e:
        raise UserError(f"{path}: not JSON ({e})") from None
    if not base:
        raise UserError(f"{path}: no base_model_name_or_path: give the base model as --model and this as --adapter")
    return base


def check_model(option: str, name: str | None, *, adapter: bool = False, or_adapter: bool = False) -> None:
    """A model (or adapter) is 'tiny', an existing directory, or something shaped like a hub id
    ("org/name"); a path that does not exist is refused before anything loads. `option` is the command's flag
    that gave it; `or_adapter`: a peft adapter's directory is a model too (training loads it on its base)."""
    if name is None or (name == TINY_NAME and not adapter):
        return
    if os.path.exists(name):
        if not os.path.isdir(name):
            raise UserError(f"{option} {name}: is a file; give the model's directory")
        wanted = "adapter_config.json" if adapter else "config.json"
        if or_adapter and is_adapter_dir(name):
            return
        if not os.path.isfile(os.path.join(name, wanted)):
            raise UserError(f"{option} {name}: no {wanted} in it: not a {'peft adapter' if adapter else 'model'} "
                            "directory")
        return
    if name.startswith((".", "/", "~")) or not _HUB_ID.match(name):
        raise UserError(f"{option} {name}: no such directory (and not a hub id like org/name)")


def _built_once(path: Path, done: Callable[[], bool], build: Callable[[], None]) -> Path:
    """`build()` the cached `path` unless `done()`, holding the cache's lock for it: stages (or demos) started
    together wait for the first one's build instead of building it again."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done():
            build()
    return path


def resolve_model(name: str) -> str:
    """`tiny` is the embedded default (built once into the cache); anything else is a path or hub id."""
    if name != TINY_NAME:
        return name
    path = tiny_model_dir()
    stamp = path / "mathagent_tiny.json"
    wanted = {"version": TINY_VERSION, "seed": 0, "warmup_steps": TINY_WARMUP_STEPS}

    def build() -> None:
        print(f"building the tiny model into {path} (once)", file=sys.stderr)
        build_tiny_model(path, warmup_steps=TINY_WARMUP_STEPS)

    return str(_built_once(path, lambda: stamp.exists() and json.loads(stamp.read_text()) == wanted, build))


def sft_policy(
    out: str | os.PathLike,
    *,
    prompt: str,
    demos: int = 3000,
    seed: int = 0,
    steps: int = 700,
    batch_size: int = 32,
    learning_rate: float = 3e-3,
    log: Callable[[str], None] = lambda line: print(line, file=sys.stderr),
) -> Path:
    """The demo's starting policy pi_0 into `out`: a random tiny model (seed `seed`) warm-started with
    `mathagent train-sft` on `demos` demonstrations of the arith task under the template `prompt`
    (`arith.demonstrations`: with the tool, or, when the numbers look small, the answer alone).

    Built once per content hash (the demonstrations, the tiny build's version and every SFT setting) into the
    cache, then copied to `out`; a second call with the same settings only copies. Returns the cached build.
    A failed train-sft raises `subprocess.CalledProcessError` with the end of its log as `output`."""
    from mathagent.tasks import arith

    rows = arith.demonstrations(demos, seed=seed * 1000 + 1, prompt=prompt)
    demo_text = "".join(json.dumps(r) + "\n" for r in rows)
    sft_args = ["--lr", str(learning_rate), "--batch-size", str(batch_size), "--max-steps", str(steps),
                "--seed", str(seed)]
    key = hashlib.sha256(json.dumps([demo_text, TINY_VERSION, seed, sft_args]).encode()).hexdigest()[:16]
    cache = cache_dir()
    built = cache / f"policy-{key}"

    def build() -> None:
        log(f"building the SFT policy into {built} (once): {steps} steps on {demos} demonstrations")
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # "Writing model shards" of a 2 MB model is noise
        with tempfile.TemporaryDirectory(prefix=f".policy-{key}.", dir=cache) as work:
            work_dir = Path(work)
            base = build_tiny_model(work_dir / "base", seed=seed, warmup_steps=0)
            (work_dir / "demos.jsonl").write_text(demo_text, encoding="utf-8")
            command = [sys.executable, "-m", "mathagent.cli", "train-sft", str(work_dir / "demos.jsonl"),
                       "--model", str(base), "--output-dir", str(work_dir / "model"), *sft_args]
            with open(work_dir / "train-sft.log", "w") as train_log:
                proc = subprocess.run(command, stdout=train_log, stderr=train_log)
            if proc.returncode != 0:
                raise subprocess.CalledProcessError(proc.returncode, command[2:],
                                                    output=(work_dir / "train-sft.log").read_text()[-3000:])
            shutil.rmtree(work_dir / "model" / "checkpoints", ignore_errors=True)
            (work_dir / "model" / "sft.json").write_text(json.dumps(
                {"command": shlex.join(command[2:]), "demos": demos, "seed": seed, "key": key}, indent=2))
            publish(work_dir / "model", built)

    _built_once(built, lambda: (built / "training_summary.json").is_file(), build)
    with atomic_path(Path(out), directory=True) as staging:
        shutil.copytree(built, staging, dirs_exist_ok=True)
    return built


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit("usage: python -m mathagent.tiny OUT_DIR [WARMUP_STEPS]")
    steps = int(sys.argv[2]) if len(sys.argv) == 3 else TINY_WARMUP_STEPS
    print(build_tiny_model(sys.argv[1], warmup_steps=steps), file=sys.stderr)
