"""The ``granite-mlx`` command.

    granite-mlx generate --model M --prompt TEXT   stream an answer to stdout, stats to stderr
    granite-mlx chat ...                            the chat app (granite_mlx.tui)
    granite-mlx convert ...                         checkpoint conversion (granite_mlx.convert)
    granite-mlx bench ...                           speed measurements (granite_mlx.bench)

Errors the user can fix print one line to stderr and exit 1; Ctrl+C exits 130.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from .errors import GraniteError

# Subcommands that live in other modules, imported only when used (they pull in
# Textual, conversion code...). Each module's main(argv) parses its own options.
_DELEGATED = {
    "chat": ("granite_mlx.tui.app", "the chat app"),
    "convert": ("granite_mlx.convert.cli", "convert a checkpoint"),
    "bench": ("granite_mlx.bench", "measure speed"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="granite-mlx", description="IBM Granite 4.0 language models on MLX."
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    gen = commands.add_parser("generate", help="generate an answer to one prompt")
    gen.add_argument("--model", required=True, help="checkpoint folder or Hugging Face repo id")
    gen.add_argument("--prompt", required=True, help="the prompt text, or - to read stdin")
    gen.add_argument("--system", help="system prompt (chat format only)")
    gen.add_argument(
        "--raw", action="store_true", help="use the prompt as plain text, without the chat template"
    )
    gen.add_argument(
        "--max-tokens", type=int, default=256, help="answer length limit (default 256)"
    )
    gen.add_argument("--temperature", "--temp", type=float, default=0.0, help="0 is greedy")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--min-p", type=float, default=0.0)
    gen.add_argument("--repetition-penalty", type=float, default=None)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeat for several)")
    gen.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None)
    gen.add_argument("--allow-long-prompt", action="store_true")
    for name, (_, help_text) in _DELEGATED.items():
        commands.add_parser(name, help=help_text, add_help=False)
    return parser


def _generate(args: argparse.Namespace) -> int:
    from .generate import load, stream_generate

    if args.system is not None and args.raw:
        raise GraniteError("--system needs the chat format; drop --raw.")
    text = sys.stdin.read() if args.prompt == "-" else args.prompt
    model, tokenizer = load(args.model, dtype=args.dtype)
    if args.raw:
        prompt = text
    else:
        prompt = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": text}
        ]
    last = None
    for response in stream_generate(
        model,
        tokenizer,
        prompt,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        stop=args.stop,
        allow_long_prompt=args.allow_long_prompt,
    ):
        out = response.text + "".join(call.raw for call in response.tool_calls)
        if out:
            sys.stdout.write(out)
            sys.stdout.flush()
        last = response
    sys.stdout.write("\n")
    sys.stdout.flush()
    if last is not None:
        print(
            f"prompt: {last.prompt_tokens} tokens, {last.prompt_tps:.1f} tok/s | "
            f"generation: {last.generation_tokens} tokens, {last.generation_tps:.1f} tok/s | "
            f"peak memory: {last.peak_memory:.3f} GB | finish: {last.finish_reason}",
            file=sys.stderr,
        )
    return 0


def _delegate(command: str, argv: list[str]) -> int:
    name = _DELEGATED[command][0]
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name is None or not name.startswith(exc.name):
            raise  # a dependency of that module is missing: show it as is
        raise GraniteError(
            f"'granite-mlx {command}' is not available: {name} is not installed."
        ) from exc
    result = module.main(argv)
    return result if isinstance(result, int) else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] in _DELEGATED:
            return _delegate(argv[0], argv[1:])
        args = build_parser().parse_args(argv)
        return _generate(args)
    except KeyboardInterrupt:
        sys.stderr.write("\n")
        return 130
    except (GraniteError, FileNotFoundError, PermissionError, IsADirectoryError) as exc:
        print(f"granite-mlx: error: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # `granite-mlx generate ... | head`: the reader left; not an error worth a traceback.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
