"""Load test of ``mlx_dgemma.server``: N concurrent clients x M requests each, on loopback, bounded in time.

    python -m benchmarks.load                                     # 4 clients x 5 requests, embedded model
    python -m benchmarks.load --clients 8 --requests 10 --max-tokens 64 --steps 8 --model PATH
    python -m benchmarks.load --url http://127.0.0.1:8080/v1      # against a server already running

Starts the server itself (``python -m mlx_dgemma.server`` on a free loopback port) unless ``--url`` is
given. Each client sends its requests one after another with the real ``openai`` client, alternating
streamed and plain chat completions with distinct prompts and seeds. Prints the requests served, the
errors, latency percentiles (whole request; first content chunk for streamed ones) and throughput.
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

import httpx
import openai

TOPICS = ["the sea", "a compiler", "autumn", "binary search", "a lighthouse", "coffee", "recursion", "trains"]


@dataclass
class Results:
    latencies: list[float] = field(default_factory=list)
    first_chunk: list[float] = field(default_factory=list)
    tokens: int = 0
    errors: list[str] = field(default_factory=list)
    skipped: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100); NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, round(q / 100 * len(ordered) + 0.5 - 1e-9))
    return ordered[min(rank, len(ordered)) - 1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    """``python -m mlx_dgemma.server`` on a free loopback port; returns it once /health answers."""
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "mlx_dgemma.server",
        "--port",
        str(port),
        "--log-level",
        "warning",
        "--max-concurrency",
        str(max(args.clients * 2, 2)),
    ]
    if args.model:
        cmd += ["--model", args.model]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited: {proc.stderr.read() if proc.stderr else ''}")
        try:
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).raise_for_status()
            return proc, f"http://127.0.0.1:{port}/v1"
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("the server did not start within 120 s")


def one_request(client: openai.OpenAI, args: argparse.Namespace, index: int, results: Results) -> None:
    """Send one chat completion (streamed when ``index`` is even) and record its timings."""
    messages = [{"role": "user", "content": f"Write about {TOPICS[index % len(TOPICS)]} (#{index})."}]
    kw = {
        "model": "default",
        "messages": messages,
        "max_tokens": args.max_tokens,
        "seed": index,
        "extra_body": {"max_denoising_steps": args.steps},
    }
    start = time.perf_counter()
    tokens = 0
    if index % 2 == 0:
        first = None
        for chunk in client.chat.completions.create(
            stream=True, stream_options={"include_usage": True}, **kw
        ):
            if first is None and chunk.choices and chunk.choices[0].delta.content:
                first = time.perf_counter() - start
            if chunk.usage:
                tokens = chunk.usage.completion_tokens
    else:
        first = None
        tokens = client.chat.completions.create(**kw).usage.completion_tokens
    elapsed = time.perf_counter() - start
    with results.lock:
        results.latencies.append(elapsed)
        results.tokens += tokens
        if first is not None:
            results.first_chunk.append(first)


def run_client(url: str, args: argparse.Namespace, client_id: int, deadline: float, results: Results) -> None:
    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=args.time_limit)
    for i in range(args.requests):
        if time.monotonic() > deadline:
            with results.lock:
                results.skipped += args.requests - i
            return
        try:
            one_request(client, args, client_id * args.requests + i, results)
        except Exception as e:  # count and go on: a load test reports errors, it does not stop at one
            with results.lock:
                results.errors.append(f"{type(e).__name__}: {e}")


def report(results: Results, wall: float, args: argparse.Namespace) -> None:
    lat, first = results.latencies, results.first_chunk
    print(
        f"clients x requests : {args.clients} x {args.requests} (max_tokens {args.max_tokens}, "
        f"{args.steps} denoising steps per canvas)"
    )
    print(f"requests served    : {len(lat)}")
    print(
        f"errors             : {len(results.errors)}"
        + (f" (first: {results.errors[0]})" if results.errors else "")
    )
    print(f"not sent (deadline): {results.skipped}")
    print(
        f"latency p50 / p95  : {percentile(lat, 50):.3f} s / {percentile(lat, 95):.3f} s (max {max(lat, default=0):.3f})"
    )
    print(
        f"first chunk p50/p95: {percentile(first, 50):.3f} s / {percentile(first, 95):.3f} s (streamed requests)"
    )
    print(
        f"tokens generated   : {results.tokens} in {wall:.2f} s wall ({results.tokens / wall:.1f} tokens/s, "
        f"{len(lat) / wall:.2f} requests/s)"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--requests", type=int, default=5, help="requests per client")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--steps", type=int, default=4, help="max_denoising_steps per canvas")
    p.add_argument("--model", help="model for the server it starts (default: the embedded model)")
    p.add_argument("--url", help="use this running server (base URL ending in /v1) instead of starting one")
    p.add_argument("--time-limit", type=float, default=120, help="no request starts after this many seconds")
    args = p.parse_args()

    proc, url = (None, args.url) if args.url else start_server(args)
    try:
        results = Results()
        start = time.monotonic()
        threads = [
            threading.Thread(target=run_client, args=(url, args, c, start + args.time_limit, results))
            for c in range(args.clients)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(args.time_limit * 2)
        report(results, time.monotonic() - start, args)
        print(f"server /health     : {httpx.get(url.removesuffix('/v1') + '/health').json()}")
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(10)
    sys.exit(1 if results.errors else 0)


if __name__ == "__main__":
    main()
