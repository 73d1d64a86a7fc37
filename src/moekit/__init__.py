"""moekit: train, analyze and serve fine-grained Mixture-of-Experts language models.

The top-level names load on first use, so `moekit --help`, `moekit.cli` and `moekit.analyze` do not
import torch until a command needs it."""

from importlib import import_module

__version__ = "0.1.0"
EXPORTS = {"ModelConfig": ".config", "MoEConfig": ".config", "Transformer": ".model", "load_model": ".loading",
           "save_model": ".checkpoint"}
__all__ = [*EXPORTS, "__version__"]


def __getattr__(name):
    if name in EXPORTS:
        return getattr(import_module(EXPORTS[name], __name__), name)
    raise AttributeError(f"module 'moekit' has no attribute {name!r}")
