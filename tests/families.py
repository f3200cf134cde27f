"""Tiny models of real model families, for the tests: a random-weight Llama whose tokenizer has the family's
special tokens (with their real strings) and its original chat template, as TRL ships it.

    from families import FAMILIES, build_family_model   # in a test (pytest puts tests/ on sys.path)
    path = build_family_model(tmp_path / "qwen3", "qwen3")   # AutoTokenizer, AutoModelForCausalLM, vLLM

The architecture is `mathagent.tiny`'s (hidden 128, 2 layers, 2 heads of head_dim 64: vLLM's CPU attention
wants head_dim in {32, 64, 80, ...}); only the tokenizer and the template change. The byte-level BPE vocabulary
is trained once per process (on `mathagent.tiny._corpus` and the templates' own text) and shared; each family
adds its tokens on top, so the whole set builds in a few seconds.

What is copied from the real families, from their tokenizer_config.json / generation_config.json as far as I
know them (the `Family` entries say where I am unsure):
- the strings of the special tokens, and which added tokens are *not* special (Qwen3's `<think>`, DeepSeek's
  `<｜User｜>`): a non-special added token is still one id, but `skip_special_tokens` keeps it and
  `mathagent.chat` does not protect it from being spelled by an observation;
- which string is BOS, and whether the tokenizer itself prepends it (`add_special_tokens=True`: Llama-3,
  Gemma, the DeepSeek distills), besides the template writing it;
- Phi-3.5's `rstrip` on its turn markers (the whitespace after `<|end|>` / `<|assistant|>` disappears when
  tokenizing);
- the tokens generation stops on (`generation_config.eos_token_id`, a list where there are several).

What is not: the real vocabularies and pre-tokenizers (sentencepiece for Gemma and Phi-3.5, the regex splits
of Llama-3 and Qwen), the real ids, and the reserved and multimodal tokens a template never writes. `eos_token`
is the family's end-of-assistant-turn token (what generation stops on), which for Gemma-3, Phi-3.5 and GLM-4
is not the `eos_token` of the real tokenizer_config (noted in their entries).
"""

from __future__ import annotations

import functools
import os
import random
from dataclasses import dataclass
from pathlib import Path


def chat_template_dir() -> Path:
    """TRL's copies of the original chat templates (`trl/chat_templates/*.jinja`)."""
    import trl

    return Path(trl.__file__).parent / "chat_templates"


@dataclass(frozen=True)
class Family:
    template: str  # the TRL file, without .jinja (the original, not the `_training` patch)
    special: tuple[str, ...]  # added special tokens, BOS / EOS / pad included
    eos: str  # where an assistant turn ends: what generation stops on
    pad: str
    bos: str | None = None
    plain: tuple[str, ...] = ()  # added tokens that are not special
    stops: tuple[str, ...] = ()  # more tokens generation stops on, after `eos`
    add_bos: bool = False  # the tokenizer prepends BOS itself when asked for special tokens
    rstrip: tuple[str, ...] = ()  # special tokens that swallow the whitespace after them
    note: str = ""  # where this departs from the real tokenizer, or where I am unsure


_QWEN = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
_QWEN_VISION = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
_QWEN3_PLAIN = ("<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>")
_DEEPSEEK = ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>")
_DEEPSEEK_PLAIN = ("<｜User｜>", "<｜Assistant｜>", "<think>", "</think>", "<｜tool▁calls▁begin｜>",
                   "<｜tool▁calls▁end｜>", "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>",
                   "<｜tool▁outputs▁begin｜>", "<｜tool▁outputs▁end｜>", "<｜tool▁output▁begin｜>",
                   "<｜tool▁output▁end｜>")

