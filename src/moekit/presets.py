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
