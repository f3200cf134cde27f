"""The embedded tiny model: a random-weight Llama with a locally trained byte-level BPE tokenizer.

Built in seconds with no network, deterministic for a seed, for the tests of every backend and for the demo.
It has the ChatML chat template (`<|im_start|>role\\n...<|im_end|>`), `<|im_end|>` as EOS, and head_dim 64
(vLLM's CPU attention wants head_dim in {32, 64, 80, ...}).

    python -m mathagent.tiny OUT_DIR [WARMUP_STEPS]   # build one
    mathagent rollout --model tiny ...    # "tiny" means the cached default build (see `resolve_model`)
"""

from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path

from mathagent.records import atomic_path

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
    from mathagent.agent import PROMPTS
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


WARMUPS = ("tool", "self-rewarding")


def _warm_up(model, tokenizer, steps: int, seed: int, kind: str = "tool") -> None:
    """A few steps of next-token training on gold tool-integrated solutions of the synthetic arithmetic task,
    so the model writes the agent's format (text, a python block, then \\boxed{}) instead of noise; with
    `kind` "self-rewarding", on its self-rewarding demonstrations (answer, verdict, revision with the tool:
    `arith.self_rewarding_demonstrations`) under the bare prompt."""
    import torch

    from mathagent.agent import PROMPTS
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


def resolve_model(name: str) -> str:
    """`tiny` is the embedded default (built once into the cache); anything else is a path or hub id."""
    if name != TINY_NAME:
        return name
    import fcntl

    path = tiny_model_dir()
    path.parent.mkdir(parents=True, exist_ok=True)
    wanted = {"version": TINY_VERSION, "seed": 0, "warmup_steps": TINY_WARMUP_STEPS}
    # One builder at a time: stages started together (a pipe) wait for the first one's build.
    with open(path.parent / f".{path.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        stamp = path / "mathagent_tiny.json"
        if not stamp.exists() or json.loads(stamp.read_text()) != wanted:
            print(f"building the tiny model into {path} (once)", file=sys.stderr)
            build_tiny_model(path, warmup_steps=TINY_WARMUP_STEPS)
    return str(path)


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit("usage: python -m mathagent.tiny OUT_DIR [WARMUP_STEPS]")
    steps = int(sys.argv[2]) if len(sys.argv) == 3 else TINY_WARMUP_STEPS
    print(build_tiny_model(sys.argv[1], warmup_steps=steps), file=sys.stderr)
