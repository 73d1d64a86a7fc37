"""deepseek_v3 (DeepseekV3ForCausalLM), analysis only: MLA attention, n_routed_experts routed +
n_shared_experts shared experts, the first first_k_dense_replace layers dense. kimi_k2 (Kimi K2's
config.json, also DeepseekV3ForCausalLM) has the same layout."""

from __future__ import annotations

from ..shape import FFN, Arch, Attention
from .spec import COMMON_KEYS, ArchSpec


class DeepseekV3Spec(ArchSpec):
    model_type = "deepseek_v3"
    architecture = "DeepseekV3ForCausalLM"
    loadable = False
    required = (*COMMON_KEYS, "kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim",
                "moe_intermediate_size", "n_routed_experts", "num_experts_per_tok", "intermediate_size")

    def to_arch(self, hf: dict, name: str):
        self.check_required(hf)
        h, rope, nope = hf["num_attention_heads"], hf["qk_rope_head_dim"], hf["qk_nope_head_dim"]
        attn = Attention("mla", h, h, nope + rope, qkv_bias=bool(hf.get("attention_bias")),
                         q_lora_rank=hf.get("q_lora_rank"), kv_lora_rank=hf["kv_lora_rank"],
                         qk_nope_head_dim=nope, qk_rope_head_dim=rope, v_head_dim=hf["v_head_dim"])
        first_dense = hf.get("first_k_dense_replace", 0)
        n = hf["moe_intermediate_size"]
        moe = FFN("moe", num_experts=hf["n_routed_experts"], top_k=hf["num_experts_per_tok"], d_expert=n,
                  d_shared=(hf.get("n_shared_experts") or 0) * n)
        dense = FFN("dense", d_ff=hf["intermediate_size"])
        ffns = [dense if i < first_dense else moe for i in range(hf["num_hidden_layers"])]
        notes = ("MLA: KV cache holds the compressed latent (kv_lora_rank + qk_rope_head_dim per layer), "
                 "as DeepSeek/vLLM cache it",
                 "the multi-token-prediction (MTP) module is not counted (HF transformers does not build it)")
        return Arch(name, hf["hidden_size"], hf["vocab_size"], attn, tuple(ffns),
                    tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
                    max_seq_len=hf.get("max_position_embeddings", 4096),
                    dtype=str(hf.get("torch_dtype") or hf.get("dtype") or "bfloat16"), notes=notes)


class KimiK2Spec(DeepseekV3Spec):
    model_type = "kimi_k2"
