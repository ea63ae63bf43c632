"""`granite-mlx serve`: load a model and answer OpenAI and Ollama clients over HTTP.

    granite-mlx serve                                   # the default model, on 127.0.0.1:8080
    granite-mlx serve --model ./granite-4.0-h-1b --port 11434 --max-batch 16
    granite-mlx serve --host 0.0.0.0 --api-key "$KEY"   # reachable from the network

Errors the user can fix (no such model, the port taken) print one line and exit 1.
Ctrl+C or SIGTERM stops the server: running answers end with an error, then it exits.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import socket
import sys
from collections.abc import Sequence

import uvicorn

from granite_mlx.cli import ArgumentParser, finite_float, whole_number
from granite_mlx.errors import GraniteError

PROG = "granite-mlx serve"
DEFAULT_MODEL = "ibm-granite/granite-4.0-h-350m"  # the chat app's default
DEFAULT_PROMPT_CACHE_GB = 2.0


class ServeError(GraniteError):
    """The server cannot start as asked."""


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog=PROG,
        description="Serve a Granite 4.0 model to OpenAI and Ollama clients "
        "(continuous batching, prompt reuse across requests).",
    )
    p.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"checkpoint folder or Hugging Face repo id (default: {DEFAULT_MODEL})",
    )
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1: this machine only)",
    )
    p.add_argument("--port", type=whole_number, default=8080, help="port (default 8080)")
    p.add_argument(
        "--max-batch", type=whole_number, default=8, help="requests decoded together (default 8)"
    )
    p.add_argument(
        "--max-queue",
        type=whole_number,
        default=64,
        help="requests waiting beyond the batch before new ones get 503 (default 64)",
    )
    p.add_argument(
        "--prompt-cache-gb",
        type=finite_float,
        default=DEFAULT_PROMPT_CACHE_GB,
        help="memory for cached prompt prefixes, reused across requests "
        f"(default {DEFAULT_PROMPT_CACHE_GB:g}; 0 turns the cache off)",
    )
    p.add_argument(
        "--api-key", default=None, help="require 'Authorization: Bearer KEY' on every request"
    )
    p.add_argument(
        "--log-requests",
        action="store_true",
        help="log one line per request (tokens, cache hits, timings) to stderr",
    )
    p.add_argument(
        "--dtype",
        choices=["bfloat16", "float16", "float32"],
        default=None,
        help="cast the weights (default: the checkpoint's own)",
    )
    p.add_argument(
        "--parallel",
        choices=["pipeline", "tensor"],
        help="split the model across the ranks started by mlx.launch; rank 0 serves HTTP "
        "(README: Several Macs)",
    )
    p.add_argument(
        "--peer-timeout",
        type=finite_float,
        default=300.0,
        metavar="SECONDS",
        help="with --parallel: stop when the ranks lose step for this long (default 300)",
    )
    from granite_mlx.speculative import add_cli_options

    add_cli_options(p)
    return p


def _check(args: argparse.Namespace) -> None:
    if not 0 <= args.port <= 65535:
        raise ServeError(f"--port must be 0..65535, got {args.port}")
    if args.max_batch < 1:
        raise ServeError(f"--max-batch must be at least 1, got {args.max_batch}")
    if args.max_queue < 0:
        raise ServeError(f"--max-queue must be 0 or more, got {args.max_queue}")
    if args.prompt_cache_gb < 0:
        raise ServeError(f"--prompt-cache-gb must be 0 or more, got {args.prompt_cache_gb}")
    if args.api_key is not None and not args.api_key.strip():
        raise ServeError("--api-key is empty; give a key, or leave the flag out")
    if args.peer_timeout <= 0:
        raise ServeError(f"--peer-timeout must be above 0, got {args.peer_timeout}")
    if args.parallel is not None and (args.draft_model is not None or args.prompt_lookup):
        raise ServeError("--draft-model and --prompt-lookup do not work with --parallel yet")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, or a ServeError saying why not."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ServeError(f"cannot listen on {host!r}: {exc.strerror}; check --host") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        hint = "pick another with --port" if exc.errno in (48, 98) else "check --host and --port"
        raise ServeError(f"cannot listen on {host}:{port}: {exc.strerror}; {hint}") from None
    sock.listen(128)
    sock.setblocking(False)
    return sock


def banner(model_id: str, host: str, port: int, api_key: str | None) -> str:
    shown = f"[{host}]" if ":" in host else host
    if host in ("0.0.0.0", "::"):
        shown = "127.0.0.1"
    url = f"http://{shown}:{port}"
    key = '"<your --api-key>"' if api_key else '"none"'
    lines = [
        f"Serving {model_id} at {url}",
        f'  OpenAI: OpenAI(base_url="{url}/v1", api_key={key})  (or OPENAI_BASE_URL={url}/v1)',
        f"  Ollama: OLLAMA_HOST={url}",
        "Press Ctrl+C to stop.",
    ]
    if not _is_loopback(host):
        lines.insert(
            1,
            f"  Listening on {host}: reachable from other machines"
            + ("" if api_key else " by anyone (no --api-key)."),
        )
    return "\n".join(lines)


def serve(args: argparse.Namespace) -> int:
    import mlx.core as mx

    from granite_mlx.engine import EngineThread
    from granite_mlx.generate import load
    from granite_mlx.speculative import cli_drafting, drafter_factory

    from .app import Server, create_app
    from .service import Service, model_name

    parallel = _parallel(args)
    if parallel is not None and parallel.comm.rank != 0:
        return parallel.follow()
    sock = bind(args.host, args.port)  # before the (slow) load: a taken port fails fast
    try:
        drafting = cli_drafting(args, dtype=args.dtype)  # bad flags fail before the model loads
        print(f"Loading {args.model}...", file=sys.stderr, flush=True)
        model, tokenizer = load(args.model, dtype=args.dtype, parallel=args.parallel)
        drafting = drafter_factory(model, tokenizer, drafting)
        cache = _prompt_cache(args)
        engine = EngineThread(
            model,
            tokenizer,
            max_batch=args.max_batch,
            max_queue=args.max_queue,
            prompt_cache=cache,
            **(parallel.engine_thread_options(model) if parallel else {}),
        )
        try:
            model_id = model_name(args.model)
            service = Service(
                engine,
                model,
                tokenizer,
                model_id,
                prompt_cache=cache,
                aliases=(args.model,),
                drafting=drafting,
            )
            app = create_app(service, api_key=args.api_key, log_requests=args.log_requests)
            if args.log_requests:
                handler = logging.StreamHandler(sys.stderr)
                handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
                logging.getLogger("granite_mlx.serve").addHandler(handler)
                logging.getLogger("granite_mlx.serve").setLevel(logging.INFO)
            config = uvicorn.Config(
                app,
                lifespan="off",
                access_log=False,
                log_level="warning",
                timeout_graceful_shutdown=15,
            )
            port = sock.getsockname()[1]
            print(banner(model_id, args.host, port, args.api_key), flush=True)
            Server(config, service).run(sockets=[sock])
        finally:
            engine.shutdown()
    finally:
        sock.close()
    mx.clear_streams()  # this thread's (the load's), before the interpreter exits
    print("Stopped.", file=sys.stderr)
    return 0


def _prompt_cache(args: argparse.Namespace):
    from granite_mlx.prompt_cache import PromptCache

    if args.prompt_cache_gb <= 0:
        return None
    if args.parallel == "pipeline":
        # Stages hold unequal bytes, so their caches would evict differently.
        print("--parallel pipeline: the prompt cache is off (use --parallel tensor to keep "
              "it).", file=sys.stderr)  # fmt: skip
        return None
    return PromptCache(int(args.prompt_cache_gb * 1e9))


class _Ranks:
    """`--parallel` under mlx.launch: rank 0 serves HTTP over a `LockstepEngine`, and the
    other ranks replay its every step (`granite_mlx.parallel.follow`), printing nothing."""

    def __init__(self, args: argparse.Namespace):
        from granite_mlx.parallel import Comm, Watchdog, init_group

        self.args = args
        self.comm = Comm(init_group())
        self.watchdog = Watchdog(args.peer_timeout, self.comm.rank, what=PROG)

    def engine_thread_options(self, model) -> dict:
        from granite_mlx.parallel import LockstepEngine

        model.watchdog = self.watchdog
        self.watchdog.__enter__()
        # An idle server still steps every second, so the others know it is alive; a
        # failed step stops the server (the others could not follow a rebuilt engine).
        return {"engine_class": LockstepEngine, "heartbeat": 1.0, "recover": False}

    def follow(self) -> int:
        from granite_mlx.generate import load
        from granite_mlx.parallel import follow

        model, tokenizer = load(self.args.model, dtype=self.args.dtype, parallel=self.args.parallel)
        model.watchdog = self.watchdog
        with self.watchdog:
            follow(
                model, tokenizer, self.comm, max_batch=self.args.max_batch,
                prompt_cache=_prompt_cache(self.args),
            )  # fmt: skip
        return 0


def _parallel(args: argparse.Namespace) -> _Ranks | None:
    from granite_mlx.cli import _launched_by_mlx

    if args.parallel is None:
        if _launched_by_mlx():
            raise ServeError(
                "Started by mlx.launch: pass --parallel pipeline or --parallel tensor to split "
                "the model across the ranks (each rank would otherwise serve all of it)."
            )
        return None
    return _Ranks(args)


def main(argv: Sequence[str] | None = None) -> int:
    """Run `granite-mlx serve`; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
        _check(args)
        return serve(args)
    except KeyboardInterrupt:
        return 130
    except (GraniteError, OSError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    except RuntimeError as exc:
        from granite_mlx.parallel import is_peer_error

        if not is_peer_error(exc):
            raise
        print(f"{PROG}: error: lost the connection to another rank ({exc}): it stopped or "
              "the link failed.", file=sys.stderr)  # fmt: skip
        return 1
