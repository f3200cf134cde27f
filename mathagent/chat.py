"""Rendering a conversation to tokens with its action mask, for any chat template.

A trajectory's `messages` are the state s_h = (x, a_1, o_1, ..., a_H). Training (M-DPO, M-KTO, SFT, a
generative PRM) needs the token ids of the whole conversation and which tokens are the agent's actions a_h
(mask 1): those the policy generated. Everything else is mask 0: the system prompt, the question x, the
observations o_h (the code interpreter's output, which the model did not write) and the template's
scaffolding (`<|im_start|>assistant\\n`, `[INST]`, ...).

How the mask is found, without any knowledge of a model family:

1. The conversation is rendered prefix by prefix, `apply_chat_template(messages[:i+1])`. Each rendering must
   extend the previous one as a string, or the template rewrites history (drops earlier reasoning, injects a
   date) and a message's text has no fixed place: a `UserError` names the message index.
2. For an assistant message i, the action starts where the generation prompt ends
   (`apply_chat_template(messages[:i], add_generation_prompt=True)`): at inference the model sees exactly
   that text and writes everything after it. Its content ends where the rendering with
   `continue_final_message=True` ends.
3. The action also owns the end-of-turn tokens after its content, up to and including the first special token
   (`<|im_end|>`, `</s>`, `<|eot_id|>`, `<end_of_turn>`): the model must learn to stop, and generation stops
   exactly there. What follows that token (ChatML's "\\n") is scaffolding. A template that puts no special
   token after an assistant message gets actions of content alone.
4. The whole text is tokenized once (with the template's own BOS, no added special tokens, as inference does:
   see `prompt_ids`), and each token is placed by its character offsets. A token whose characters lie
   partly inside an action and partly outside (a *straddling* token: sentencepiece merges `]` and `+` of
   `[/INST]+` into one piece) is not an action: it holds text the model did not write. Such tokens are counted
   in `TokenizedConversation.straddling`, so callers can report them; a template that puts a space or a
   special token at the start of the action (as Mistral's own format does) has none.
5. Special tokens come from the template only: a message whose content spells one (an observation printing
   "<|im_start|>assistant") keeps it as plain text (`encode` with `literal_ranges`), in training as in the
   inference prompt, so interpreter output can never forge a turn.

`label_positions` gives, for a conversation whose assistant messages are single-token step labels ('+'/'-'),
the positions whose next token is the label: where a generative PRM reads its prediction.
"""

from __future__ import annotations

import bisect
import re
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from mathagent.errors import UserError

# The longest conversation, in tokens under the chat template, that training takes. Longer examples are
# dropped, never cut (train-mdpo, train-sft, train-prm), and make-pairs --max-length drops the same ones earlier.
DEFAULT_MAX_LENGTH = 4096

# Mistral's [INST] format (Mistral-7B v0.1 / v0.2): system text is put in front of the first user turn, and
# observations (role user or tool) are user turns. The assistant's text starts with a space, as
# mistral_common encodes it (its sentencepiece dummy prefix), so the action begins on a token boundary.
MISTRAL_TEMPLATE = (
    "{{ bos_token }}"
    "{% set ns = namespace(system='', turn=0) %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{% set ns.system = message['content'] + '\\n\\n' %}"
    "{% elif message['role'] == 'assistant' %}"
    "{% if ns.turn % 2 == 0 %}{{ raise_exception('an assistant message must follow a user message') }}{% endif %}"
    "{{ ' ' + message['content'] + eos_token }}"
    "{% set ns.turn = ns.turn + 1 %}"
    "{% else %}"
    "{% if ns.turn % 2 == 1 %}{{ raise_exception('roles must alternate user/assistant') }}{% endif %}"
    "{{ '[INST] ' + ns.system + message['content'] + ' [/INST]' }}"
    "{% set ns.system = '' %}"
    "{% set ns.turn = ns.turn + 1 %}"
    "{% endif %}"
    "{% endfor %}"
)


