"""`granite-mlx convert SRC OUT [options]`: the converter's command line.

    granite-mlx convert ibm-granite/granite-4.0-h-350m granite-h-350m-4bit --q-bits 4
    granite-mlx convert ./granite-4.0-h-tiny h-tiny-8bit --q-bits 8 --max-kl 0.01 \\
        --upload-repo me/granite-4.0-h-tiny-8bit --dry-run

Errors the user can fix print one line ("granite-mlx convert: error: ...") and
exit with status 1; no traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from granite_mlx.errors import GraniteError

from .errors import ConvertError
from .pipeline import convert
from .recipe import BITS, GROUP_SIZES, RECIPES
from .writer import MAX_SHARD_BYTES

PROG = "granite-mlx convert"


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of exiting with status 2, so bad flags exit 1
    with one line like every other user error."""

    def error(self, message: str):
        raise ConvertError(f"{message} (see `{PROG} --help`)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=PROG,
        description="Convert a Granite 4.0 checkpoint for MLX: quantize, "
        "check its quality against the source, write it, optionally upload it.",
    )
    p.add_argument(
        "src", metavar="SRC", help="source checkpoint: a folder or a Hugging Face repo id"
    )
    p.add_argument("out", metavar="OUT", help="output folder (must not exist, unless --force)")
    q = p.add_argument_group("quantization")
    q.add_argument(
        "--q-bits",
        type=int,
        choices=BITS,
        help="quantize to 4 or 8 bits (absent: unquantized output)",
    )
    q.add_argument(
        "--q-group-size",
        type=int,
        choices=GROUP_SIZES,
        help="weights per quantization group (default 64)",
    )
    q.add_argument(
        "--recipe",
        choices=list(RECIPES),
        help="which tensors get which precision: "
        "granite (default; measured, see RECIPE.md), uniform, or mixed",
    )
    q.add_argument("--no-quantize", action="store_true", help="write unquantized weights")
    q.add_argument(
        "--dtype",
        choices=["bfloat16", "float16", "float32"],
        help="dtype of the unquantized tensors (default: the source's)",
    )
    c = p.add_argument_group("checks and output")
    c.add_argument(
        "--max-kl",
        type=float,
        metavar="X",
        help="fail (writing nothing) when the mean "
        "per-token KL divergence against the source is above X",
    )
    c.add_argument(
        "--skip-quality", action="store_true", help="skip the quality comparison (not recommended)"
    )
    c.add_argument(
        "--force",
        action="store_true",
        help="replace an existing OUT (once the new conversion is complete)",
    )
    c.add_argument(
        "--max-shard-gb",
        type=float,
        default=MAX_SHARD_BYTES / 1e9,
        help="size limit of one safetensors file in GB (default 5)",
    )
    c.add_argument(
        "--base-model",
        metavar="REPO",
        help="the original's Hub repo, for the model card (inferred for repo ids)",
    )
    c.add_argument("--quiet", action="store_true", help="no progress bars")
    u = p.add_argument_group("upload")
    u.add_argument(
        "--upload-repo",
        metavar="NAME",
        help="upload OUT to this Hugging Face repo (token from `hf auth login` or HF_TOKEN)",
    )
    u.add_argument("--private", action="store_true", help="create the repo as private")
    u.add_argument(
        "--dry-run",
        action="store_true",
        help="list what --upload-repo would upload, upload nothing",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the converter's command line; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
        if args.no_quantize and args.q_bits is not None:
            raise ConvertError("--no-quantize and --q-bits contradict each other; pick one.")
        convert(
            args.src,
            args.out,
            q_bits=args.q_bits,
            q_group_size=args.q_group_size,
            recipe=args.recipe,
            dtype=args.dtype,
            max_kl=args.max_kl,
            force=args.force,
            upload_repo=args.upload_repo,
            private=args.private,
            dry_run=args.dry_run,
            base_model=args.base_model,
            max_shard_bytes=int(args.max_shard_gb * 1e9),
            check_quality=not args.skip_quality,
            progress=not args.quiet,
        )
    except KeyboardInterrupt:
        print(f"\n{PROG}: interrupted; nothing was written to the output folder.", file=sys.stderr)
        return 130
    except (GraniteError, OSError) as e:
        # OSError: a full disk or a permission problem while writing; the staging
        # folder is already removed.
        message = " ".join(str(e).split()) if isinstance(e, GraniteError) else _os_error(e)
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 1
    return 0


def _os_error(e: OSError) -> str:
    where = f" ({e.filename})" if getattr(e, "filename", None) else ""
    return (
        f"{e.strerror or e}{where}. Check free disk space and write permission for the "
        "output folder; nothing was left there."
    )


if __name__ == "__main__":
    sys.exit(main())
