"""The prompt templates the agent, the tiny model and the arith demonstrations share."""

from __future__ import annotations

import pytest

from mathagent.errors import UserError
from mathagent.prompts import PROMPTS, load_prompt


def test_every_template_puts_the_question_in_and_keeps_its_literal_braces():
    for name, template in PROMPTS.items():
        text = template.format(question="What is 6 * 7?")
        assert text.startswith("What is 6 * 7?"), name
        assert "{question}" not in text and "{{" not in text, name
    assert "\\boxed{}" in PROMPTS["tool"].format(question="q")


def test_a_prompt_is_a_name_or_a_file_with_a_question_placeholder(tmp_path):
    assert load_prompt("--prompt", "tool") is PROMPTS["tool"]
    path = tmp_path / "mine.txt"
    path.write_text("Q: {question}\nA:", encoding="utf-8")
    assert load_prompt("--prompt", str(path)) == "Q: {question}\nA:"
    path.write_text("no placeholder", encoding="utf-8")
    with pytest.raises(UserError, match="a prompt file needs a {question} placeholder"):
        load_prompt("--prompt", str(path))


def test_an_unknown_prompt_is_refused_naming_the_option_that_gave_it():
    with pytest.raises(UserError, match=r"^--prompt: 'nope' is neither a prompt name \(tool, cot, bare\) nor a file$"):
        load_prompt("--prompt", "nope")
