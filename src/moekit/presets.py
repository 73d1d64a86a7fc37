"""Named model presets: CI-sized ones and the published shapes of real MoE models.

Each preset is plain data (the `ModelConfig` keyword arguments, the MoE layer as a dict);
`ModelConfig.preset(name, **overrides)` builds it. The real-model presets carry the
published configuration values (config.json of each release); build them on the meta
device for analysis:

    with torch.device("meta"):
        model = Transformer(ModelConfig.preset("qwen3-30b-a3b"))
"""

from __future__ import annotations

MODEL_PRESETS = {
    "tiny": dict(
        name="tiny", vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128,
        qk_norm="head", max_seq_len=256,
        moe=dict(d_model=64, d_expert=32, num_experts=8, top_k=2, aux_loss_coef=0.01),
    ),
    "small": dict(
        name="small", vocab_size=4096, d_model=256, n_layers=4, n_heads=8, n_kv_heads=4, d_ff=768,
        qk_norm="head", max_seq_len=512, first_k_dense=1,
        moe=dict(d_model=256, d_expert=128, num_experts=16, top_k=4, num_shared_experts=1,
                 router="sigmoid_topk", bias_update_speed=0.001, seq_aux_loss_coef=1e-4),
    ),
    "mla-tiny": dict(  # DeepSeek-V3's layout in miniature: MLA, a dense first layer, sigmoid group routing
        name="mla-tiny", vocab_size=512, d_model=64, n_layers=3, n_heads=4, attention="mla", q_lora_rank=32,
        kv_lora_rank=24, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, rope_interleave=True,
        d_ff=128, first_k_dense=1, max_seq_len=256,
        moe=dict(d_model=64, d_expert=32, num_experts=8, top_k=2, router="sigmoid_topk", num_groups=2,
                 topk_groups=1, routed_scaling_factor=2.5, norm_topk_prob=True, num_shared_experts=1,
                 d_shared=32),
    ),
    "qwen3-30b-a3b": dict(
        name="qwen3-30b-a3b", vocab_size=151936, d_model=2048, n_layers=48, n_heads=32, n_kv_heads=4,
        head_dim=128, qk_norm="head", rope_theta=1e6, norm_eps=1e-6, d_ff=6144, max_seq_len=40960,
        dtype="bfloat16",
        moe=dict(d_model=2048, d_expert=768, num_experts=128, top_k=8, norm_topk_prob=True,
                 aux_loss_coef=0.001),
    ),
    "mixtral-8x7b": dict(
        name="mixtral-8x7b", vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8,
        head_dim=128, rope_theta=1e6, norm_eps=1e-5, d_ff=14336, max_seq_len=32768, dtype="bfloat16",
        moe=dict(d_model=4096, d_expert=14336, num_experts=8, top_k=2, norm_topk_prob=True,
                 aux_loss_coef=0.02),
    ),
    "olmoe-1b-7b": dict(
        name="olmoe-1b-7b", vocab_size=50304, d_model=2048, n_layers=16, n_heads=16, n_kv_heads=16,
        head_dim=128, qk_norm="full", rope_theta=10000.0, norm_eps=1e-5, d_ff=1024, max_seq_len=4096,
        dtype="bfloat16",
        moe=dict(d_model=2048, d_expert=1024, num_experts=64, top_k=8, norm_topk_prob=False,
                 aux_loss_coef=0.01, z_loss_coef=0.001),
    ),
    "qwen2-57b-a14b": dict(
        name="qwen2-57b-a14b", vocab_size=151936, d_model=3584, n_layers=28, n_heads=28, n_kv_heads=4,
        head_dim=128, attention_bias=True, rope_theta=1e6, norm_eps=1e-6, d_ff=18944, max_seq_len=131072,
        dtype="bfloat16",
        moe=dict(d_model=3584, d_expert=2560, num_experts=64, top_k=8, norm_topk_prob=False,
                 num_shared_experts=1, d_shared=20480, shared_gate=True, aux_loss_coef=0.001),
    ),
    "deepseek-v3": dict(
        name="deepseek-v3", vocab_size=129280, d_model=7168, n_layers=61, n_heads=128, attention="mla",
        q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        rope_interleave=True, rope_theta=10000.0, norm_eps=1e-6, d_ff=18432, first_k_dense=3, max_seq_len=163840,
        dtype="bfloat16",
        rope_scaling={"type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096,
                      "beta_fast": 32.0, "beta_slow": 1.0, "mscale_all_dim": 1.0, "attention_factor": 1.0},
        notes="DeepSeek-V3's published shape with multi-head latent attention (MLA); the multi-token-"
              "prediction module is not built.",
        moe=dict(d_model=7168, d_expert=2048, num_experts=256, top_k=8, router="sigmoid_topk",
                 num_groups=8, topk_groups=4, routed_scaling_factor=2.5, norm_topk_prob=True,
                 num_shared_experts=1, seq_aux_loss_coef=1e-4, bias_update_speed=0.001),
    ),
}


