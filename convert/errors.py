"""Conversion errors a user can fix; each message names the problem and the fix."""

from granite_mlx.errors import GraniteError


class ConvertError(GraniteError):
    """A conversion could not start or finish (bad options, bad source or target)."""


class OutputExistsError(ConvertError):
    """The output folder is already there and --force was not given."""


class WriteError(ConvertError):
    """Writing the output failed: a full disk, a file-size limit, an I/O error."""

    def __init__(self, what: str, detail: str) -> None:
        super().__init__(
            f"Could not write {what} ({detail.strip()}). Check the free disk space and the "
            "file-size limit (`ulimit -f`) where the output goes; nothing was left in the "
            "output folder."
        )


class QualityError(ConvertError):
    """The converted model is further from its source than --max-kl allows."""


class UploadError(GraniteError):
    """The upload to the Hugging Face Hub failed (the converted folder stays on disk)."""
