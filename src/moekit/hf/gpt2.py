"""gpt2 (GPT2LMHeadModel), analysis only: the GPT-3-style dense layout (LayerNorm with bias, learned
positions, a 2-matrix GELU MLP, biases everywhere, tied head)."""

from __future__ import annotations

from ..shape import FFN, Arch, Attention
from .spec import ArchSpec


class Gpt2Spec(ArchSpec):
    model_type = "gpt2"
    architecture = "GPT2LMHeadModel"
    loadable = False
    required = ("vocab_size", "n_embd", "n_layer", "n_head", "n_positions")

    def to_arch(self, hf: dict, name: str):
        self.check_required(hf)
        d, h, n_pos = hf["n_embd"], hf["n_head"], hf["n_positions"]
        attn = Attention("mha", h, h, d // h, qkv_bias=True, out_bias=True)
        ffns = (FFN("dense", d_ff=hf.get("n_inner") or 4 * d, activation="gelu", bias=True),) * hf["n_layer"]
        return Arch(name, d, hf["vocab_size"], attn, ffns, tie_embeddings=hf.get("tie_word_embeddings", True),
                    norm="layernorm", n_positions=n_pos, max_seq_len=n_pos, dtype=str(hf.get("torch_dtype") or "float16"))
