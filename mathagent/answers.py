r"""The final answer a_hat of a trajectory: where it is read in the last action's text.

A trajectory is scored by its final answer alone (`rewards.py`). The answer is found by one of three forms,
tried in the order a command asks (`ANSWER_MODES`):

- "boxed": the content of the last \boxed{} (or \fbox{}) of the text, nested braces matched, the brace-less
  `\boxed 5` accepted, a box cut off by the token limit skipped (`extract_boxed`);
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


def extract_boxed(text: str) -> str | None:
    """The content of the last \\boxed{...} (or \\fbox{...}) in `text`, nested braces matched.

    Also accepts the brace-less form `\\boxed 5` (the next token). A last box that never closes (a cut-off
    generation) is skipped in favour of the last complete one. An empty box is no answer (None).
    """
    for match in reversed(list(_BOXED_START.finditer(text))):
        i = match.end()
        while i < len(text) and text[i] in " \t":
            i += 1
        if i < len(text) and text[i] == "{":
            close = _match_braces(text, i)
            if close is None:
                continue
            content = text[i + 1 : close].strip()
        elif match.end() < len(text) and text[match.end()] in " \t":
            token = re.match(r"[^\s$]+", text[i:])
            content = token.group(0).rstrip(".,") if token else ""
        else:
            continue
        return content or None
    return None


_ANSWER_IS = re.compile(
    r"(?:final\s+answer|answer)\s*(?:is|:)\s*:?\s*(.+?)\s*(?:\n|$)", re.IGNORECASE
)
_GSM8K_ANSWER = re.compile(r"####\s*(.+?)\s*(?:\n|$)")


def _strip_answer_phrase(answer: str) -> str:
    """Trim what surrounds an answer written in prose: math delimiters, a final period, \\boxed."""
    answer = answer.strip()
    boxed = extract_boxed(answer)
    if boxed is not None:
        return boxed
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
    commas and a leading '$' removed as in the GSM8K reference solutions).
    """
    unknown = [m for m in modes if m not in ANSWER_MODES]
    if unknown:
        raise ValueError(f"unknown answer modes {unknown}; choose from {ANSWER_MODES}")
    if not text:
        return None
    for mode in modes:
        if mode == "boxed":
            found = extract_boxed(text)
        elif mode == "answer_is":
            matches = _ANSWER_IS.findall(text)
            found = _strip_answer_phrase(matches[-1]) if matches else None
        else:
            matches = _GSM8K_ANSWER.findall(text)
            found = matches[-1].replace(",", "").replace("$", "").rstrip(".").strip() if matches else None
        if found:
            return found
    return None
