"""granite-mlx: IBM Granite 4.0 language models on Apple silicon, built on MLX."""

from .batch import batch_generate
from .config import ModelArgs
from .errors import CheckpointError, ConfigError, GraniteError, ModelNotFoundError
from .generate import GenerationResponse, generate, load, stream_generate
from .loading import load_model
from .model import Model
from .session import ChatSession

__all__ = [
    "ChatSession",
    "CheckpointError",
    "ConfigError",
    "GenerationResponse",
    "GraniteError",
    "Model",
    "ModelArgs",
    "ModelNotFoundError",
    "batch_generate",
    "generate",
    "load",
    "load_model",
    "stream_generate",
]
__version__ = "0.1.0"
