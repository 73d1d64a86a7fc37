"""moekit: train, analyze and serve fine-grained Mixture-of-Experts language models."""

from .config import ModelConfig, MoEConfig
from .model import Transformer

__version__ = "0.1.0"
__all__ = ["ModelConfig", "MoEConfig", "Transformer", "__version__"]
