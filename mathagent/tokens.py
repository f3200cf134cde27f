"""Token-in-token-out: the token ids a trajectory carries, and how each stage keeps them true.

The engine samples token ids, not text, and a method with an importance ratio against the sampling policy
(GRPO), or any trainer that should learn exactly what was sampled, needs those ids back. So a trajectory keeps
them (field names pinned in docs/records.md):

- `prompt_ids`: the prompt (the messages before the first action) as the engine saw it, generation prompt
  included (`chat.prompt_ids`);
- `token_ids` on every message after the prompt. An action: the ids the engine sampled and the agent kept,
  through the end-of-turn token when the model emitted it. An observation: its *rendering delta*, the ids
  that went into the context between the action before it and the next action: the closing of that action's
  turn where the model did not write it (generation stopped on "```output"), the observation's turn, and the
  next generation prompt;
- `logprobs` on a sampled action: log pi(token | context) of each of its ids under the sampling model
  (temperature 1, as the engines report them), null for an id the agent wrote itself (a self-rewarding cue,
  text re-encoded where the agent cut an action inside a token). An action that was given, not sampled (a
  demonstration, a partial trajectory continued) has `token_ids` and no `logprobs`.

Invariant: `prompt_ids` + the messages' `token_ids`, concatenated, is exactly the sequence the policy was
conditioned on and produced, and the actions' ids are its mask-1 tokens. So the next prompt is the previous
one plus the new ids (`context_ids`), history is never rendered again (a template that strips the reasoning
of earlier turns, as Qwen3's does, or drops it always, as DeepSeek-R1's does, changes nothing already
sampled), and training reads exactly those ids (`conversation_from_ids`).

An observation's delta comes from the template itself, without knowledge of a model family: the conversation
is rendered with the previous action's content replaced by a marker, and the delta is what follows the marker
(less the end-of-turn token when the action's ids already end with it). Whatever the template does to the
history before the marker does not reach the delta. The observation's own text is encoded with special-token
strings as plain text (`chat.encode`), so interpreter output can never spell a turn.

A stage that adds a message computes its ids here (`complete_ids`, `extend_action`, `retext_action`); one that
rewrites a message's text without them drops the ids it makes stale (`drop_ids`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

from mathagent.chat import (ACTION_MARK, assistant_closing, completion_mask, encode, literal_ranges, marked_rendering,
                            prompt_ids, special_token_ids)
from mathagent.errors import UserError
from mathagent.records import LOGPROBS, PROMPT_IDS, TOKEN_IDS, first_action


def has_ids(prompt: Any, response: Sequence[dict[str, Any]]) -> bool:
    """Whether a conversation carries its tokens: `prompt` (the record's `prompt_ids`) and `token_ids` on every
    message of `response` (the messages after the prompt)."""
    return prompt is not None and all(TOKEN_IDS in m for m in response)


def drop_ids(record: dict[str, Any], messages_field: str = "messages") -> None:
    """Remove the record's token ids (its `prompt_ids`, and `token_ids` and `logprobs` of its messages), in place:
    for a stage that rewrote text it has no ids for. Training then renders the messages (`chat`)."""
    record.pop(PROMPT_IDS, None)
    for m in record.get(messages_field) or ():
        m.pop(TOKEN_IDS, None)
        m.pop(LOGPROBS, None)


def context_ids(trajectory: dict[str, Any]) -> list[int]:
    """The ids the policy conditions its next action on: `prompt_ids` and every message's `token_ids`."""
    ids = list(trajectory[PROMPT_IDS])
    start = first_action(trajectory["messages"])
    for m in trajectory["messages"][start if start is not None else len(trajectory["messages"]):]:
        ids += m[TOKEN_IDS]
    return ids


def _plain(tokenizer, text: str) -> list[int]:
    """Ids of text the agent or a message holds, special-token strings in it as plain text."""
    if not text:
        return []
    if not getattr(tokenizer, "is_fast", False):
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return encode(tokenizer, text, [(0, len(text))])[0]


def _decode(tokenizer, ids: Sequence[int]) -> str:
    # As the engines detokenize: special tokens skipped, no clean-up of spaces (vLLM's incremental
    # detokenizer does none, and transformers' default clean-up would join " ." for some tokenizers).
    return tokenizer.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False)