def hybrid_layers(n: int, every: int = 4) -> tuple:
    """Qwen3-Next / Qwen3.5 layer_types: full attention every `every`-th layer, Gated DeltaNet ("linear") between."""
    return tuple("full" if (i + 1) % every == 0 else "linear" for i in range(n))


# shared by the published Qwen3-Next / Qwen3.5 / Qwen3.6 configs
QWEN_NEXT_ATTENTION = dict(head_dim=256, rotary_dim=64, qk_norm="head", attn_output_gate=True, zero_centred_norm=True,
                           rope_theta=1e7, norm_eps=1e-6)
QWEN_NEXT_LINEAR = dict(linear_num_key_heads=16, linear_key_head_dim=128, linear_value_head_dim=128)


MODEL_PRESETS.update({  # hybrids: Gated DeltaNet ("linear") layers with gated full attention every 4th layer
    "hybrid-tiny": dict(  # trainable miniature of Qwen3.5-MoE's layout
        name="hybrid-tiny", vocab_size=512, d_model=64, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=16,
        rotary_dim=8, qk_norm="head", attn_output_gate=True, zero_centred_norm=True, max_seq_len=512,
        layer_types=hybrid_layers(4), linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
        linear_value_head_dim=16, d_ff=128,
        moe=dict(d_model=64, d_expert=32, num_experts=8, top_k=2, norm_topk_prob=True, num_shared_experts=1,
                 d_shared=32, shared_gate=True, aux_loss_coef=0.01),
    ),
    # config.json of Qwen/Qwen3-Next-80B-A3B-Instruct (the multi-token-prediction layer is not built)
    "qwen3-next-80b-a3b": dict(
        name="qwen3-next-80b-a3b", vocab_size=151936, d_model=2048, n_layers=48, n_heads=16, n_kv_heads=2,
        **QWEN_NEXT_ATTENTION, d_ff=5120, max_seq_len=262144, dtype="bfloat16", layer_types=hybrid_layers(48),
        linear_num_value_heads=32, linear_fused_proj=True, **QWEN_NEXT_LINEAR,
        moe=dict(d_model=2048, d_expert=512, num_experts=512, top_k=10, norm_topk_prob=True, num_shared_experts=1,
                 d_shared=512, shared_gate=True, aux_loss_coef=0.001),
    ),
    # text_config of Qwen/Qwen3.5-397B-A17B's config.json (vision tower and MTP layer not built)
    "qwen3.5-397b-a17b": dict(
        name="qwen3.5-397b-a17b", vocab_size=248320, d_model=4096, n_layers=60, n_heads=32, n_kv_heads=2,
        **QWEN_NEXT_ATTENTION, d_ff=1024, max_seq_len=262144, dtype="bfloat16", layer_types=hybrid_layers(60),
        linear_num_value_heads=64, **QWEN_NEXT_LINEAR,
        moe=dict(d_model=4096, d_expert=1024, num_experts=512, top_k=10, norm_topk_prob=True, num_shared_experts=1,
                 d_shared=1024, shared_gate=True, aux_loss_coef=0.001),
    ),
    # text_config of Qwen/Qwen3.6-35B-A3B's config.json (Qwen3.5-35B-A3B's shape; vision tower not built)
    "qwen3.6-35b-a3b": dict(
        name="qwen3.6-35b-a3b", vocab_size=248320, d_model=2048, n_layers=40, n_heads=16, n_kv_heads=2,
        **QWEN_NEXT_ATTENTION, d_ff=512, max_seq_len=262144, dtype="bfloat16", layer_types=hybrid_layers(40),
        linear_num_value_heads=32, **QWEN_NEXT_LINEAR,
        moe=dict(d_model=2048, d_expert=512, num_experts=256, top_k=8, norm_topk_prob=True, num_shared_experts=1,
                 d_shared=512, shared_gate=True, aux_loss_coef=0.001),
    ),
})

