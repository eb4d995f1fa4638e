"""The command line (``mlx_dgemma.server``) and a server running on a background thread (tests, scripts)."""

from __future__ import annotations

import argparse
import errno
import gc
import ipaddress
import json
import socket
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any, NoReturn

from mlx_dgemma.cli.shared import add_model_arguments
from mlx_dgemma.errors import DGemmaError
from mlx_dgemma.runtime.distributed import is_leader
from mlx_dgemma.server.app import MAX_BODY_BYTES, check_batching, check_defaults, check_limits, create_app
from mlx_dgemma.server.fetch import FETCH_TIMEOUT
from mlx_dgemma.server.images import ImagePolicy
from mlx_dgemma.server.net import Server, make_config
from mlx_dgemma.server.protocol import DEFAULT_MAX_TOKENS

DESCRIPTION = """OpenAI-compatible server for DiffusionGemma (chat and text completions, streaming).
Without --model, serves the small demo model embedded in the package."""

# mlx_lm.server flags that have no meaning for a diffusion model: one line saying what to use instead.
AUTOREGRESSIVE_FLAGS = {
    "--top-p": "the entropy-bound sampler has no nucleus: send entropy_bound (or temperature) in requests",
    "--top-k": "the entropy-bound sampler has no top-k: send entropy_bound (or temperature) in requests",
    "--min-p": "the entropy-bound sampler has no min-p: send entropy_bound (or temperature) in requests",
    "--kv-bits": "the KV cache is not quantized: serve a quantized model (mlx_dgemma.convert --quantize)",
    "--draft-model": "use --drafter PATH (a canvas drafter; token-level draft models do not apply)",
    "--num-draft-tokens": "use --drafter PATH (a canvas drafter drafts whole canvases)",
}


class _Refuse(argparse.Action):
    """An autoregressive-only flag: a one-line error naming what to use instead."""

    def __call__(
        self, parser: argparse.ArgumentParser, ns: Any, values: Any, option: str | None = None
    ) -> None:
        parser.error(f"{option} does not apply to a diffusion model: {AUTOREGRESSIVE_FLAGS[str(option)]}")


