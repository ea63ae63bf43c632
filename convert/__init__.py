"""Checkpoint conversion for granite-mlx: `convert(src, out, ...)` and the
`granite-mlx convert` command (`granite_mlx.convert.cli.main`)."""

from .errors import ConvertError, OutputExistsError, QualityError, UploadError
from .pipeline import ConvertResult, convert

__all__ = [
    "ConvertError",
    "ConvertResult",
    "OutputExistsError",
    "QualityError",
    "UploadError",
    "convert",
]