def observation_ids(tokenizer, messages: Sequence[dict[str, Any]], index: int) -> list[int]:
    """The ids of observation `messages[index]` (any non-assistant message right after an action): the
    template's rendering of it after that action, through the next generation prompt, less the end-of-turn
    token when the action's own ids already end with it."""
    previous = index - 1
    if previous < 0 or messages[previous]["role"] != "assistant":
        raise UserError(f"message {index}: token ids are built one observation after each action, and this message "
                        "does not follow an action")
    text, begin = marked_rendering(tokenizer, messages[: index + 1], previous, add_generation_prompt=True)
    if begin is None:
        raise UserError(f"message {previous}: the chat template does not write an assistant message's content, so "
                        "the tokens of the observation after it have no place")
    delta = text[begin:]
    action = messages[previous].get(TOKEN_IDS) or []
    if action and action[-1] in special_token_ids(tokenizer):
        written = tokenizer.convert_ids_to_tokens(action[-1])
        if delta.startswith(written):  # the model closed its turn itself
            delta, begin = delta[len(written):], begin + len(written)
    if not getattr(tokenizer, "is_fast", False):
        return tokenizer(delta, add_special_tokens=False)["input_ids"]
    marked = [{"role": m["role"], "content": m["content"]} for m in messages[: index + 1]]
    marked[previous]["content"] = ACTION_MARK  # as marked_rendering rendered it
    literal = [(a - begin, b - begin)
               for a, b in literal_ranges(tokenizer, marked, text, [index], add_generation_prompt=True)]
    return encode(tokenizer, delta, literal)[0]


def complete_ids(tokenizer, trajectory: dict[str, Any], *, continuing: bool = False) -> None:
    """Give the trajectory the ids it lacks, in place: `prompt_ids` from its prompt, an action without ids its
    text's (given, so no `logprobs`), an observation without ids its rendering delta. A given last action
    that ends its trajectory (not `continuing`: rollout goes on with a cut action) also gets the end-of-turn
    token the template closes it with, as a model that wrote it would have: trained on, it learns to stop.

    The ids it has are kept when its `prompt_ids` are this tokenizer's rendering of its prompt; otherwise
    (none, another model's tokenizer, a prompt written anew) none of them can be trusted, and all are made
    again, as given."""
    messages = trajectory["messages"]
    start = first_action(messages)
    expected = prompt_ids(tokenizer, messages[:start] if start is not None else messages)
    if trajectory.get(PROMPT_IDS) != expected:
        drop_ids(trajectory)
        trajectory[PROMPT_IDS] = expected
    if start is None:
        return
    for i in range(start, len(messages)):
        m = messages[i]
        if TOKEN_IDS in m:
            continue
        m.pop(LOGPROBS, None)
        m[TOKEN_IDS] = given_action_ids(tokenizer, messages, i) if m["role"] == "assistant" else observation_ids(
            tokenizer, messages, i)
        if m["role"] == "assistant" and i == len(messages) - 1 and not continuing:
            m[TOKEN_IDS] = m[TOKEN_IDS] + end_of_turn_ids(tokenizer, messages, i)


def end_of_turn_ids(tokenizer, messages: Sequence[dict[str, Any]], index: int) -> list[int]:
    """The id a model ends assistant message `index` with: the first special token of what the template writes
    after its content (`<|im_end|>`, `<|eot_id|>`, `<｜end▁of▁sentence｜>`); none where the template closes an
    assistant turn with no special token (GLM-4's turn ends where the next one starts)."""
    closing = assistant_closing(tokenizer, messages, index)
    special = special_token_ids(tokenizer)
    ids = tokenizer(closing, add_special_tokens=False)["input_ids"] if closing else []
    return next(([t] for t in ids if t in special), [])


def given_action_ids(tokenizer, messages: Sequence[dict[str, Any]], index: int) -> list[int]:
    """The ids of an action that was given, not sampled: its text as the tokenizer encodes it (a special token
    it spells, as GLM's `<think>`, is that token: the text is the user's data, not interpreter output), less
    what the generation prompt before it already wrote: DeepSeek-R1's and Qwen3.5's open "<think>\n" for the
    model, and an action given as "<think>\n..." would otherwise think twice. Its text stays as given."""
    content = messages[index]["content"]
    head = [{"role": m["role"], "content": m["content"]} for m in messages[:index]]
    try:
        with_prompt = tokenizer.apply_chat_template(head, tokenize=False, add_generation_prompt=True)
        without = tokenizer.apply_chat_template(head, tokenize=False)
    except Exception:  # a template that cannot render the head alone: no generation prompt to compare with
        with_prompt = without = ""
    opened = with_prompt[len(without):] if with_prompt.startswith(without) else ""
    overlap = next((len(opened) - k for k in range(len(opened)) if content.startswith(opened[k:])), 0)
    if overlap and opened[len(opened) - overlap:].strip():
        content = content[overlap:]
    return tokenizer(content, add_special_tokens=False)["input_ids"] if content else []


class Kept(NamedTuple):
    text: str
    token_ids: list[int]
    logprobs: list[float | None] | None


