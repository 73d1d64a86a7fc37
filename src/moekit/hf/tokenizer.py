"""The tokenizer files of an exported checkpoint, so that transformers' `AutoTokenizer` loads the very
tokenizer moekit uses (same ids) and `generate` stops at end-of-text.

tokenizer.json alone is not enough: AutoTokenizer then picks the architecture's own tokenizer class
(Qwen2Tokenizer for qwen3_moe), which rebuilds the pre-tokenizer and splits whitespace differently.
tokenizer_config.json names the class that reads tokenizer.json as it is (PreTrainedTokenizerFast),
the special tokens and the context length; special_tokens_map.json repeats the special tokens for
older transformers versions.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict

from ..checkpoint import TOKENIZER_FILE
from ..data import EOT
from ..tokens import end_of_text_id

TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
GENERATION_CONFIG = "generation_config.json"
TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")  # config.json keys generation reads


def token_ids(tokenizer) -> Dict[str, int]:
    """config.json's bos/eos token ids: moekit's end-of-text token is both (it separates documents);
    empty when the tokenizer has none."""
    eot = end_of_text_id(tokenizer)
    return {} if eot is None else {"bos_token_id": eot, "eos_token_id": eot}


def write_tokenizer(path: Path, tokenizer, max_seq_len: int) -> None:
    """tokenizer.json, tokenizer_config.json and special_tokens_map.json in `path`."""
    tokenizer.save(str(path / TOKENIZER_FILE))
    special = {"bos_token": EOT, "eos_token": EOT} if end_of_text_id(tokenizer) is not None else {}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_seq_len,
              "clean_up_tokenization_spaces": False, **special}
    (path / TOKENIZER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (path / SPECIAL_TOKENS_MAP).write_text(json.dumps(special, indent=2, sort_keys=True) + "\n")


def write_generation_config(path: Path, hf_config: dict) -> None:
    """generation_config.json with config.json's token ids (HF `generate` stops at eos_token_id)."""
    config = {key: hf_config[key] for key in TOKEN_ID_KEYS if hf_config.get(key) is not None}
    (path / GENERATION_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
