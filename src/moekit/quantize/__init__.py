"""Weight-only quantization of a built moekit model (int8, int4-g32/64/128, q8_0, q4_0).

    from moekit.quantize import quantize_model, set_activations, size_report, METHODS
    quantize_model(model, "int8")                 # in place, returns the model
    set_activations(model, "q8_0")                # q8_0/q4_0 weights: 8-bit activations (llama.cpp's; opt-in)

formats.py holds the pack/unpack math (and a plain per-block reference), modules.py the
quantized weight (a stand-in for a float weight) and the quantized Linear, transform.py
`quantize_model`, `set_activations` and the size helpers, activations.py the math of 8-bit
activations, cli.py `moekit quantize`.
"""

from .formats import FORMATS, METHODS, Format, get_format
from .modules import QuantizedLinear, QuantizedWeight
from .transform import model_bytes, quantize_model, quantized_bytes, set_activations, size_report

__all__ = [
    "FORMATS", "METHODS", "Format", "get_format", "QuantizedLinear", "QuantizedWeight", "model_bytes", "quantize_model", "quantized_bytes", "set_activations", "size_report",
]
