"""The prompt templates: how a problem x becomes the first user turn of a trajectory.

The agent loop starts every trajectory from one of them (`agent.new_trajectories`), the tiny demo model's
tokenizer and warm-up are trained on them (`tiny`), and the arith task's demonstrations are written under
them (`tasks.arith.gold_messages`), so all three share this one table. A template has a `{question}`
placeholder; literal braces are doubled (`\\boxed{{}}`), as `str.format` wants.
"""

from __future__ import annotations

from pathlib import Path

from mathagent.errors import UserError

PROMPTS = {
    # Tool-integrated reasoning, in the user turn (some chat templates, Gemma's among them, have no system role).
    "tool": (
        "{question}\n\n"
        "Solve this step by step. You may write Python code in a ```python block; it is run and its output is "
        "shown to you in an ```output block, after which you continue. Variables persist between blocks. "
        "Put the final answer within \\boxed{{}}."
    ),
    # Plain chain of thought, no tools.
    "cot": "{question}\n\nPlease reason step by step, and put your final answer within \\boxed{{}}.",
    # The bare question, for a policy that learned the format from demonstrations (the demo's tiny policy:
    # a long instruction costs a 0.5M-parameter model more than it tells it).
    "bare": "{question}",
}


def load_prompt(option: str, name_or_path: str) -> str:
    """A named prompt from PROMPTS, or a text file with a `{question}` placeholder; `option` is the command's
    flag that gave it, for the message when it is neither."""
    if name_or_path in PROMPTS:
        return PROMPTS[name_or_path]
    path = Path(name_or_path)
    if not path.is_file():
        raise UserError(f"{option}: {name_or_path!r} is neither a prompt name ({', '.join(PROMPTS)}) nor a file")
    text = path.read_text(encoding="utf-8")
    if "{question}" not in text:
        raise UserError(f"{name_or_path}: a prompt file needs a {{question}} placeholder")
    return text
