"""The command line (``mlx_dgemma.server``) and a server running on a background thread (tests, scripts)."""

from __future__ import annotations

import argparse
import socket
import sys
import threading
import time
from typing import Any

import uvicorn

from .._cli import add_model_arguments
from ..distributed import is_leader
from ..errors import DGemmaError
from .app import create_app

DESCRIPTION = """OpenAI-compatible server for DiffusionGemma (chat and text completions, streaming).
Without --model, serves the small demo model embedded in the package."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mlx_dgemma.server", description=DESCRIPTION)
    add_model_arguments(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8080, help="port (default 8080; 0 picks a free one)")
    p.add_argument("--context-length", type=int,
                   help="largest prompt + answer accepted (default: the model's native window)")
    p.add_argument("--max-concurrency", type=int, default=16,
                   help="requests queued or running at once; more get HTTP 429 (default 16)")
    p.add_argument("--no-prompt-cache", action="store_true",
                   help="do not reuse the previous request's encoder cache")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        app = create_app(args.model, context_length=args.context_length, max_concurrency=args.max_concurrency,
                         prompt_cache=not args.no_prompt_cache, adapter_path=args.adapter_path,
                         drafter=args.drafter)
    except DGemmaError as e:
        print(f"mlx_dgemma.server: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    if not is_leader():  # several ranks: this one follows rank 0's requests until rank 0 stops
        app.state.worker.join()
        return
    card = app.state.served.card()
    print(f"mlx_dgemma.server: serving {card['id']!r} (context length {card['context_length']}) "
          f"on http://{args.host}:{args.port}/v1", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)


class BackgroundServer:
    """A uvicorn server for ``app`` on a background thread, on a free loopback port (``url`` ends in /v1)."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind((host, port))
        self.host, self.port = host, self.socket.getsockname()[1]
        self.url = f"http://{host}:{self.port}/v1"
        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)

    def start(self, timeout: float = 30) -> BackgroundServer:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.socket.close()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