SPECS: dict[str, Family] = {
    "qwen2_5": Family(
        "qwen2_5", _QWEN, eos="<|im_end|>", pad="<|endoftext|>", plain=("<tool_call>", "</tool_call>"),
        stops=("<|endoftext|>",)),
    "qwen3": Family(
        "qwen3", _QWEN, eos="<|im_end|>", pad="<|endoftext|>", plain=_QWEN3_PLAIN, stops=("<|endoftext|>",)),
    "qwen3_5_think": Family(
        "qwen3_5_think", _QWEN + _QWEN_VISION, eos="<|im_end|>", pad="<|endoftext|>", plain=_QWEN3_PLAIN,
        stops=("<|endoftext|>",), note="Qwen3.5's tokenizer taken to be Qwen3's (think and tool tags not special): "
                                       "unsure"),
    "qwen3_6": Family(
        "qwen3_6", _QWEN + _QWEN_VISION, eos="<|im_end|>", pad="<|endoftext|>", plain=_QWEN3_PLAIN,
        stops=("<|endoftext|>",), note="as qwen3_5_think: unsure"),
    "deepseek_r1_distill": Family(
        "deepseek_r1_distill", _DEEPSEEK, bos="<｜begin▁of▁sentence｜>", eos="<｜end▁of▁sentence｜>",
        pad="<｜end▁of▁sentence｜>", plain=_DEEPSEEK_PLAIN, add_bos=True,
        note="the Qwen distills: <｜User｜>, <｜Assistant｜>, <think> not special (fairly sure); the tool tokens "
             "added as plain tokens (unsure the distills have them)"),
    "deepseekv3": Family(
        "deepseekv3", _DEEPSEEK, bos="<｜begin▁of▁sentence｜>", eos="<｜end▁of▁sentence｜>",
        pad="<｜end▁of▁sentence｜>", plain=_DEEPSEEK_PLAIN,
        note="add_bos_token false and <｜User｜> / <｜Assistant｜> not special: unsure"),
    "llama3_1": Family(
        "llama3_1",
        ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
         "<|eom_id|>", "<|python_tag|>", "<|finetune_right_pad_id|>"),
        bos="<|begin_of_text|>", eos="<|eot_id|>", pad="<|finetune_right_pad_id|>",
        stops=("<|end_of_text|>", "<|eom_id|>"), add_bos=True,
        note="the real one has no pad token; its 250 reserved tokens are left out"),
    "gemma3": Family(
        "gemma3",
        ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>",
         "<end_of_image>", "<image_soft_token>"),
        bos="<bos>", eos="<end_of_turn>", pad="<pad>", stops=("<eos>",), add_bos=True,
        note="the real tokenizer_config's eos_token is <eos>; generation stops on <end_of_turn> and <eos>"),
    "phi3_5": Family(
        "phi3_5",
        ("<s>", "<unk>", "<|endoftext|>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>"),
        bos="<s>", eos="<|end|>", pad="<|endoftext|>", stops=("<|endoftext|>", "<|assistant|>"),
        rstrip=("<|assistant|>", "<|system|>", "<|end|>", "<|user|>"),
        note="the real eos_token is <|endoftext|>, which the template writes after the last message without a "
             "generation prompt (here <|end|>); rstrip on the turn markers from memory (fairly sure)"),
    "glm4moe": Family(
        "glm4moe",
        ("<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
         "<|assistant|>", "<|observation|>", "<think>", "</think>", "<tool_call>", "</tool_call>",
         "<tool_response>", "</tool_response>", "<arg_key>", "</arg_key>", "<arg_value>", "</arg_value>",
         "/nothink"),
        eos="<|user|>", pad="<|endoftext|>", stops=("<|observation|>", "<|endoftext|>"),
        note="the real eos_token is <|endoftext|>; an assistant turn has no closing token and generation stops "
             "on the next turn's <|user|> or <|observation|>; <think> and the tool tags special: unsure"),
    "cohere2": Family(
        "cohere2",
        ("<PAD>", "<UNK>", "<BOS_TOKEN>", "<EOS_TOKEN>", "<|START_OF_TURN_TOKEN|>", "<|END_OF_TURN_TOKEN|>",
         "<|USER_TOKEN|>", "<|CHATBOT_TOKEN|>", "<|SYSTEM_TOKEN|>", "<|START_RESPONSE|>", "<|END_RESPONSE|>",
         "<|START_THINKING|>", "<|END_THINKING|>"),
        bos="<BOS_TOKEN>", eos="<|END_OF_TURN_TOKEN|>", pad="<PAD>", add_bos=True,
        note="stops on <|END_OF_TURN_TOKEN|> alone (after <|END_RESPONSE|>): unsure"),
    "nemotron_3_nano": Family(
        "nemotron_3_nano", ("<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"),
        bos="<s>", eos="<|im_end|>", pad="</s>", stops=("</s>",), plain=_QWEN3_PLAIN,
        note="the whole tokenizer from guesswork (ChatML markers special, think and tool tags plain)"),
    "lfm2_2_5": Family(
        "lfm2_2_5",
        ("<|pad|>", "<|startoftext|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|tool_call_start|>",
         "<|tool_call_end|>", "<|tool_list_start|>", "<|tool_list_end|>", "<|tool_response_start|>",
         "<|tool_response_end|>"),
        bos="<|startoftext|>", eos="<|im_end|>", pad="<|pad|>", plain=("<think>", "</think>"),
        note="think tags plain: unsure"),
}

