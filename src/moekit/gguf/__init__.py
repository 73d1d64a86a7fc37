"""GGUF export, one module per llama.cpp architecture family (the file itself: moekit.gguf_export):

  standard.py   qwen3moe, olmoe, llama (Mixtral / dense), glm4moe (partial rotary included)
  deepseek2.py  deepseek2 (MLA with kv_b split into k_b / v_b, groups, shared experts, dense first, YaRN)
  gpt_oss.py    gpt-oss (sinks, sliding window, biases, clamped SwiGLU, YaRN, MXFP4 experts)
  qwen3next.py  qwen3next / qwen35moe (Gated DeltaNet hybrids: gated attention, zero-centred norms)
  minimax.py    minimax-m2 (full-width q/k norm, sigmoid router with a selection bias)
  common.py     state, tensor types and bytes (f32 / f16 / q8_0 / q4_0 / mxfp4), attention + RoPE metadata
  tokenizer.py  the byte-level BPE tokenizer and chat template

`gguf_arch(model)` picks the architecture from what the model has, or raises ValueError naming it.
An architecture object has `name`, `tensors(model)` -> (GGUF name, tensor, role) and
`hparams(writer, gguf, model)`.
"""

from __future__ import annotations

from .deepseek2 import DeepSeek2
from .gpt_oss import GptOss
from .minimax import MiniMaxM2
from .qwen3next import Qwen3Next
from .standard import standard_arch


def gguf_arch(model):
    """The llama.cpp architecture that runs `model` exactly; ValueError naming what it lacks."""
    cfg = model.cfg
    if cfg.attention == "mla":
        return DeepSeek2().check(model)
    if cfg.attention_sinks or (cfg.moe is not None and cfg.moe.activation == "swiglu_oai"):
        return GptOss().check(model)
    if "linear" in cfg.layer_types or cfg.attn_output_gate:
        return Qwen3Next(bool(cfg.linear_fused_proj)).check(model)
    if cfg.qk_norm == "full" and cfg.moe is not None and cfg.moe.router == "sigmoid_topk":
        return MiniMaxM2().check(model)
    unsupported = [name for name, on in (
        ("sliding-window layers (layer_types)", any(t != "full" for t in cfg.layer_types)),
        ("zero_centred_norm", cfg.zero_centred_norm)) if on]
    if unsupported:
        raise ValueError(f"{', '.join(unsupported)}: the GGUF export writes qwen3moe / glm4moe / olmoe / llama, "
                         "which have none of these (qwen3next / qwen35moe need attn_output_gate too)")
    return standard_arch(model)