class _Note(argparse.Action):
    """A flag accepted for compatibility with mlx-lm and ignored, with a note."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any):
        super().__init__(option_strings, dest, nargs=0, **kwargs)

    def __call__(
        self, parser: argparse.ArgumentParser, ns: Any, values: Any, option: str | None = None
    ) -> None:
        print(
            f"mlx_dgemma.server: note: {option} is ignored (the model code is part of mlx_dgemma)",
            file=sys.stderr,
        )


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error as one line (the usage itself is under --help)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _port(text: str) -> int:
    port = int(text)
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a TCP port: use 1-65535 (or 0 for a free one)")
    return port


def _comma_list(text: str) -> list[str]:
    """A comma-separated flag value (origins, host names, networks), blanks dropped."""
    return [o.strip() for o in text.split(",") if o.strip()]


def _json_object(text: str) -> dict[str, Any]:
    example = "give an object such as '{\"enable_thinking\": true}'"
    try:
        value = json.loads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not JSON ({e}): {example}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"not a JSON object (got {type(value).__name__}): {example}")
    return value


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host.lower() == "localhost"


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="mlx_dgemma.server", description=DESCRIPTION, allow_abbrev=False)
    add_model_arguments(p)
    p.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)"
    )
    p.add_argument("--port", type=_port, default=8080, help="port (default 8080; 0 picks a free one)")
    p.add_argument(
        "--context-length",
        type=int,
        help="largest prompt + answer accepted (default: the model's native window)",
    )
    p.add_argument(
        "--max-concurrency",
        type=int,
        default=16,
        help="requests queued or running at once; more get HTTP 429 (default 16)",
    )
    p.add_argument(
        "--decode-concurrency",
        type=int,
        default=8,
        help="requests decoded together, one decoder pass for all of them (default 8; mlx-lm's name)",
    )
    p.add_argument(
        "--prompt-concurrency",
        type=int,
        default=4,
        help="requests that may join the batch at one step, each encoding its prompt (default 4)",
    )
    p.add_argument(
        "--no-prompt-cache", action="store_true", help="do not reuse the previous request's encoder cache"
    )
    p.add_argument(
        "--temp",
        "--temperature",
        dest="temperature",
        type=float,
        help="default temperature for requests that set neither temperature nor t_max/t_min "
        "(mapped onto the temperature schedule as a request's temperature is)",
    )
    p.add_argument(
        "--fast",
        action="store_true",
        help='fast decoding by default (a request\'s "fast": false opts out; see mlx_dgemma.decoding.fast)',
    )
    p.add_argument(
        "--request-timeout",
        type=float,
        default=600.0,
        help="seconds one request may generate; then its answer is cut (finish_reason length, "
        "error code request_timeout). 0: no limit (default 600)",
    )
    p.add_argument(
        "--max-body-bytes",
        type=int,
        default=MAX_BODY_BYTES,
        help=f"largest request body; larger ones get HTTP 413 (default {MAX_BODY_BYTES}, 8 MiB)",
    )
    p.add_argument(
        "--max-connections",
        type=int,
        default=512,
        help="open connections at once; more are answered 503 and closed (default 512)",
    )
    p.add_argument(
        "--header-timeout",
        type=float,
        default=10.0,
        help="seconds a connection has to send a request's headers (default 10)",
    )
    p.add_argument(
        "--max-tokens",
        type=int,
        metavar="N",
        help="answer limit of requests that send neither max_tokens nor max_completion_tokens (a "
        "request's own value wins, up to the context); 0: no default, the answer may use the "
        f"whole remaining context (default {DEFAULT_MAX_TOKENS} rounded up to whole canvases: the "
        "last canvas is denoised whole anyway)",
    )
    p.add_argument(
        "--chat-template-args",
        type=_json_object,
        metavar="JSON",
        help="default chat_template_kwargs, a JSON object (e.g. '{\"enable_thinking\": true}'), under "
        "each request's own (a request's key wins); keys the renderer sets itself are refused",
    )
    p.add_argument(
        "--strict",
        action="store_true",
        help="answer with HTTP 400 the fields otherwise ignored and named in the X-Ignored-Fields "
        "header: unknown request fields and stream_options, autoregressive-only sampling fields "
        "(top_p, top_k, min_p, penalties), verbosity, prediction, and reasoning_effort on a "
        "template without a thinking switch",
    )
    p.add_argument(
        "--allowed-origins",
        type=_comma_list,
        help="browser origins allowed by CORS, comma-separated, or '*' (default: none)",
    )
    p.add_argument(
        "--allowed-hosts",
        type=_comma_list,
        metavar="HOSTS",
        help="Host header names served besides localhost, IP addresses, this machine's name and "
        "--host: comma-separated, '*.example.com' for subdomains, '*' for any (e.g. behind a "
        "reverse proxy); others are refused (DNS rebinding)",
    )
    p.add_argument(
        "--allow-image-hosts",
        type=_comma_list,
        metavar="HOSTS",
        help="image URL hosts fetched even when they resolve to a loopback, private or link-local "
        "address: host names, addresses or networks, comma-separated (e.g. images.lan,10.0.0.0/8)",
    )
    p.add_argument(
        "--allow-local-image-urls",
        action="store_true",
        help="fetch image URLs from any address, this machine and its networks included (only when "
        "every client is trusted; default: public addresses only)",
    )
    p.add_argument(
        "--no-image-urls",
        action="store_true",
        help="refuse http(s) image URLs: clients send images as data: URLs",
    )
    p.add_argument(
        "--image-fetch-timeout",
        type=float,
        default=FETCH_TIMEOUT,
        metavar="S",
        help=f"seconds one image fetch may take in all (default {FETCH_TIMEOUT:g})",
    )
    p.add_argument(
        "--no-web",
        dest="web",
        action="store_false",
        help="do not serve the chat page at / (the API only)",
    )
    p.add_argument(
        "--log-level",
        default="info",
        type=str.lower,
        choices=["critical", "error", "warning", "info", "debug"],
    )
    p.add_argument("--trust-remote-code", action=_Note, help="accepted for mlx-lm compatibility; ignored")
    for flag in AUTOREGRESSIVE_FLAGS:
        p.add_argument(flag, action=_Refuse, help=argparse.SUPPRESS)
    return p


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound and listening before the model loads, so that a bad address or a port in use
    fails in a second, in one line. Listening at once claims the port: two servers bound (SO_REUSEADDR) but not
    yet listening could both get it, and the second would fail later, inside uvicorn, with a traceback."""
    sock = None
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        if is_leader():  # the rank that answers HTTP (other ranks of an mlx.launch on one host only bind)
            sock.listen(2048)  # uvicorn's default backlog (it calls listen() again, with its own)
    except OSError as e:
        if sock is not None:
            sock.close()
        if e.errno == errno.EADDRINUSE:
            raise DGemmaError(
                f"cannot listen on {host}:{port}: port {port} is already in use: pick another with --port"
            ) from None
        raise DGemmaError(
            f"cannot listen on {host}:{port}: {e.strerror or e}: choose another --host/--port"
        ) from None
    return sock


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    timeout = args.request_timeout or None
    try:
        if args.max_connections < 1 or not args.header_timeout > 0:
            raise DGemmaError("--max-connections and --header-timeout must be positive")
        if args.temperature is not None and not 0 <= args.temperature <= 2:
            raise DGemmaError(f"--temp must be between 0 and 2 (got {args.temperature})")
        check_limits(args.context_length, args.max_concurrency, args.max_body_bytes, timeout)
        check_batching(args.decode_concurrency, args.prompt_concurrency)
        check_defaults(args.max_tokens, args.chat_template_args)
        if not args.image_fetch_timeout > 0:
            raise DGemmaError(
                f"--image-fetch-timeout must be a positive number of seconds (got {args.image_fetch_timeout})"
            )
        images = ImagePolicy(
            fetch_urls=not args.no_image_urls,
            allow_local=args.allow_local_image_urls,
            allow_hosts=args.allow_image_hosts,
            timeout=args.image_fetch_timeout,
        )
        if (args.allow_local_image_urls or args.allow_image_hosts) and not _is_loopback(args.host):
            print(
                f"mlx_dgemma.server: warning: every client that reaches --host {args.host} can make the server "
                "fetch image URLs from the hosts --allow-image-hosts/--allow-local-image-urls open: keep them "
                "for trusted networks",
                file=sys.stderr,
            )
        sock = bind(args.host, args.port)
        app = create_app(
            args.model,
            context_length=args.context_length,
            max_concurrency=args.max_concurrency,
            decode_concurrency=args.decode_concurrency,
            prompt_concurrency=args.prompt_concurrency,
            prompt_cache=not args.no_prompt_cache,
            adapter_path=args.adapter_path,
            drafter=args.drafter,
            max_body_bytes=args.max_body_bytes,
            request_timeout=timeout,
            strict=args.strict,
            allowed_origins=args.allowed_origins,
            allowed_hosts=[*(args.allowed_hosts or []), args.host],
            default_temperature=args.temperature,
            fast=args.fast,
            images=images,
            max_tokens=args.max_tokens,
            chat_template_args=args.chat_template_args,
            web=args.web,
        )
    except DGemmaError as e:
        print(f"mlx_dgemma.server: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    if not is_leader():  # several ranks: this one follows rank 0's requests until rank 0 stops
        app.state.worker.join()
        return
    card = app.state.served.card()
    port = sock.getsockname()[1]
    print(
        f"mlx_dgemma.server: serving {card['id']!r} (context length {card['context_length']}) "
        f"on http://{args.host}:{port}/v1",
        file=sys.stderr,
    )
    if args.web:
        print(f"mlx_dgemma.server: chat page at http://{args.host}:{port}/", file=sys.stderr)
    config = make_config(
        app,
        log_level=args.log_level,
        max_connections=args.max_connections,
        header_timeout=args.header_timeout,
    )
    # Everything loaded so far lives as long as the server: keep it out of the cyclic garbage collector, whose
    # full passes over it (~370k objects) hold the GIL for up to a second and stall /health.
    gc.collect()
    gc.freeze()

    def on_exit() -> None:  # stop the running generation at its next step, abandon image fetches
        app.state.worker.shutdown()
        app.state.limits.images.shutdown()

    Server(config, on_exit=on_exit).run(sockets=[sock])


class BackgroundServer:
    """A uvicorn server for ``app`` on a background thread, on a free loopback port (``url`` ends in /v1)."""

    def __init__(
        self, app: Any, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning", **limits: Any
    ):
        self.socket = bind(host, port)
        self.host, self.port = host, self.socket.getsockname()[1]
        self.url = f"http://{host}:{self.port}/v1"
        self.app = app
        self.server = Server(
            make_config(app, log_level=log_level, graceful_s=60, **limits), on_exit=app.state.worker.shutdown
        )
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)

    def start(self, timeout: float = 600) -> BackgroundServer:  # a hang guard: a loaded machine is slow
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(600)  # a hang guard: requests still running get graceful_s to finish
        # The worker stops at its next step; wait for it (Worker.stop gives up after 10 s), so that no MLX work of
        # this server runs on beside the next one in the process (MLX is not made to evaluate from two threads).
        worker = getattr(self.app.state, "worker", None)
        if worker is not None:
            worker.join(600)
        self.socket.close()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
