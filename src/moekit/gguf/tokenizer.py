"""moekit's GPT-2-style byte-level BPE tokenizer (and chat template) in GGUF metadata: llama.cpp's
"gpt2" tokenizer model with the "gpt-2" pre-tokenizer, bos = eos = end-of-text."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from ..server.chat_template import template_source
from ..tokens import end_of_text_id


def add_tokenizer(writer, gguf, tokenizer, vocab_size: int) -> None:
    """moekit's byte-level BPE as llama.cpp's "gpt2" tokenizer with the GPT-2 pre-tokenizer."""
    if tokenizer is None:
        raise ValueError("the checkpoint has no tokenizer.json: llama.cpp needs the vocabulary in the GGUF")
    data = json.loads(tokenizer.to_str())
    model, pre = data.get("model") or {}, data.get("pre_tokenizer") or {}
    if model.get("type") != "BPE" or pre.get("type") != "ByteLevel" or not pre.get("use_regex", True) \
            or pre.get("add_prefix_space"):
        raise ValueError("the tokenizer is not moekit's GPT-2-style byte-level BPE; the export writes only that kind")
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    if len(vocab) > vocab_size or max(vocab.values()) >= vocab_size:
        raise ValueError(f"the tokenizer has ids beyond the model's vocab_size={vocab_size}")
    special = {t["id"] for t in data.get("added_tokens", []) if t.get("special")}
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]  # ids the tokenizer never produces (as convert_hf_to_gguf)
    types = [gguf.TokenType.UNUSED] * vocab_size
    for text, i in vocab.items():
        tokens[i] = text
        types[i] = gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    eot = end_of_text_id(tokenizer)
    if eot is not None:
        writer.add_bos_token_id(eot)
        writer.add_eos_token_id(eot)
    writer.add_add_bos_token(False)  # moekit encodes prompts as they are


def checkpoint_chat_template(path: Path) -> Optional[str]:
    """The Jinja chat template a checkpoint carries (tokenizer_config.json or chat_template.jinja), if any."""
    found = template_source(path)
    return None if found is None else found[0]