def keep_sampled(tokenizer, token_ids: Sequence[int], logprobs: Sequence[float] | None, kept_text: str) -> Kept:
    """The ids of a completion that hold `kept_text`, the part of its text the agent keeps (all of it, or the
    text through the end of its first python block).

    Every sampled id when they decode to exactly that text (an end-of-turn token included); else the fewest
    leading ids whose decoding starts with it, when what they hold beyond it is whitespace (the newline of a
    "```\\n" token: the text then keeps it, so text and ids agree); else the leading ids wholly inside it, and
    the rest of it encoded as the agent's own text (log-prob null)."""
    ids = list(token_ids)
    lps = list(logprobs) if logprobs is not None else None
    if _decode(tokenizer, ids) == kept_text:
        return Kept(kept_text, ids, lps)

    def covers(k: int) -> bool:
        return _decode(tokenizer, ids[:k]).startswith(kept_text)

    if covers(len(ids)):
        lo, hi = 0, len(ids)  # the fewest ids that cover the kept text: covers(hi) holds, covers(lo) may not
        while lo < hi:
            mid = (lo + hi) // 2
            if covers(mid):
                hi = mid
            else:
                lo = mid + 1
        text = _decode(tokenizer, ids[:hi])
        if not text[len(kept_text):].strip():
            return Kept(text, ids[:hi], lps[:hi] if lps is not None else None)
        inside = hi - 1
    else:
        inside = len(ids)
    while inside > 0 and not kept_text.startswith(_decode(tokenizer, ids[:inside])):
        inside -= 1
    rest = _plain(tokenizer, kept_text[len(_decode(tokenizer, ids[:inside])):])
    return Kept(kept_text, ids[:inside] + rest, lps[:inside] + [None] * len(rest) if lps is not None else None)


def extend_action(message: dict[str, Any], kept: Kept) -> None:
    """Append a completion's kept text and ids to an action message (a new one has empty content), in place."""
    old = message.get(TOKEN_IDS, [])
    message["content"] += kept.text
    if kept.logprobs is not None or LOGPROBS in message:
        before = message.get(LOGPROBS, [None] * len(old))
        # Six decimals: within float32's precision of a log-prob, and a third of the characters of a double's.
        new = [None if x is None else round(x, 6) for x in kept.logprobs] if kept.logprobs is not None else \
            [None] * len(kept.token_ids)
        message[LOGPROBS] = before + new
    message[TOKEN_IDS] = old + kept.token_ids


def retext_action(tokenizer, message: dict[str, Any], content: str) -> None:
    """Set an action's text to `content`, which the agent made from its old text (a self-evaluation's prefix
    added, trailing space cut): the ids of the longest part of the old text it keeps stay, with their
    log-probs, the rest is encoded as the agent's own text. An end-of-turn token at the end goes: the action
    goes on."""
    ids = list(message.get(TOKEN_IDS, []))
    lps = message.get(LOGPROBS)
    special = special_token_ids(tokenizer)
    while ids and ids[-1] in special:
        ids.pop()
    keep = len(ids)
    while keep > 0 and not content.startswith(_decode(tokenizer, ids[:keep])):
        keep -= 1
    rest = _plain(tokenizer, content[len(_decode(tokenizer, ids[:keep])):])
    message["content"] = content
    message[TOKEN_IDS] = ids[:keep] + rest
    if lps is not None:
        message[LOGPROBS] = list(lps[:keep]) + [None] * len(rest)


class IdConversation(NamedTuple):
    input_ids: list[int]
    action_mask: list[int]  # 1 on the actions' ids
    logprobs: list[float | None]  # the recorded log-prob of each position's token, None where there is none


def conversation_from_ids(prompt: Sequence[int], response: Sequence[dict[str, Any]], *,
                          mask_observations: bool = True) -> IdConversation:
    """A conversation as its recorded ids: `prompt` (its `prompt_ids`) then each message's `token_ids`, the
    mask 1 on the actions' ids. With `mask_observations=False` (the single-turn DPO baseline) the mask is 1
    on every id from the first action's on, as a single-turn trainer treats everything after the prompt."""
    ids = list(prompt)
    mask = [0] * len(ids)
    logprobs: list[float | None] = [None] * len(ids)
    for m in response:
        tokens = m[TOKEN_IDS]
        ids += tokens
        is_action = m["role"] == "assistant"
        mask += [int(is_action)] * len(tokens)
        recorded = m.get(LOGPROBS) if is_action else None
        logprobs += list(recorded) if recorded is not None else [None] * len(tokens)
    return IdConversation(ids, mask if mask_observations else completion_mask(mask), logprobs)
