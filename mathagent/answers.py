r"""The final answer a_hat of a trajectory: where it is read in the last action's text.

A trajectory is scored by its final answer alone (`rewards.py`). The answer is found by one of three forms,
tried in the order a command asks (`ANSWER_MODES`):

- "boxed": the content of the last \boxed{} (or \fbox{}) of the text, nested braces matched, the brace-less
  `\boxed 5` accepted (`extract_boxed`). The last box alone decides: one cut off by the token limit (never
  closed) means the text has no final answer, not that an earlier box is it;
- "answer_is": the last "The answer is ..." / "Final answer: ...", its math delimiters and period trimmed;
- "gsm8k": the last "#### N" line of GSM8K's reference solutions, commas and '$' removed.

Whether two answers are equal is `grading.py`'s question; this module only finds them.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

ANSWER_MODES = ("boxed", "answer_is", "gsm8k")

_BOXED_START = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")


def _match_braces(text: str, open_index: int) -> int | None:
    """Index of the '}' closing the '{' at open_index; escaped braces (\\{ \\}) do not count."""
    depth = 0
    i = open_index
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2  # skip the escaped character: \{ and \} are literal set braces
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


def _last_box(text: str) -> tuple[str | None, bool]:
    """(the content of the last \\boxed / \\fbox of `text`, whether the text ends inside that box). The last box
    alone decides: one that never closes (or a bare `\\boxed` at the very end) gives (None, True), never the
    content of an earlier box. No box, or an empty or unreadable last one: (None, False)."""
    matches = list(_BOXED_START.finditer(text))
    if not matches:
        return None, False
    i = matches[-1].end()
    while i < len(text) and text[i] in " \t":
        i += 1
    if i == len(text):
        return None, True
    if text[i] == "{":
        close = _match_braces(text, i)
        if close is None:
            return None, True
        content = text[i + 1 : close].strip()
    elif i > matches[-1].end():
        content = re.match(r"[^\s$]*", text[i:]).group(0).rstrip(".,")
    else:
        content = ""  # `\boxed$`, `\boxed\n5`: no readable box
    return content or None, False


def extract_boxed(text: str) -> str | None:
    """The content of the last \\boxed{...} (or \\fbox{...}) in `text`, nested braces matched.

    Also accepts the brace-less form `\\boxed 5` (the next token). The last box is the final answer, so when
    it gives none the text has none: an empty box, or one that never closes (a generation cut off inside its
    final answer: "\\boxed{5} then \\boxed{6" is no answer, not 5), is None. A box is read wherever it is,
    inside a ``` block too (this module has no notion of code).
    """
    return _last_box(text)[0]


_ANSWER_IS = re.compile(
    r"(?:final\s+answer|answer)\s*(?:is|:)\s*:?\s*(.+?)\s*(?:\n|$)", re.IGNORECASE
)
_GSM8K_ANSWER = re.compile(r"####\s*(.+?)\s*(?:\n|$)")


def _strip_answer_phrase(answer: str) -> str | None:
    """Trim what surrounds an answer written in prose: math delimiters, a final period, \\boxed (a phrase whose
    last box is empty or cut off states no answer: None)."""
    answer = answer.strip()
    if _BOXED_START.search(answer):
        return extract_boxed(answer)
    answer = answer.rstrip(".").strip()
    for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if answer.startswith(left) and answer.endswith(right) and len(answer) > len(left) + len(right):
            answer = answer[len(left) : -len(right)].strip()
            break
    return answer.rstrip(".").strip()


def extract_answer(text: str, modes: Sequence[str] = ("boxed",)) -> str | None:
    """The final answer a_hat of a text, or None when it states none.

    `modes` lists the allowed forms, tried in the given order (the first that finds something wins):
    "boxed" (the last \\boxed{}), "answer_is" (the last "The answer is ..."), "gsm8k" (the last "#### N",
    commas and a leading '$' removed as in the GSM8K reference solutions). A text that ends inside its last
    box was cut off in its final answer: "boxed" then finds no answer and no later mode is tried (an earlier
    "The answer is 5" is not the final answer of "The answer is 5. Checking: \\boxed{6").
    """
    unknown = [m for m in modes if m not in ANSWER_MODES]
    if unknown:
        raise ValueError(f"unknown answer modes {unknown}; choose from {ANSWER_MODES}")
    if not text:
        return None
    for mode in modes:
        if mode == "boxed":
            found, cut = _last_box(text)
            if cut:
                return None
        elif mode == "answer_is":
            matches = _ANSWER_IS.findall(text)
            found = _strip_answer_phrase(matches[-1]) if matches else None
        else:
            matches = _GSM8K_ANSWER.findall(text)
            found = matches[-1].replace(",", "").replace("$", "").rstrip(".").strip() if matches else None
        if found:
            return found
    return None
