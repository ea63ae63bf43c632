"""`granite-mlx convert SRC OUT [options]` and `granite-mlx upload OUT --repo NAME`.

    granite-mlx convert ibm-granite/granite-4.0-h-350m granite-h-350m-4bit   # 4-bit, Granite recipe
    granite-mlx convert ./granite-4.0-h-tiny h-tiny-8bit --q-bits 8 --max-kl 0.01 \\
        --upload-repo me/granite-4.0-h-tiny-8bit --dry-run
    granite-mlx convert SRC OUT --dtype bfloat16        # unquantized (or --no-quantize)
    granite-mlx upload h-tiny-8bit --repo me/granite-4.0-h-tiny-8bit [--dry-run]

Quantizing to 4 bits with the Granite recipe is the default; --q-bits,
--q-group-size and --recipe adjust it, --no-quantize (or --dtype alone) writes
unquantized weights. `--dry-run` with an OUT that already exists lists what
would be uploaded from it, without converting again.

Errors the user can fix print one line ("granite-mlx convert: error: ...") and
exit with status 1; no traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from granite_mlx.cli import ArgumentParser, finite_float
from granite_mlx.errors import GraniteError

from .errors import ConvertError
from .pipeline import DEFAULT_BITS, check_options, convert
from .recipe import BITS, GROUP_SIZES, RECIPES
from .upload import check_converted, upload
from .writer import MAX_SHARD_BYTES

PROG = "granite-mlx convert"
UPLOAD_PROG = "granite-mlx upload"


def _shard_gb(text: str) -> float:
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive finite number of GB, not {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
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
        help=f"bits of the bulk of the weights (default {DEFAULT_BITS})",
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
        help="dtype of the unquantized tensors (default: the source's); without --q-bits, "
        "--q-group-size or --recipe it means unquantized output in that dtype",
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
        type=_shard_gb,
        default=MAX_SHARD_BYTES / 1e9,
        help="size limit of one safetensors file in GB (default 5)",
    )
    c.add_argument(
        "--base-model",
        metavar="REPO",
        help="the original's Hub repo, for the model card (inferred for repo ids)",
    )
    c.add_argument(
        "--license",
        metavar="ID",
        help="the model card's license (default: the source card's, else apache-2.0, "
        "Granite 4.0's)",
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
        help="list what --upload-repo would upload, upload nothing (an existing OUT is "
        "listed as it is, without converting again)",
    )
    return p


def quantization_choice(args: argparse.Namespace) -> int | None:
    """The bits to quantize to, or None for unquantized output (see the module docstring)."""
    asked = [
        flag
        for flag, value in (("--q-bits", args.q_bits), ("--q-group-size", args.q_group_size),
                            ("--recipe", args.recipe))  # fmt: skip
        if value is not None
    ]
    if args.no_quantize and asked:
        raise ConvertError(
            f"--no-quantize and {' and '.join(asked)} contradict each other; pick one."
        )
    if args.no_quantize or (args.dtype is not None and not asked):
        return None
    return args.q_bits or DEFAULT_BITS


def main(argv: Sequence[str] | None = None) -> int:
    """Run the converter's command line; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)

    def run() -> None:
        args = build_parser().parse_args(argv)
        q_bits = quantization_choice(args)
        options = dict(
            q_bits=q_bits,
            q_group_size=args.q_group_size,
            recipe=args.recipe,
            dtype=args.dtype,
            max_kl=args.max_kl,
            upload_repo=args.upload_repo,
            dry_run=args.dry_run,
            check_quality=not args.skip_quality,
            max_shard_bytes=int(args.max_shard_gb * 1e9),
        )
        check_options(**options)
        out = Path(args.out).expanduser()
        if args.dry_run and not args.force and out.exists():
            # Only the upload is in question: list OUT as it is, convert nothing.
            check_converted(out)
            print(f"{out} exists: listing it as it is, nothing was converted (pass --force "
                  "to convert again).")  # fmt: skip
            upload(out, args.upload_repo, private=args.private, dry_run=True)
            return
        convert(
            args.src,
            out,
            **options,
            force=args.force,
            private=args.private,
            base_model=args.base_model,
            license=args.license,
            progress=not args.quiet,
        )

    return _run_cli(PROG, run)


def build_upload_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog=UPLOAD_PROG,
        description="Upload a folder written by `granite-mlx convert` to the Hugging Face Hub "
        "(token from `hf auth login` or HF_TOKEN).",
    )
    p.add_argument("out", metavar="OUT", help="the converted model's folder")
    p.add_argument("--repo", required=True, metavar="NAME", help="NAME or OWNER/NAME on the Hub")
    p.add_argument("--private", action="store_true", help="create the repo as private")
    p.add_argument("--dry-run", action="store_true", help="list what would be uploaded")
    return p


def upload_main(argv: Sequence[str] | None = None) -> int:
    """`granite-mlx upload OUT --repo NAME`: upload an already converted folder."""
    argv = list(sys.argv[1:] if argv is None else argv)

    def run() -> None:
        args = build_upload_parser().parse_args(argv)
        out = Path(args.out).expanduser()
        check_converted(out)
        upload(out, args.repo, private=args.private, dry_run=args.dry_run)

    return _run_cli(UPLOAD_PROG, run)


def _run_cli(prog: str, run: Callable[[], None]) -> int:
    """User errors as one line and exit status 1; Ctrl+C as 130."""
    try:
        run()
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted; nothing was written to the output folder.", file=sys.stderr)
        return 130
    except (GraniteError, OSError) as e:
        # OSError: a permission problem outside the staging folder (which is
        # already removed); failed writes inside it are GraniteErrors.
        message = " ".join(str(e).split()) if isinstance(e, GraniteError) else _os_error(e)
        print(f"{prog}: error: {message}", file=sys.stderr)
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
