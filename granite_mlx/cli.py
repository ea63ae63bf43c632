"""The ``granite-mlx`` command.

    granite-mlx generate --model M --prompt TEXT   stream an answer to stdout, stats to stderr
    granite-mlx chat ...                            the chat app (granite_mlx.tui)
    granite-mlx convert ...                         checkpoint conversion (granite_mlx.convert)
    granite-mlx upload OUT --repo NAME              upload a converted folder to the Hub
    granite-mlx bench ...                           speed measurements (granite_mlx.bench)
    granite-mlx models | pull REPO | rm REPO        the Hugging Face cache (granite_mlx.hub_cache)
    granite-mlx serve ...                           OpenAI/Ollama-compatible server (granite_mlx.serve)

Errors the user can fix print one line to stderr and exit 1 (bad options
included: they are checked before the model loads); Ctrl+C exits 130.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import math
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from .errors import GraniteError
from .surrogates import describe_surrogate, surrogate_at

# Subcommands that live in other modules, imported only when used (they pull in
# Textual, conversion code...). Each entry point (argv) -> status parses its own options.
_DELEGATED = {
    "chat": ("granite_mlx.tui.app", "main", "the chat app"),
    "convert": ("granite_mlx.convert.cli", "main", "convert a checkpoint"),
    "upload": ("granite_mlx.convert.cli", "upload_main", "upload a converted folder to the Hub"),
    "bench": ("granite_mlx.bench", "main", "measure speed"),
    "models": ("granite_mlx.hub_cache", "models_main", "list the Granite models in the HF cache"),
    "pull": ("granite_mlx.hub_cache", "pull_main", "download a model into the HF cache"),
    "rm": ("granite_mlx.hub_cache", "rm_main", "remove a model from the HF cache"),
    "serve": ("granite_mlx.serve.cli", "main", "serve OpenAI and Ollama clients over HTTP"),
}


MAX_SEED = 2**63 - 1  # what the engine takes (granite_mlx.sampling.SamplingParams.check)


class ArgumentParser(argparse.ArgumentParser):
    """argparse that raises a GraniteError instead of printing usage and exiting
    with status 2, so a bad option is one line and exit status 1 like every other
    user error. (--help still prints and exits 0.)"""

    def error(self, message: str) -> NoReturn:
        raise GraniteError(f"{message} (see `{self.prog} --help`)")


def finite_float(text: str) -> float:
    """An argparse type: a finite number (argparse's float takes "nan" and "inf")."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, not {text!r}")
    return value


def whole_number(text: str) -> int:
    """An argparse type: an integer written as one (not 1e3, not 2.0)."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None


def seed(text: str) -> int:
    value = whole_number(text)
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be from 0 to {MAX_SEED}, not {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
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
        "--max-tokens", type=whole_number, default=256, help="answer length limit (default 256)"
    )
    gen.add_argument(
        "--temperature", "--temp", type=finite_float, default=0.0, help="0 is greedy"
    )
    gen.add_argument("--top-p", type=finite_float, default=1.0)
    gen.add_argument("--top-k", type=whole_number, default=0)
    gen.add_argument("--min-p", type=finite_float, default=0.0)
    gen.add_argument("--repetition-penalty", type=finite_float, default=None)
    gen.add_argument("--seed", type=seed, default=None, help=f"0 to {MAX_SEED}")
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeat for several)")
    gen.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None)
    gen.add_argument("--allow-long-prompt", action="store_true")
    gen.add_argument(
        "--parallel",
        choices=["pipeline", "tensor"],
        help="split the model across the ranks started by mlx.launch (README: Several Macs)",
    )
    gen.add_argument(
        "--peer-timeout",
        type=finite_float,
        default=300.0,
        metavar="SECONDS",
        help="with --parallel: stop when no step completes for this long (default 300)",
    )
    from .speculative import add_cli_options

    add_cli_options(gen)
    for name, (_, _, help_text) in _DELEGATED.items():
        commands.add_parser(name, help=help_text, add_help=False)
    return parser


def check_sampling(args: argparse.Namespace) -> None:
    """Ranges of the sampling options, each error naming its option."""
    ranges = [
        ("--max-tokens", args.max_tokens, args.max_tokens >= 1, "at least 1"),
        ("--temperature", args.temperature, args.temperature >= 0, "0 (greedy) or more"),
        ("--top-p", args.top_p, 0 < args.top_p <= 1, "above 0 and at most 1"),
        ("--top-k", args.top_k, args.top_k >= 0, "0 (off) or more"),
        ("--min-p", args.min_p, 0 <= args.min_p < 1, "from 0 up to (not including) 1"),
    ]
    if args.repetition_penalty is not None:
        penalty = args.repetition_penalty
        ranges.append(("--repetition-penalty", penalty, penalty > 0, "above 0 (1 is off)"))
    ranges.append(("--peer-timeout", args.peer_timeout, args.peer_timeout > 0, "above 0"))
    for option, value, ok, expected in ranges:
        if not ok:
            raise GraniteError(f"{option} must be {expected}, not {value}.")


def check_text(text: str, what: str) -> str:
    """Refuse text from the command line that is not valid UTF-8: Python hands
    argv's invalid bytes over as lone surrogates, which nothing downstream encodes."""
    if (i := surrogate_at(text)) is not None:
        raise GraniteError(
            f"{what} is not valid UTF-8 text ({describe_surrogate(text, i)}, from an invalid "
            "byte); pass UTF-8 text."
        )
    return text


def read_stdin() -> str:
    """All of stdin as UTF-8 text, refused with the byte position when it is not."""
    buffer = getattr(sys.stdin, "buffer", None)
    if buffer is None:  # a text stream stood in for stdin
        return check_text(sys.stdin.read(), "The prompt on stdin")
    data = buffer.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise GraniteError(
            f"The prompt on stdin is not valid UTF-8 (byte 0x{data[e.start]:02x} at offset "
            f"{e.start}); convert it first, e.g. with `iconv -t UTF-8`."
        ) from None


def _check_against_config(args: argparse.Namespace) -> str:
    """The options against the checkpoint's config alone (before the weights load):
    --top-k within its vocabulary, then the engine's own check of every sampling
    option. Returns the resolved model folder."""
    from .config import ModelArgs
    from .loading import load_config, resolve_model_path
    from .sampling import SamplingParams

    folder = resolve_model_path(args.model)
    vocab = ModelArgs.from_dict(load_config(folder)).vocab_size
    if args.top_k > vocab:
        raise GraniteError(
            f"--top-k {args.top_k} is larger than the model's vocabulary ({vocab} tokens); use "
            f"at most {vocab}, or 0 for no top-k filter."
        )
    SamplingParams(
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
        repetition_penalty=args.repetition_penalty, seed=args.seed,
    ).check(vocab)  # fmt: skip
    return str(folder)


class _Rank:
    """This process's place in a run of several (`--parallel` under mlx.launch): only
    rank 0 writes output, and the others report only errors of their own."""

    number = 0
    comm = None
    options_checked = False  # before that, an error is the same on every rank (same argv)

    @classmethod
    def wait_for_all(cls) -> None:
        """Before leaving on an error every rank met: let rank 0 report it first (mlx.launch
        stops every rank as soon as one exits with an error)."""
        from .parallel import barrier

        if cls.comm is not None:
            barrier(cls.comm)


def _launched_by_mlx() -> bool:
    launcher = ("MLX_HOSTFILE", "MLX_IBV_DEVICES")  # what mlx.launch sets for ring and jaccl
    return "MLX_RANK" in os.environ and any(name in os.environ for name in launcher)


def _generate(args: argparse.Namespace) -> int:
    from .parallel import LaunchError

    _Rank.comm, _Rank.options_checked = None, False
    if _launched_by_mlx():
        _Rank.number = int(os.environ["MLX_RANK"])
    if args.system is not None and args.raw:
        raise GraniteError("--system needs the chat format; drop --raw.")
    check_sampling(args)
    for stop in args.stop:
        check_text(stop, f"--stop {stop!r}")
    if args.system is not None:
        check_text(args.system, "--system")
    if args.parallel is None:
        if _launched_by_mlx():
            raise LaunchError(
                "Started by mlx.launch: pass --parallel pipeline or --parallel tensor to split "
                "the model across the ranks (each rank would otherwise run all of it)."
            )
        text = read_stdin() if args.prompt == "-" else check_text(args.prompt, "--prompt")
        _Rank.options_checked = True
        return _generate_here(args, text)
    if args.prompt == "-" and _launched_by_mlx():
        raise LaunchError(
            "mlx.launch passes stdin on without ever closing it, so --prompt - would wait "
            'forever: pass the prompt as --prompt "$(cat FILE)".'
        )
    from .parallel import Comm, ParallelError, Watchdog, broadcast_object, init_group, is_peer_error

    check_text(args.prompt, "--prompt")
    _Rank.options_checked = True
    comm = _Rank.comm = Comm(init_group())
    _Rank.number = comm.rank
    try:
        # Rank 0 does all the I/O: it reads the prompt and shares it.
        text = (read_stdin() if args.prompt == "-" else args.prompt) if comm.rank == 0 else None
        text = broadcast_object(text, comm)
        return _generate_here(args, text, Watchdog(args.peer_timeout, comm.rank))
    except RuntimeError as exc:
        if is_peer_error(exc):
            raise ParallelError(
                f"rank {comm.rank} lost the connection to another rank ({exc}): it stopped or "
                "the link failed."
            ) from None
        raise


def _generate_here(args: argparse.Namespace, text: str, watchdog=None) -> int:
    """Generate on this process; with --parallel every rank runs this in lockstep, the
    `watchdog` (granite_mlx.parallel.Watchdog) armed once the model is loaded."""
    from .generate import load, stream_generate
    from .speculative import cli_drafting

    if args.parallel is not None and (args.draft_model is not None or args.prompt_lookup):
        raise GraniteError(
            "--draft-model and --prompt-lookup do not work with --parallel yet; drop one."
        )
    model_path = _check_against_config(args)
    drafting = cli_drafting(args, dtype=args.dtype)  # bad flags fail before the model loads
    model, tokenizer = load(model_path, dtype=args.dtype, parallel=args.parallel)
    if args.raw:
        prompt = text
    else:
        prompt = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": text}
        ]
    leader = _Rank.number == 0
    out = sys.stdout if leader else open(os.devnull, "w")  # noqa: SIM115 (closed at exit)
    if watchdog is not None:
        model.watchdog = watchdog  # each model call proves the ranks are still in step
    last = None
    with watchdog if watchdog is not None else contextlib.nullcontext():
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
            **drafting,
        ):
            shown = response.text + "".join(call.raw for call in response.tool_calls)
            if shown:
                out.write(shown)
                out.flush()
            last = response
    out.write("\n")
    out.flush()
    if last is not None and leader:
        drafted = ""
        if drafting:
            rate = last.accepted_tokens / max(last.drafted_tokens, 1)
            drafted = (
                f" | drafted: {last.drafted_tokens}, accepted: {last.accepted_tokens} "
                f"({rate:.0%})"
            )
        print(
            f"prompt: {last.prompt_tokens} tokens, {last.prompt_tps:.1f} tok/s | "
            f"generation: {last.generation_tokens} tokens, {last.generation_tps:.1f} tok/s | "
            f"peak memory: {last.peak_memory:.3f} GB | finish: {last.finish_reason}{drafted}",
            file=sys.stderr,
        )
    return 0


def _delegate(command: str, argv: list[str]) -> int:
    name, entry, _ = _DELEGATED[command]
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name is None or not name.startswith(exc.name):
            raise  # a dependency of that module is missing: show it as is
        raise GraniteError(
            f"'granite-mlx {command}' is not available: {name} is not installed."
        ) from exc
    result = getattr(module, entry)(argv)
    return result if isinstance(result, int) else 0


def _same_on_every_rank(exc: BaseException) -> bool:
    """Errors every rank meets alike (same options, same model): rank 0 reports them."""
    from .errors import GenerationError
    from .parallel import LaunchError, SplitError

    return not _Rank.options_checked or isinstance(exc, (GenerationError, SplitError, LaunchError))


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
        alike = _same_on_every_rank(exc)
        if _Rank.number == 0:
            print(f"granite-mlx: error: {exc}", file=sys.stderr, flush=True)
        elif not alike:
            print(f"granite-mlx: error: rank {_Rank.number}: {exc}", file=sys.stderr)
        if alike:
            _Rank.wait_for_all()
        return 1
    except BrokenPipeError:
        # `granite-mlx generate ... | head`: the reader left; not an error worth a traceback.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
