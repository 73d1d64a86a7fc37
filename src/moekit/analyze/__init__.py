"""The analyzer: where an MoE model's parameters, FLOPs and bytes go, and how fast hardware runs it.

    from moekit.analyze import analyze, resolve_model, local_hardware
    report = analyze(resolve_model("qwen3-30b-a3b"), hardware="h100", weights="bf16", batch=8)
    report["decode_tokens_per_s"], report["fits"], report["memory"]["inference"]["max_batch"]

Modules: docs/architecture.md#layout; formulas and conventions: docs/formulas.md. Importing the
analyzer imports no torch (moekit.config, moekit.hf and moekit.quantize are imported where needed).
"""

from .arch import Arch, from_hf_config, from_layer, from_model_config
from .catalog import parse_layer, resolve_model
from .hardware import CATALOG as HARDWARE, Hardware, get_hardware, local_hardware
from .report import analyze, analyze_model, render

__all__ = ["Arch", "from_hf_config", "from_layer", "from_model_config", "parse_layer", "resolve_model", "HARDWARE",
           "Hardware", "get_hardware", "local_hardware", "analyze", "analyze_model", "render"]
