"""Published configurations (docs/formulas.md) and resolving a MODEL argument (a preset or known name,
an HF config.json or a directory holding one, a moekit checkpoint or run directory) to an `Arch`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Tuple

from .arch import Arch, from_hf_config, from_layer, from_model_config

# (d, n, K, E) of the fine-grained MoE table in docs/formulas.md; `--layer NAME` takes these names.
LAYERS: Dict[str, Tuple[int, int, int, int]] = {
    "mixtral-8x22b": (6144, 16384, 2, 8),
    "deepseek-v2": (5120, 1536, 6, 160),
    "deepseek-v3.2": (7168, 2048, 8, 256),
    "kimi-k2.5": (7168, 2048, 8, 384),
    "qwen3-next-80b-a3b": (2048, 512, 10, 512),
    "qwen3.5-397b-a17b": (4096, 1024, 10, 512),
    "qwen3.6-35b-a3b": (2048, 512, 8, 256),
    "arcee-trinity-large": (3072, 3072, 4, 256),
    "glm-5.1": (6144, 2048, 8, 256),
    "minimax-m2.5": (3072, 1536, 8, 256),
    "ling-2.5-1t": (8192, 2048, 8, 256),
    "deepseek-v4-flash": (4096, 2048, 6, 256),
    "deepseek-v4-pro": (7168, 3072, 6, 384),
}

# SonicMoE's published H100 figures: (T, d, n, E, K) -> (fwd TFLOPS, bwd TFLOPS, peak activation GiB), ScatterMoE the same.
SONICMOE_H100 = {
    (24576, 1536, 256, 128, 8): {"sonicmoe": (364, 405, 0.61), "scattermoe": (206, 210, 1.19)},
    (24576, 1536, 1024, 32, 2): {"sonicmoe": (465, 467, 0.60), "scattermoe": (264, 281, 0.77)},
    (32768, 4096, 1024, 64, 4): {"sonicmoe": (553, 555, 2.46), "scattermoe": (368, 340, 3.46)},
}

# Real configurations the analyzer knows by name beyond moekit's presets (published values).
HF_CONFIGS: Dict[str, dict] = {
    "deepseek-v3": {
        "model_type": "deepseek_v3", "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432,
        "moe_intermediate_size": 2048, "num_hidden_layers": 61, "num_attention_heads": 128, "num_key_value_heads": 128,
        "n_shared_experts": 1, "n_routed_experts": 256, "num_experts_per_tok": 8, "first_k_dense_replace": 3,
        "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
        "n_group": 8, "topk_group": 4, "routed_scaling_factor": 2.5, "max_position_embeddings": 163840,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    },
    "llama-2-7b": {
        "model_type": "llama", "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32, "max_position_embeddings": 4096,
        "tie_word_embeddings": False, "torch_dtype": "float16",
    },
    "gpt3-175b": {
        "model_type": "gpt2", "vocab_size": 50257, "n_embd": 12288, "n_layer": 96, "n_head": 96, "n_positions": 2048,
        "torch_dtype": "float16",
    },
}


def parse_layer(spec: str) -> Arch:
    """`--layer d,n,E,K` or one of the LAYERS names."""
    if spec in LAYERS:
        d, n, K, E = LAYERS[spec]
        return from_layer(d, n, E, K, name=spec)
    try:
        d, n, E, K = (int(p) for p in spec.split(","))
    except ValueError:
        raise ValueError(f"--layer takes d,n,E,K (four integers) or a published name ({', '.join(LAYERS)}); got {spec!r}") from None
    return from_layer(d, n, E, K)


def resolve_model(model: str) -> Arch:
    """An `Arch` for a preset/known name, an HF config.json (file or dir), or a moekit checkpoint/run dir.
    A LAYERS name is refused with a pointer to --layer: it has no attention, embeddings or head."""
    from ..presets import MODEL_PRESETS

    if model in HF_CONFIGS:
        return from_hf_config(HF_CONFIGS[model], name=model)
    if model in MODEL_PRESETS:
        from ..config import ModelConfig

        return from_model_config(ModelConfig.preset(model))
    path = Path(model)
    if path.is_file():
        return _from_json_file(path)
    if path.is_dir():
        from ..checkpoint import CONFIG_FILE, read_config

        if (path / CONFIG_FILE).is_file():
            return from_model_config(read_config(path))
        if (path / "checkpoint" / CONFIG_FILE).is_file():
            return from_model_config(read_config(path / "checkpoint"))
        if (path / "config.json").is_file():
            return _from_json_file(path / "config.json")
        raise ValueError(f"directory {model!r} holds no config.json, {CONFIG_FILE} or checkpoint/")
    if model in LAYERS:
        raise ValueError(f"{model!r} is a published MoE layer (d, n, K, E), not a model: use --layer {model}")
    raise ValueError(f"unknown model {model!r}: not a file or directory, and not a known name; "
                     f"known names: {', '.join(sorted(set(MODEL_PRESETS) | set(HF_CONFIGS)))}")


def _from_json_file(path: Path) -> Arch:
    try:
        hf = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(hf, dict):
        raise ValueError(f"{path} must hold a JSON object (an HF config.json)")
    if "model_type" not in hf:
        raise ValueError(f"{path} has no model_type; is it an HF config.json?")
    return from_hf_config(hf, name=hf.get("_name_or_path") or path.parent.name or path.stem)