@dataclass(frozen=True)
class MessageSpan:
    """Where message `index` lies in the token sequence.

    `[start, end)` are all the tokens of its rendering, scaffolding included. For an assistant message,
    `[action_start, action_end)` are its action tokens, of which `[action_start, content_end)` are its content
    and `[content_end, action_end)` the end-of-turn tokens; None for other roles.
    """

    index: int
    role: str
    start: int
    end: int
    action_start: int | None = None
    content_end: int | None = None
    action_end: int | None = None


class TokenizedConversation(NamedTuple):
    input_ids: list[int]
    action_mask: list[int]  # 1 on the agent's action tokens, 0 elsewhere
    spans: list[MessageSpan]
    straddling: int = 0  # tokens left out of an action because they also hold text outside it


class RewrittenHistory(UserError):
    """The template does not render the conversation as one growing text: it rewrites or drops earlier
    content (Qwen3's, DeepSeek-R1's), or its generation prompt is not how it renders an assistant turn."""


# Stands for an assistant message's content while the template renders it, to find what the template writes
# around it: a private-use code point no tokenizer merges with its neighbours and no template rewrites.
ACTION_MARK = "\ue000action\ue001"


def _render(tokenizer, messages: Sequence[dict[str, Any]], index: int, **kwargs) -> str:
    try:
        return tokenizer.apply_chat_template(list(messages), tokenize=False, **kwargs)
    except Exception as e:  # jinja's TemplateError, or transformers' ValueError for continue_final_message
        raise UserError(f"message {index}: the chat template cannot render the conversation up to it: {e}") from None


def special_token_ids(tokenizer) -> set[int]:
    """Ids of the tokenizer's special tokens (EOS, end-of-turn markers, ...), as the tokenizer declares them."""
    ids = set(tokenizer.all_special_ids)
    ids.update(i for i, token in tokenizer.added_tokens_decoder.items() if getattr(token, "special", False))
    return ids


_SPECIALS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _special_pattern(tokenizer) -> re.Pattern | None:
    """A pattern matching the texts of the tokenizer's special tokens (longest first), which a plain
    `tokenizer(text)` turns into those tokens wherever they appear; None without any. Built once per tokenizer:
    the inference prompt asks for it on every turn of every trajectory."""
    if tokenizer not in _SPECIALS:
        texts = {token.content for token in tokenizer.added_tokens_decoder.values()
                 if getattr(token, "special", False) and token.content}
        _SPECIALS[tokenizer] = (re.compile("|".join(re.escape(t) for t in sorted(texts, key=len, reverse=True)))
                                if texts else None)
    return _SPECIALS[tokenizer]


def literal_ranges(tokenizer, messages: Sequence[dict[str, Any]], text: str, indices: Sequence[int] | None = None,
                   **kwargs) -> list[tuple[int, int]]:
    """Character ranges of `text` (the rendering of `messages` with `kwargs`) that hold a message's content
    spelling a special token (a cell that prints "<|im_start|>assistant", a question that quotes "</s>"): that
    text is the message's, not the template's, and must not become the special token. Found by rendering the
    message with a placeholder content once; empty, at no cost, when no content spells one. `indices`: the
    messages to look at (default: all)."""
    pattern = _special_pattern(tokenizer)
    ranges = []
    for i in range(len(messages)) if indices is None else indices:
        message = messages[i]
        content = message["content"]
        if pattern is None or not pattern.search(content):
            continue
        placeholder = f"\ue000{i}\ue001"
        probe = [*messages[:i], {**message, "content": placeholder}, *messages[i + 1 :]]
        start = _render(tokenizer, probe, i, **kwargs).find(placeholder)
        if start < 0 or text[start : start + len(content)] != content:
            raise UserError(f"message {i}: its content spells a special token, and the chat template does not "
                            "write the content as it is, so it cannot be kept as plain text")
        ranges.append((start, start + len(content)))
    return ranges


