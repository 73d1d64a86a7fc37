"""moekit: train, analyze and serve fine-grained Mixture-of-Experts language models."""

from .config import MoEConfig

__version__ = "0.1.0"
__all__ = ["MoEConfig", "__version__"]
