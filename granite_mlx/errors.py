"""Errors a user can cause and fix. Each message names the problem and the fix."""


class GraniteError(Exception):
    """Base class: an error the user can act on (shown without a traceback by the CLI)."""


class ConfigError(GraniteError, ValueError):
    """config.json describes no Granite 4.0 model we can build."""


class CheckpointError(GraniteError):
    """The weights on disk do not fit the config, or a file is damaged."""


class ModelNotFoundError(GraniteError, FileNotFoundError):
    """No local folder of that name and the Hub could not provide it."""


class GenerationError(GraniteError, ValueError):
    """A prompt or an option that generation cannot use."""


class PromptTooLongError(GenerationError):
    """The prompt has more tokens than the model's trained context."""
