"""Real third-party clients against ``mlx_dgemma.server`` on the embedded demo model: which calls work, and how long
each takes.

    python -m benchmarks.clients [--only openai,anthropic,agents,pydantic-ai,langchain,litellm] [--json out.json]

The server runs in-process (``BackgroundServer(create_app(None))``, a free loopback port); every row is one call
made by the client library itself, its answer checked (text came back, usage counted, the Pydantic model parsed,
the tool ran). A client that is not importable is "not installed", not a failure: openai, anthropic and
openai-agents are in the ``test`` extra; pydantic-ai, langchain-openai and litellm are optional
(``pip install "pydantic-ai-slim[openai]" langchain-openai litellm``). Calls ask for few tokens and
``max_denoising_steps`` 4 where the client passes extra body fields (not under a grammar: see ``GRAMMAR``), so the
run takes about a minute on a CPU.
Exit status 1 if an installed client's row fails.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import mlx_dgemma  # noqa: F401 (first: on Linux it loads a fast BLAS before mlx)

FAST = {"max_denoising_steps": 4, "seed": 0}
# Rows under a grammar (a JSON schema, a forced tool call) keep the model's own steps: capped at 4, the demo model
# fights the grammar (an age of 19 digits; a forced call's string that never closes and runs to max_tokens).
GRAMMAR = {"seed": 0}
TOKENS = 64  # the demo model's record takes 33 and ends (responses.stream needs response.completed), a forced
# tool call about 45; the JSON rows ask for more (their grammar must close)
JSON_TOKENS = 96
TIMEOUT_S = 300.0  # a hang guard per call, not a speed expectation
QUESTION = "Fill the record: Meet Maya, 34, a pilot living in Oslo."
ASK = [{"role": "user", "content": QUESTION}]
TOOL_QUESTION = "What is the weather in Oslo?"
REASON_CHARS = 160


@dataclass
class Row:
    """One call: ``result`` is "ok", "FAIL" or "not installed"; ``reason`` says why it failed, ``detail`` what came
    back (both one line)."""

    client: str
    call: str
    result: str
    seconds: float | None = None
    reason: str = ""
    detail: str = ""


def expect(condition: object, message: str) -> None:
    """Raises a one-line failure (not ``assert``: the checks must hold under ``python -O`` too)."""
    if not condition:
        raise AssertionError(message)


def one_line(text: object, limit: int = REASON_CHARS) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def person() -> type:
    """The Pydantic model the structured-output rows parse into (built here: pydantic comes with the clients)."""
    from pydantic import BaseModel

    class Person(BaseModel):
        name: str
        age: int

    return Person


# --- openai -------------------------------------------------------------------------------------------------------


def openai_client(url: str) -> Any:
    import openai

    return openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=TIMEOUT_S)


def chat_create(url: str) -> str:
    r = openai_client(url).chat.completions.create(
        model="default", messages=ASK, max_tokens=TOKENS, extra_body=FAST
    )
    choice = r.choices[0]
    expect(choice.message.content, f"no content (finish_reason={choice.finish_reason})")
    expect(r.usage and r.usage.completion_tokens > 0, f"no usage: {r.usage}")
    return choice.message.content


def chat_stream(url: str) -> str:
    chunks = list(
        openai_client(url).chat.completions.create(
            model="default",
            messages=ASK,
            max_tokens=TOKENS,
            stream=True,
            stream_options={"include_usage": True},
            extra_body=FAST,
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    expect(text, f"no text in {len(chunks)} chunks")
    usage = chunks[-1].usage
    expect(usage and usage.completion_tokens > 0, f"the last chunk has no usage: {usage}")
    return f"{len(chunks)} chunks: {text}"


def parse_method(client: Any) -> Callable[..., Any]:
    """``chat.completions.parse`` (openai >= 1.92), else ``beta.chat.completions.parse``."""
    return getattr(client.chat.completions, "parse", None) or client.beta.chat.completions.parse


def chat_parse(url: str) -> str:
    Person = person()
    r = parse_method(openai_client(url))(
        model="default", messages=ASK, response_format=Person, max_tokens=JSON_TOKENS, extra_body=GRAMMAR
    )
    parsed = r.choices[0].message.parsed
    expect(isinstance(parsed, Person), f"not parsed: {r.choices[0].message.content!r}")
    return repr(parsed)


def responses_create(url: str) -> str:
    r = openai_client(url).responses.create(
        model="default", input=QUESTION, max_output_tokens=TOKENS, extra_body=FAST
    )
    expect(r.status in ("completed", "incomplete") and r.output_text, f"status {r.status}, no output_text")
    expect(r.usage and r.usage.output_tokens > 0, f"no usage: {r.usage}")
    return r.output_text


def responses_stream(url: str) -> str:
    with openai_client(url).responses.stream(
        model="default", input=QUESTION, max_output_tokens=TOKENS, extra_body=FAST
    ) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_response()
    expect("response.output_text.delta" in kinds, f"no text deltas in {sorted(set(kinds))}")
    expect(kinds[-1] in ("response.completed", "response.incomplete"), f"ended with {kinds[-1]}")
    expect(final.output_text, "the final response has no output_text")
    return f"{len(kinds)} events: {final.output_text}"


# --- anthropic ----------------------------------------------------------------------------------------------------


def anthropic_client(url: str) -> Any:
    import anthropic

    # The SDK appends /v1/messages itself: its base_url is the server's root.
    return anthropic.Anthropic(
        base_url=url.removesuffix("/v1"), api_key="unused", max_retries=0, timeout=TIMEOUT_S
    )


def messages_create(url: str) -> str:
    m = anthropic_client(url).messages.create(
        model="default", max_tokens=TOKENS, messages=ASK, extra_body=FAST
    )
    texts = [b.text for b in m.content if b.type == "text"]
    expect(texts and texts[0], f"no text block (stop_reason={m.stop_reason})")
    expect(m.usage.output_tokens > 0, f"no usage: {m.usage}")
    return texts[0]


def messages_stream(url: str) -> str:
    with anthropic_client(url).messages.stream(
        model="default", max_tokens=TOKENS, messages=ASK, extra_body=FAST
    ) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_message()
    expect(kinds[0] == "message_start" and kinds[-1] == "message_stop", f"events {kinds[:1]}...{kinds[-1:]}")
    expect(final.content and final.content[0].text, "the final message has no text")
    return f"{len(kinds)} events: {final.content[0].text}"


# --- openai-agents ------------------------------------------------------------------------------------------------


def agents_run(url: str) -> str:
    """An Agent with one function tool, the default (Responses) model: the first turn must call the tool
    (``tool_choice="required"``; agents resets it to auto after the call), the next answers."""
    import agents
    import openai

    agents.set_tracing_disabled(True)  # no trace upload: nothing outside the machine is reached
    calls: list[str] = []

    @agents.function_tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        calls.append(city)
        return f"Sunny in {city}"

    client = openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=0, timeout=TIMEOUT_S)
    config = agents.RunConfig(model_provider=agents.OpenAIProvider(openai_client=client, use_responses=True))
    agent = agents.Agent(
        name="weather",
        instructions="Answer with the tool.",
        tools=[get_weather],
        model="default",
        model_settings=agents.ModelSettings(max_tokens=TOKENS, tool_choice="required", extra_body=GRAMMAR),
    )
    result = asyncio.run(agents.Runner.run(agent, TOOL_QUESTION, run_config=config, max_turns=4))
    expect(calls, "the tool was not called")
    expect(isinstance(result.final_output, str), f"final output {result.final_output!r}")
    return f"tool({calls[0]!r}) -> {result.final_output!r}"


# --- pydantic-ai --------------------------------------------------------------------------------------------------


def pydantic_ai_model(url: str, responses: bool) -> Any:
    from pydantic_ai.models.openai import OpenAIChatModel, OpenAIResponsesModel
    from pydantic_ai.providers.openai import OpenAIProvider

    provider = OpenAIProvider(base_url=url, api_key="unused")
    return (OpenAIResponsesModel if responses else OpenAIChatModel)("default", provider=provider)


def pydantic_ai_run(url: str, responses: bool, output_type: type = str) -> Any:
    from pydantic_ai import Agent

    tokens, body = (
        (TOKENS, FAST) if output_type is str else (JSON_TOKENS, GRAMMAR)
    )  # a Pydantic output: a tool call
    settings = {"max_tokens": tokens, "extra_body": body, "timeout": TIMEOUT_S, "max_retries": 0}
    agent = Agent(pydantic_ai_model(url, responses), output_type=output_type, model_settings=settings)
    return agent.run_sync(QUESTION).output


def pydantic_ai_chat(url: str) -> str:
    output = pydantic_ai_run(url, responses=False)
    expect(isinstance(output, str) and output, f"output {output!r}")
    return output


def pydantic_ai_responses(url: str) -> str:
    output = pydantic_ai_run(url, responses=True)
    expect(isinstance(output, str) and output, f"output {output!r}")
    return output


def pydantic_ai_structured(url: str) -> str:
    Person = person()
    output = pydantic_ai_run(url, responses=False, output_type=Person)
    expect(isinstance(output, Person), f"output {output!r}")
    return repr(output)


# --- langchain-openai ---------------------------------------------------------------------------------------------


def chat_openai(url: str, **kwargs: Any) -> Any:
    from langchain_openai import ChatOpenAI

    kwargs.setdefault("max_tokens", TOKENS)
    kwargs.setdefault("extra_body", FAST)
    return ChatOpenAI(
        model="default",
        base_url=url,
        api_key="unused",
        max_retries=0,
        timeout=TIMEOUT_S,
        **kwargs,
    )


def langchain_invoke(url: str) -> str:
    message = chat_openai(url).invoke(QUESTION)
    expect(message.content, "no content")
    expect(message.usage_metadata and message.usage_metadata["output_tokens"] > 0, "no usage_metadata")
    return str(message.content)


def langchain_stream(url: str) -> str:
    chunks = list(chat_openai(url).stream(QUESTION))
    text = "".join(str(c.content) for c in chunks)
    expect(text, f"no text in {len(chunks)} chunks")
    return f"{len(chunks)} chunks: {text}"


def langchain_structured(url: str) -> str:
    Person = person()
    output = (
        chat_openai(url, max_tokens=JSON_TOKENS, extra_body=GRAMMAR)
        .with_structured_output(Person)
        .invoke(QUESTION)
    )
    expect(isinstance(output, Person), f"output {output!r}")
    return repr(output)


def langchain_responses(url: str) -> str:
    message = chat_openai(url, use_responses_api=True).invoke(QUESTION)
    expect(message.text, f"no text in {message.content!r}")
    return message.text


# --- litellm ------------------------------------------------------------------------------------------------------


def litellm_module() -> Any:
    # Its price list is read from the package, not fetched (the run reaches nothing outside the machine).
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    import litellm

    litellm.telemetry = False
    return litellm


def litellm_completion(url: str) -> str:
    r = litellm_module().completion(
        model="openai/default",
        api_base=url,
        api_key="unused",
        messages=ASK,
        max_tokens=TOKENS,
        extra_body=FAST,
        timeout=TIMEOUT_S,
        num_retries=0,
    )
    content = r.choices[0].message.content
    expect(content, f"no content (finish_reason={r.choices[0].finish_reason})")
    return content


def litellm_responses(url: str) -> str:
    r = litellm_module().responses(
        model="openai/default",
        api_base=url,
        api_key="unused",
        input=QUESTION,
        max_output_tokens=TOKENS,
        extra_body=FAST,
        timeout=TIMEOUT_S,
        num_retries=0,
    )
    texts = [part.text for item in r.output if item.type == "message" for part in item.content]
    expect(texts and texts[0], f"no message text in {[item.type for item in r.output]}")
    return texts[0]


# --- the table ----------------------------------------------------------------------------------------------------

# client -> (the module that must import, [(call, check)])
CLIENTS: dict[str, tuple[str, list[tuple[str, Callable[[str], str]]]]] = {
    "openai": (
        "openai",
        [
            ("chat.completions.create", chat_create),
            ("chat.completions.create stream+usage", chat_stream),
            ("chat.completions.parse (Pydantic)", chat_parse),
            ("responses.create", responses_create),
            ("responses.stream", responses_stream),
        ],
    ),
    "anthropic": (
        "anthropic",
        [("messages.create", messages_create), ("messages.stream", messages_stream)],
    ),
    "agents": ("agents", [("Runner.run, function tool (Responses)", agents_run)]),
    "pydantic-ai": (
        "pydantic_ai",
        [
            ("Agent.run_sync (OpenAIChatModel)", pydantic_ai_chat),
            ("Agent.run_sync (OpenAIResponsesModel)", pydantic_ai_responses),
            ("Agent.run_sync output_type=Pydantic", pydantic_ai_structured),
        ],
    ),
    "langchain": (
        "langchain_openai",
        [
            ("ChatOpenAI.invoke", langchain_invoke),
            ("ChatOpenAI.stream", langchain_stream),
            ("with_structured_output (Pydantic)", langchain_structured),
            ("ChatOpenAI(use_responses_api=True).invoke", langchain_responses),
        ],
    ),
    "litellm": (
        "litellm",
        [("completion openai/", litellm_completion), ("responses openai/", litellm_responses)],
    ),
}


def installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def measure(client: str, call: str, check: Callable[[str], str], url: str) -> Row:
    """One call, timed; any exception is its FAIL row (one line: the exception's type and message)."""
    start = time.perf_counter()
    try:
        detail = check(url)
    except Exception as e:
        seconds = round(time.perf_counter() - start, 2)
        return Row(client, call, "FAIL", seconds, reason=one_line(f"{type(e).__name__}: {e}"))
    return Row(client, call, "ok", round(time.perf_counter() - start, 2), detail=one_line(detail))


def run_clients(url: str, names: list[str]) -> list[Row]:
    rows = []
    for name in names:
        module, calls = CLIENTS[name]
        for call, check in calls:
            if not installed(module):
                rows.append(Row(name, call, "not installed"))
                continue
            rows.append(measure(name, call, check, url))
            print(f"{name:<12} {call:<44} {rows[-1].result} {rows[-1].seconds}s", file=sys.stderr, flush=True)
    return rows


def warm_up(url: str) -> None:
    """One small request first (stdlib, no client), so that no row carries the first call's compile time."""
    body = json.dumps({"messages": ASK, "max_tokens": 4, **FAST}).encode()
    request = urllib.request.Request(
        f"{url}/chat/completions", data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
        response.read()


def table(rows: list[Row]) -> str:
    """A Markdown table with aligned columns: readable in a terminal, pasteable into docs."""
    cells = [["client", "call", "result", "seconds"]]
    for row in rows:
        result = f"FAIL: {row.reason}" if row.result == "FAIL" else row.result
        cells.append([row.client, row.call, result, "" if row.seconds is None else f"{row.seconds:.2f}"])
    widths = [max(len(line[i]) for line in cells) for i in range(4)]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(line, widths)) + " |" for line in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def client_names(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in CLIENTS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown client(s) {', '.join(unknown) or '(none given)'}: choose from {', '.join(CLIENTS)}"
        )
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", type=client_names, default=list(CLIENTS), help="comma-separated clients")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)

    from mlx_dgemma.server import BackgroundServer, create_app

    with BackgroundServer(create_app(None)) as server:
        warm_up(server.url)
        rows = run_clients(server.url, args.only)
    print(table(rows))
    failed = any(row.result == "FAIL" for row in rows)
    if args.json:
        report = {"clients": args.only, "ok": not failed, "rows": [asdict(row) for row in rows]}
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
