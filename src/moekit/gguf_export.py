"""`moekit export MODEL OUT.gguf --type f32|f16|q8_0|q4_0`: a GGUF file llama.cpp runs.

    from moekit.gguf_export import export_gguf
    export_gguf(model, "out.gguf", "q8_0")     # model from moekit.loading.load_model

The architecture (moekit.gguf.gguf_arch; each family's mapping is a module of moekit.gguf) follows
from the model; anything llama.cpp cannot compute exactly is refused by name.

Tensor types: norms, biases and routers are always f32 (as llama.cpp's converter); f16 casts every
matrix; q8_0 / q4_0 quantize every matrix whose input dim is a multiple of 32 with moekit's own
q8_0 / q4_0 (moekit.quantize.formats: bit-exact GGML block_q8_0 / block_q4_0), writing the packed
blocks as they are; other matrices fall back to f16. With q4_0 the output matrix is q8_0 (llama.cpp's
quantizer also keeps it at higher precision). The tokenizer (moekit's GPT-2-style byte-level BPE)
goes in as tokenizer.ggml.model "gpt2" with the "gpt-2" pre-tokenizer, bos = eos = end-of-text.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import torch

from . import cliargs
from .gguf import gguf_arch
from .gguf.common import TYPES, add_tensor, permute_rotary, require_gguf, tensor_type
from .gguf.tokenizer import add_tokenizer, checkpoint_chat_template
from .loading import load_model

MXFP4_EXPERTS = {"method": "mxfp4", "quantize_head": False, "experts_only": True}  # a packed gpt-oss checkpoint
__all__ = ["TYPES", "export_gguf", "gguf_arch", "permute_rotary", "cli"]


def export_gguf(model, out, file_type: str = "f16", chat_template: Optional[str] = None) -> str:
    """Write `model` (with `model.tokenizer`) as a GGUF file at `out`; returns the architecture name."""
    if file_type not in TYPES:
        raise ValueError(f"unknown --type {file_type!r}; choose one of {', '.join(TYPES)}")
    gguf = require_gguf()
    arch = gguf_arch(model)
    quantization = getattr(model, "quantization", None)
    if quantization and not (arch.name == "gpt-oss" and quantization == MXFP4_EXPERTS):
        raise ValueError("the checkpoint is already quantized (moekit quantize); export from the float checkpoint "
                         "(only gpt-oss's mxfp4 experts are written as they are)")
    out = Path(out)
    if out.is_dir():
        raise ValueError(f"output {str(out)!r} is a directory; give a file name such as model.gguf")
    tmp = out.with_name(f".{out.name}.tmp")
    writer = gguf.GGUFWriter(str(tmp), arch.name)
    try:
        writer.add_name(model.cfg.name)
        file_types = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "q8_0": "MOSTLY_Q8_0", "q4_0": "MOSTLY_Q4_0"}
        writer.add_file_type(gguf.LlamaFileType[file_types[file_type]])
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        arch.hparams(writer, gguf, model)
        add_tokenizer(writer, gguf, getattr(model, "tokenizer", None), model.cfg.vocab_size)
        if chat_template:
            writer.add_chat_template(chat_template)
        with torch.no_grad():
            for name, w, role in arch.tensors(model):
                add_tensor(writer, gguf, name, w, tensor_type(role, w, file_type))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        tmp.replace(out)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return arch.name


def cli(argv: List[str]) -> int:
    parser = cliargs.parser("moekit export", "Write a GGUF file llama.cpp runs (qwen3moe, olmoe, llama/Mixtral, "
                            "glm4moe, gpt-oss, deepseek2, qwen3next, qwen35moe, minimax-m2).")
    parser.add_argument("model", help="a moekit checkpoint, training run directory or HF checkpoint")
    parser.add_argument("out", help="the GGUF file to write")
    parser.add_argument("--type", default="f16", choices=TYPES, help="tensor type")
    args = parser.parse_args(argv)
    if args.type not in TYPES:
        raise ValueError(f"unknown --type {args.type!r}; choose one of {', '.join(TYPES)}")
    model = load_model(args.model, dtype=torch.float32)
    arch = export_gguf(model, args.out, args.type, checkpoint_chat_template(Path(args.model)))
    size = Path(args.out).stat().st_size
    print(f"wrote {args.out}: llama.cpp architecture {arch}, {args.type}, {size / 2**20:.1f} MiB")
    return 0
