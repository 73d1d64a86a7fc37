"""llama (LlamaForCausalLM), analysis only: a dense decoder whose `attention_bias` (q, k, v and o) and
`mlp_bias` moekit cannot hold."""

from __future__ import annotations

from ..shape import FFN, Arch, Attention
from .spec import COMMON_KEYS, ArchSpec


class LlamaSpec(ArchSpec):
    model_type = "llama"
    architecture = "LlamaForCausalLM"
    loadable = False
    required = (*COMMON_KEYS, "intermediate_size")

    def to_arch(self, hf: dict, name: str):
        self.check_required(hf)
        d, h = hf["hidden_size"], hf["num_attention_heads"]
        bias, mlp_bias = bool(hf.get("attention_bias")), bool(hf.get("mlp_bias"))
        attn = Attention("mha", h, hf.get("num_key_value_heads") or h, hf.get("head_dim") or d // h,
                         qkv_bias=bias, out_bias=bias)
        ffns = (FFN("dense", d_ff=hf["intermediate_size"], bias=mlp_bias),) * hf["num_hidden_layers"]
        notes = ("mlp_bias is counted as dense_ffn parameters",) if mlp_bias else ()
        return Arch(name, d, hf["vocab_size"], attn, ffns, tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
                    max_seq_len=hf.get("max_position_embeddings", 4096),
                    dtype=str(hf.get("torch_dtype") or hf.get("dtype") or "bfloat16"), notes=notes)
