"""granite-mlx: IBM Granite 4.0 language models on Apple silicon, built on MLX."""

from .config import ModelArgs
from .errors import CheckpointError, ConfigError, GraniteError, ModelNotFoundError
from .loading import load_model
from .model import Model

__all__ = [
    "CheckpointError",
    "ConfigError",
    "GraniteError",
    "Model",
    "ModelArgs",
    "ModelNotFoundError",
    "load_model",
]
__version__ = "0.1.0"