# family name -> the TRL chat template file it renders with
FAMILIES: dict[str, str] = {name: f"{spec.template}.jinja" for name, spec in SPECS.items()}


@functools.lru_cache(maxsize=1)
def _vocabulary(vocab_size: int = 1024) -> str:
    """The shared byte-level BPE (no added tokens), as JSON: trained once per process."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from mathagent.tiny import _corpus

    bpe = Tokenizer(models.BPE(unk_token=None))
    # Digits one by one, as in mathagent.tiny (and Llama's and Qwen's tokenizers).
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    # The templates' text too, so that their fixed prose (Qwen's default system prompt, Cohere's preamble)
    # costs tens of tokens, not hundreds.
    templates = [(chat_template_dir() / file).read_text(encoding="utf-8") for file in sorted(set(FAMILIES.values()))]
    bpe.train_from_iterator(_corpus(random.Random(0)) + templates * 20, trainer=trainer)
    return bpe.to_str()


def build_tokenizer(family: str):
    """The family's tokenizer (a fast tokenizer with its chat template), not saved."""
    from tokenizers import AddedToken, Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    spec = SPECS[family]
    bpe = Tokenizer.from_str(_vocabulary())
    bpe.add_special_tokens([AddedToken(t, special=True, normalized=False, rstrip=t in spec.rstrip)
                            for t in spec.special])
    if spec.plain:
        bpe.add_tokens([AddedToken(t, special=False, normalized=False) for t in spec.plain])
    if spec.add_bos:
        bos_id = bpe.token_to_id(spec.bos)
        bpe.post_processor = processors.TemplateProcessing(
            single=f"{spec.bos} $A", pair=f"{spec.bos} $A {spec.bos} $B:1", special_tokens=[(spec.bos, bos_id)])
    named = {spec.bos, spec.eos, spec.pad}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=spec.bos, eos_token=spec.eos,
                                        pad_token=spec.pad, unk_token=None,
                                        additional_special_tokens=[t for t in spec.special if t not in named])
    tokenizer.chat_template = (chat_template_dir() / FAMILIES[family]).read_text(encoding="utf-8")
    return tokenizer


def build_family_model(out_dir: str | os.PathLike, family: str, *, seed: int = 0) -> Path:
    """A tiny random-weight Llama with `family`'s tokenizer and chat template, saved into `out_dir` (model and
    tokenizer, `save_pretrained`) for transformers and vLLM; returns the path."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Writing model shards" of a 1 MB model is noise
    if family not in SPECS:
        raise ValueError(f"unknown family {family!r}: expected one of {', '.join(SPECS)}")
    spec = SPECS[family]
    tokenizer = build_tokenizer(family)
    stops = [tokenizer.convert_tokens_to_ids(t) for t in (spec.eos, *spec.stops)]
    eos_ids = stops if len(stops) > 1 else stops[0]
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, head_dim=64, max_position_embeddings=4096,
        tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id, eos_token_id=eos_ids,
        pad_token_id=tokenizer.pad_token_id, torch_dtype="float32")
    model = LlamaForCausalLM(config).eval()
    model.generation_config.eos_token_id = eos_ids
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 3:
        sys.exit(f"usage: python tests/families.py OUT_DIR FAMILY   (FAMILY: {', '.join(FAMILIES)})")
    print(build_family_model(sys.argv[1], sys.argv[2]))
