"""granite-mlx: IBM Granite 4.0 language models on Apple silicon, built on MLX."""

from .batch import batch_generate
from .config import ModelArgs
from .constrain import ConstraintError, build_constraint
from .engine import Engine, EngineThread, GenerationResponse, Request
from .errors import (
    CheckpointError,
    ConfigError,
    GenerationError,
    GraniteError,
    ModelNotFoundError,
    PromptTooLongError,
)
from .generate import Completion, complete, generate, load, stream_generate
from .loading import fingerprint_weights, load_model
from .model import Model
from .prompt_cache import PromptCache
from .sampling import SamplingParams
from .session import ChatSession

__all__ = [
    "ChatSession",
    "CheckpointError",
    "Completion",
    "ConfigError",
    "ConstraintError",
    "Engine",
    "EngineThread",
    "GenerationError",
    "GenerationResponse",
    "GraniteError",
    "Model",
    "ModelArgs",
    "ModelNotFoundError",
    "PromptCache",
    "PromptTooLongError",
    "Request",
    "SamplingParams",
    "batch_generate",
    "build_constraint",
    "complete",
    "fingerprint_weights",
    "generate",
    "load",
    "load_model",
    "stream_generate",
]
__version__ = "0.1.0"