def encode(tokenizer, text: str, literal: Sequence[tuple[int, int]] = ()) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids and character offsets of `text`, as `tokenizer(text, add_special_tokens=False)` gives them,
    except that inside the `literal` ranges special-token strings are plain text (`literal_ranges`).

    The tokenizer cuts its input at special tokens and tokenizes the pieces between them on their own; this
    does the same with only the template's special tokens as cuts, the pieces tokenized with special tokens
    split. Without literal ranges it is the tokenizer's own call, so nothing changes for ordinary text."""
    if not literal:
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return encoded["input_ids"], [tuple(o) for o in encoded["offset_mapping"]]
    inside = lambda at: any(a <= at < b for a, b in literal)  # noqa: E731
    cuts = [m for m in _special_pattern(tokenizer).finditer(text) if not inside(m.start())]
    ids: list[int] = []
    offsets: list[tuple[int, int]] = []
    begin = 0
    for piece_end, special in [(m.start(), m) for m in cuts] + [(len(text), None)]:
        if piece_end > begin:
            piece = tokenizer(text[begin:piece_end], add_special_tokens=False, return_offsets_mapping=True,
                              split_special_tokens=True)
            ids += piece["input_ids"]
            offsets += [(a + begin, b + begin) for a, b in piece["offset_mapping"]]
        if special is not None:
            ids.append(tokenizer.convert_tokens_to_ids(special.group(0)))
            offsets.append((special.start(), special.end()))
            begin = special.end()
    return ids, offsets


