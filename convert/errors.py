"""Conversion errors a user can fix; each message names the problem and the fix."""

from granite_mlx.errors import GraniteError


class ConvertError(GraniteError):
    """A conversion could not start or finish (bad options, bad source or target)."""


class OutputExistsError(ConvertError):
    """The output folder is already there and --force was not given."""


class QualityError(ConvertError):
    """The converted model is further from its source than --max-kl allows."""


class UploadError(GraniteError):
    """The upload to the Hugging Face Hub failed (the converted folder stays on disk)."""
