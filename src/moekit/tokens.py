"""Token ids a checkpoint declares, for `moekit generate`, `moekit serve` and HF export."""

from __future__ import annotations

import json
import os
from typing import List, Optional

from .data import EOT


def eos_token_ids(path: str, model) -> Optional[List[int]]:
    """End-of-sequence ids: `model.eos_token_id`, else an HF checkpoint's generation_config.json/config.json.

    Ids outside [0, vocab_size) are dropped; None when there are none.
    """
    eos = getattr(model, "eos_token_id", None)
    for name in ("generation_config.json", "config.json"):
        file = os.path.join(path, name)
        if eos is None and os.path.isfile(file):
            with open(file) as f:
                try:
                    eos = json.load(f).get("eos_token_id")
                except (json.JSONDecodeError, AttributeError):
                    eos = None
    if eos is None:
        return None
    ids = [eos] if isinstance(eos, int) else list(eos)
    return [i for i in ids if isinstance(i, int) and 0 <= i < model.cfg.vocab_size] or None


def end_of_text_id(tokenizer) -> Optional[int]:
    """The id of moekit's end-of-text token `EOT` (the separator after every training document) in
    a `tokenizers.Tokenizer`, or None when the tokenizer has no such token."""
    return None if tokenizer is None else tokenizer.token_to_id(EOT)
