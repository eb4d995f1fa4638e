"""Forced tool calls on the demo model: decoder passes, canvases and seconds a call takes, with the bound on fought
canvases (``constrain.FOUGHT_STEPS``) and without it (``--unbounded``: the loop as it was before the bound).

    python -m benchmarks.tool_calls [--tools get_weather add ...] [--seeds 0 1 2] [--max-tokens 256] [--unbounded]

Each call is ``stream_generate`` with the grammar the server builds for ``tool_choice: "required"``
(``tool_grammar.tool_call_grammar``), the tool declared in the prompt by the model's chat template (as the server
renders it). One JSON line per call: passes, canvases, tokens, seconds, the call as mlx-lm's parser reads it.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import mlx_dgemma  # noqa: F401 (first: on Linux it loads a fast BLAS before mlx)


def tool(name: str, properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    parameters = {"type": "object", "properties": properties, "required": required}
    return {
        "type": "function",
        "function": {"name": name, "description": name.replace("_", " "), "parameters": parameters},
    }


TOOLS = {
    "get_weather": (
        tool("get_weather", {"city": {"type": "string"}}, ["city"]),
        "What is the weather in Oslo?",
    ),
    "add": (tool("add", {"a": {"type": "integer"}, "b": {"type": "integer"}}, ["a", "b"]), "Add 2 and 40."),
    "search": (
        tool("search", {"query": {"type": "string"}, "limit": {"type": "integer"}}, ["query"]),
        "Search for pilots in Lima.",
    ),
    "set_alarm": (
        tool(
            "set_alarm",
            {"time": {"type": "string", "pattern": "^[0-9]{2}:[0-9]{2}$"}, "enabled": {"type": "boolean"}},
            ["time", "enabled"],
        ),
        "Wake me at 07:30.",
    ),
}


def call(model: Any, tokenizer: Any, name: str, seed: int, max_tokens: int) -> dict[str, Any]:
    """One forced call: its statistics and the call parsed back."""
    from mlx_dgemma import stream_generate
    from mlx_dgemma.decoding.tool_grammar import tool_call_grammar
    from mlx_dgemma.prompt.chat_template import render

    spec, question = TOOLS[name]
    prompt = render(tokenizer, [{"role": "user", "content": question}], True, tools=[spec])
    grammar = {"type": "lark", "lark": tool_call_grammar([spec], "required", tokenizer)}
    start, text = time.perf_counter(), ""
    for event in stream_generate(model, tokenizer, prompt, max_tokens, seed=seed, response_format=grammar):
        text += event.text
    seconds = time.perf_counter() - start
    stats = event.stats
    return {
        "tool": name,
        "seed": seed,
        "passes": stats.decoder_passes,
        "canvases": stats.canvases,
        "tokens": stats.generated_tokens,
        "seconds": round(seconds, 2),
        "call": tokenizer.tool_parser(text, [spec]),
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tools", nargs="+", default=list(TOOLS), choices=list(TOOLS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--unbounded", action="store_true", help="no bound on fought canvases (as before it)")
    args = parser.parse_args()

    from mlx_dgemma import load
    from mlx_dgemma.decoding import hooks

    if args.unbounded:
        hooks.FOUGHT_STEPS = 10**9
    model, tokenizer = load()
    for name in args.tools:
        for seed in args.seeds:
            print(json.dumps(call(model, tokenizer, name, seed, args.max_tokens)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
