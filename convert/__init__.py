"""Checkpoint conversion for granite-mlx: `convert(src, out, ...)`,
`granite_mlx.convert.upload.upload(folder, repo_id, ...)` and the `granite-mlx
convert` / `granite-mlx upload` commands (`granite_mlx.convert.cli.main` /
`upload_main`)."""

from .errors import ConvertError, OutputExistsError, QualityError, UploadError, WriteError
from .pipeline import ConvertResult, convert

__all__ = [
    "ConvertError",
    "ConvertResult",
    "OutputExistsError",
    "QualityError",
    "UploadError",
    "WriteError",
    "convert",
]