GPT_OSS_ROPE = {"type": "yarn", "factor": 32.0, "original_max_position_embeddings": 4096, "beta_fast": 32.0,
                "beta_slow": 1.0, "truncate": False}
GPT_OSS_MOE = dict(d_expert=2880, top_k=4, router="topk_softmax", router_bias=True, expert_bias=True,
                   activation="swiglu_oai", aux_loss_coef=0.9)

MODEL_PRESETS.update({  # frontier MoE families (hf/gpt_oss.py, glm4_moe.py, minimax_m2.py, deepseek_v3.py)
    "gpt-oss-tiny": dict(  # trainable miniature of gpt-oss: sinks, biases, clamped SwiGLU, sliding + full layers
        name="gpt-oss-tiny", vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
        layer_types=("sliding", "full"), sliding_window=32, attention_sinks=True, attention_bias=True,
        attention_out_bias=True, d_ff=128, max_seq_len=256,
        moe=dict(d_model=64, d_expert=32, num_experts=8, top_k=2, router="topk_softmax", router_bias=True,
                 expert_bias=True, activation="swiglu_oai", aux_loss_coef=0.01),
    ),
    # config.json of openai/gpt-oss-20b and -120b (they differ in layers and experts)
    "gpt-oss-20b": dict(
        name="gpt-oss-20b", vocab_size=201088, d_model=2880, n_layers=24, n_heads=64, n_kv_heads=8, head_dim=64,
        layer_types=("sliding", "full") * 12, sliding_window=128, attention_sinks=True, attention_bias=True,
        attention_out_bias=True, rope_theta=150000.0, rope_scaling=GPT_OSS_ROPE, norm_eps=1e-5, d_ff=2880,
        max_seq_len=131072, dtype="bfloat16", notes="openai/gpt-oss-20b config.json; experts ship as MXFP4",
        moe=dict(d_model=2880, num_experts=32, **GPT_OSS_MOE),
    ),
    "gpt-oss-120b": dict(
        name="gpt-oss-120b", vocab_size=201088, d_model=2880, n_layers=36, n_heads=64, n_kv_heads=8, head_dim=64,
        layer_types=("sliding", "full") * 18, sliding_window=128, attention_sinks=True, attention_bias=True,
        attention_out_bias=True, rope_theta=150000.0, rope_scaling=GPT_OSS_ROPE, norm_eps=1e-5, d_ff=2880,
        max_seq_len=131072, dtype="bfloat16", notes="openai/gpt-oss-120b config.json; experts ship as MXFP4",
        moe=dict(d_model=2880, num_experts=128, **GPT_OSS_MOE),
    ),
    "glm-4.5": dict(
        name="glm-4.5", vocab_size=151552, d_model=5120, n_layers=92, n_heads=96, n_kv_heads=8, head_dim=128,
        rotary_dim=64, qk_norm="head", attention_bias=True, rope_theta=1e6, norm_eps=1e-5, d_ff=12288,
        first_k_dense=3, max_seq_len=131072, dtype="bfloat16",
        notes="zai-org/GLM-4.5 config.json (partial_rotary_factor 0.5); the next-token-prediction layer is not built",
        moe=dict(d_model=5120, d_expert=1536, num_experts=160, top_k=8, router="sigmoid_topk", norm_topk_prob=True,
                 routed_scaling_factor=2.5, num_shared_experts=1, d_shared=1536),
    ),
    "glm-4.5-air": dict(
        name="glm-4.5-air", vocab_size=151552, d_model=4096, n_layers=46, n_heads=96, n_kv_heads=8, head_dim=128,
        rotary_dim=64, attention_bias=True, rope_theta=1e6, norm_eps=1e-5, d_ff=10944, first_k_dense=1,
        max_seq_len=131072, dtype="bfloat16",
        notes="zai-org/GLM-4.5-Air config.json (partial_rotary_factor 0.5); the next-token-prediction layer "
              "is not built",
        moe=dict(d_model=4096, d_expert=1408, num_experts=128, top_k=8, router="sigmoid_topk", norm_topk_prob=True,
                 num_shared_experts=1, d_shared=1408),
    ),
    "minimax-m2": dict(
        name="minimax-m2", vocab_size=200064, d_model=3072, n_layers=62, n_heads=48, n_kv_heads=8, head_dim=128,
        rotary_dim=64, qk_norm="full", rope_theta=5e6, norm_eps=1e-6, d_ff=1536, max_seq_len=196608,
        dtype="bfloat16", notes="MiniMaxAI/MiniMax-M2 config.json",
        moe=dict(d_model=3072, d_expert=1536, num_experts=256, top_k=8, router="sigmoid_topk", norm_topk_prob=True),
    ),
    "glm-tiny": dict(  # trainable miniature of GLM-4.5: partial rotary, q/k/v bias, dense first layer, sigmoid router
        name="glm-tiny", vocab_size=512, d_model=64, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=16, rotary_dim=8,
        qk_norm="head", attention_bias=True, d_ff=128, first_k_dense=1, max_seq_len=256,
        moe=dict(d_model=64, d_expert=32, num_experts=8, top_k=2, router="sigmoid_topk", norm_topk_prob=True,
                 routed_scaling_factor=2.5, num_shared_experts=1, d_shared=32, bias_update_speed=0.001),
    ),
    "minimax-tiny": dict(  # trainable miniature of MiniMax-M2: full-width q/k norm, partial rotary, sigmoid router
        name="minimax-tiny", vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
        rotary_dim=8, qk_norm="full", d_ff=128, max_seq_len=256,
        moe=dict(d_model=64, d_expert=32, num_experts=8, top_k=2, router="sigmoid_topk", norm_topk_prob=True,
                 bias_update_speed=0.001),
    ),
    "kimi-k2": dict(
        name="kimi-k2", vocab_size=163840, d_model=7168, n_layers=61, n_heads=64, attention="mla", q_lora_rank=1536,
        kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, rope_interleave=True,
        rope_theta=50000.0, norm_eps=1e-6, d_ff=18432, first_k_dense=1, max_seq_len=131072, dtype="bfloat16",
        rope_scaling={"type": "yarn", "factor": 32.0, "original_max_position_embeddings": 4096, "beta_fast": 1.0,
                      "beta_slow": 1.0, "mscale_all_dim": 1.0, "attention_factor": 1.0},
        notes="moonshotai/Kimi-K2-Instruct config.json (DeepSeek-V3's layout, 384 experts, 64 heads)",
        moe=dict(d_model=7168, d_expert=2048, num_experts=384, top_k=8, router="sigmoid_topk", norm_topk_prob=True,
                 routed_scaling_factor=2.827, num_shared_experts=1, d_shared=2048),
    ),
})
