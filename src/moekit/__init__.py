"""moekit: train, analyze and serve fine-grained Mixture-of-Experts language models."""

from .checkpoint import save_model
from .config import ModelConfig, MoEConfig
from .loading import load_model
from .model import Transformer

__version__ = "0.1.0"
__all__ = ["ModelConfig", "MoEConfig", "Transformer", "load_model", "save_model", "__version__"]