def prompt_ids(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of the state, ready for the next action (or for more of a cut last action). A special token
    spelled inside a message (an observation that prints "<|im_start|>assistant") stays plain text, as in
    training (`encode`): no output can forge a turn."""
    continuing = messages[-1]["role"] == "assistant"
    kwargs = {"add_generation_prompt": not continuing, "continue_final_message": continuing}
    text = tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)
    # The template already wrote any BOS it wants.
    return token_ids(tokenizer, messages, text, **kwargs)


def token_ids(tokenizer, messages: Sequence[dict[str, Any]], text: str, **kwargs) -> list[int]:
    """The ids of `text`, the rendering of `messages` with `kwargs`, special tokens spelled inside a message
    kept as plain text (`encode`); a slow tokenizer, which has no offsets, gets its own plain call."""
    if not getattr(tokenizer, "is_fast", False):
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return encode(tokenizer, text, literal_ranges(tokenizer, messages, text, **kwargs))[0]


def _char_layout(tokenizer, messages: Sequence[dict[str, Any]]) -> tuple[str, list[int], dict[int, tuple[int, int]]]:
    """The full text, the character end of each message's rendering, and for each assistant message the
    character range from the end of its generation prompt to the end of its content."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise UserError("the tokenizer has no chat template")
    text = ""
    ends: list[int] = []
    actions: dict[int, tuple[int, int]] = {}
    for i, message in enumerate(messages):
        rendered = _render(tokenizer, messages[: i + 1], i)
        if not rendered.startswith(text):
            raise RewrittenHistory(
                f"message {i}: the chat template's rendering of messages[:{i + 1}] does not extend its rendering "
                f"of messages[:{i}], so the message has no fixed place in the token sequence"
            )
        if message["role"] == "assistant":
            prompt = _render(tokenizer, messages[:i], i, add_generation_prompt=True) if i else ""
            content = _render(tokenizer, messages[: i + 1], i, continue_final_message=True)
            if not (prompt.startswith(text) and rendered.startswith(prompt) and rendered.startswith(content)
                    and len(prompt) <= len(content)):
                raise RewrittenHistory(
                    f"message {i}: the chat template's generation prompt after messages[:{i}] is not how it renders "
                    f"assistant message {i}, so the action's start is unknown"
                )
            actions[i] = (len(prompt), len(content))
        text = rendered
        ends.append(len(text))
    return text, ends, actions


class _Placed(NamedTuple):
    start: int  # the action's first token
    content_end: int  # past its content's last token
    end: int  # past its end-of-turn tokens
    straddling: int  # tokens at its edges that also hold text outside it (0, 1 or 2)


def _place_action(ids: Sequence[int], offsets: Sequence[tuple[int, int]], starts: Sequence[int], special: set[int],
                  a_start: int, c_end: int, limit: int) -> _Placed:
    """The tokens of an action whose content is the characters [a_start, c_end) of the tokenized text: those
    wholly inside it, then the end-of-turn tokens through the first special one, none at or past `limit`.
    A token that begins before a_start or runs past c_end also holds text that is not the action: it is
    left out and counted as straddling (and then no end-of-turn tokens follow)."""
    start = bisect.bisect_left(starts, a_start)
    straddling = int(start > 0 and offsets[start - 1][1] > a_start)
    content_end = start
    while content_end < limit and offsets[content_end][1] <= c_end and offsets[content_end][0] < c_end:
        content_end += 1
    if content_end < limit and offsets[content_end][0] < c_end:
        return _Placed(start, content_end, content_end, straddling + 1)
    end = next((t + 1 for t in range(content_end, limit) if ids[t] in special), content_end)
    return _Placed(start, content_end, end, straddling)


def tokenize_conversation(tokenizer, messages: Sequence[dict[str, Any]], *,
                          mask_observations: bool = True) -> TokenizedConversation:
    """Token ids, action mask and per-message spans of a conversation under the tokenizer's chat template.

    With `mask_observations=False` (the single-turn DPO baseline) the mask is 1 on every token from the first
    action's start to the end: observations and the later turns' scaffolding count as if the model had
    written them, as a single-turn trainer treats everything after the prompt. The spans are the same.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise UserError("action masks need a fast (tokenizers-backed) tokenizer, for its character offsets")
    text, ends, actions = _char_layout(tokenizer, messages)
    ids, offsets = encode(tokenizer, text, literal_ranges(tokenizer, messages, text))
    starts = [s for s, _ in offsets]
    special = special_token_ids(tokenizer)
    mask = [0] * len(ids)
    spans: list[MessageSpan] = []
    straddling = 0
    begin = 0
    for i, message in enumerate(messages):
        first = bisect.bisect_left(starts, begin)
        last = bisect.bisect_left(starts, ends[i])
        span = MessageSpan(i, message["role"], first, last)
        if i in actions:
            placed = _place_action(ids, offsets, starts, special, *actions[i], last)
            straddling += placed.straddling
            for t in range(placed.start, placed.end):
                mask[t] = 1
            span = MessageSpan(i, message["role"], first, last, placed.start, placed.content_end, placed.end)
        spans.append(span)
        begin = ends[i]
    return TokenizedConversation(ids, mask if mask_observations else completion_mask(mask), spans, straddling)


def completion_mask(action_mask: Sequence[int]) -> list[int]:
    """The single-turn baseline's loss mask from an action mask: 1 on every token from the first action
    token to the end (observations and the later turns' scaffolding included), 0 before it."""
    first = next((t for t, m in enumerate(action_mask) if m), len(action_mask))
    return [0] * first + [1] * (len(action_mask) - first)


def marked_rendering(tokenizer, messages: Sequence[dict[str, Any]], index: int, **kwargs) -> tuple[str, int | None]:
    """The rendering of `messages` (roles and contents only) with message `index`'s content replaced by
    ACTION_MARK, and where the text after the marker begins (None if the template does not write the content):
    what the template writes around a message, whatever it does to the rest."""
    probe = [{"role": m["role"], "content": m["content"]} for m in messages]
    probe[index]["content"] = ACTION_MARK
    text = _render(tokenizer, probe, len(messages) - 1, **kwargs)
    at = text.rfind(ACTION_MARK)
    return text, at + len(ACTION_MARK) if at >= 0 else None


def assistant_closing(tokenizer, messages: Sequence[dict[str, Any]], index: int) -> str:
    """What the template writes after assistant message `index`'s content when it ends the conversation (its
    end-of-turn text, e.g. "<|im_end|>\\n")."""
    text, begin = marked_rendering(tokenizer, [*messages[:index], {"role": "assistant", "content": ""}], index)
    return text[begin:] if begin is not None else ""


def tokenize_per_action(tokenizer, messages: Sequence[dict[str, Any]]) -> list[TokenizedConversation]:
    """A conversation under a template that rewrites its history (Qwen3 strips the reasoning of earlier turns,
    DeepSeek-R1's drops it always), as the sequences its actions were written in: each action in the context
    the template shows at its turn (`apply_chat_template(messages[:i], add_generation_prompt=True)`, what a
    rollout that renders the state anew feeds the model), followed by its content as it stands and its
    end-of-turn tokens. Consecutive actions share one sequence where the later one's context extends the
    earlier one's sequence (the template rewrote nothing before it), so a prefix-stable template gives one.

    The action mask is 1 on each sequence's own actions (their content and end-of-turn tokens through the first
    special one) and 0 on the contexts: every action is learned once, in its own context. `spans` are empty."""
    if not getattr(tokenizer, "is_fast", False):
        raise UserError("action masks need a fast (tokenizers-backed) tokenizer, for its character offsets")
    if getattr(tokenizer, "chat_template", None) is None:
        raise UserError("the tokenizer has no chat template")
    special = special_token_ids(tokenizer)
    segments: list[tuple[str, list[tuple[int, int]], list[tuple[int, int]]]] = []  # text, actions, literal
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        if i == 0:
            raise UserError("message 0: an action needs a prompt before it")
        context = _render(tokenizer, messages[:i], i, add_generation_prompt=True)
        content = message["content"]
        literal = literal_ranges(tokenizer, messages[:i], context, add_generation_prompt=True)
        if segments and context.startswith(segments[-1][0]):
            ranges = segments[-1][1]
            segments[-1] = (context + content, [*ranges, (len(context), len(context) + len(content))],
                            [*literal, (len(context), len(context) + len(content))])
        else:
            segments.append((context + content, [(len(context), len(context) + len(content))],
                             [*literal, (len(context), len(context) + len(content))]))
        segments[-1] = (segments[-1][0] + assistant_closing(tokenizer, messages, i), *segments[-1][1:])
    out = []
    for text, ranges, literal in segments:
        ids, offsets = encode(tokenizer, text, literal)
        starts = [s for s, _ in offsets]
        mask = [0] * len(ids)
        straddling = 0
        for n, (a_start, c_end) in enumerate(ranges):
            limit = bisect.bisect_left(starts, ranges[n + 1][0]) if n + 1 < len(ranges) else len(ids)
            placed = _place_action(ids, offsets, starts, special, a_start, c_end, limit)
            straddling += placed.straddling
            for t in range(placed.start, placed.end):
                mask[t] = 1
        out.append(TokenizedConversation(ids, mask, [], straddling))
    return out


def label_positions(conversation: TokenizedConversation) -> list[int]:
    """For a conversation whose assistant messages are single-token labels ('+'/'-'): the positions p whose
    next token input_ids[p + 1] is a label, one per assistant message, in order. A generative PRM reads
    its prediction for step k from the logits at the k-th position.

    Raises `UserError` if an assistant message is not exactly one whole token.
    """
    positions = []
    for span in conversation.spans:
        if span.action_start is None:
            continue
        if span.content_end - span.action_start != 1:
            raise UserError(
                f"message {span.index}: a label must be exactly one token of its own, got "
                f"{span.content_end - span.action_start} (a token shared with the template's text counts as none)"
            )
        if span.action_start == 0:
            raise UserError(f"message {span.index}: a label needs a token before it")
        positions.append(span.action_start - 1)
    return positions


def right_pad(rows: Sequence[Sequence[int]], pad_id: int):
    """Token rows as one right-padded batch: (ids [B, T] filled with `pad_id` after each row, attention_mask
    [B, T]), long tensors. Right padding: a causal model's real positions never see the pads."""
    import torch

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        attention[i, : len(r)] = 1
    return ids, attention
