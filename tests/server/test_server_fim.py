"""Fill-in-the-middle on ``POST /v1/completions`` (``prompt`` + ``suffix``), driven by the ``openai`` SDK and httpx.

The document is the demo model's own answer to a record prompt: the prompt is the chat-templated request plus the
answer's first canvas, the suffix is the answer's end, and the middle is what lies between. The server's middle is
checked against the library's ``generate(..., infill=FillInMiddle(suffix))``, the suffix against the committed
canvas, streaming against non-streaming, and the requests it must refuse.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import mlx.core as mx
import numpy as np
import openai
import pytest

from mlx_dgemma import Commit, generate, load, stream_generate
from mlx_dgemma.decoding.block_loop import CommitEvent, generate_tokens, prefill
from mlx_dgemma.decoding.constrain import FillInMiddle, MiddleConstraint, ll_tokenizer, special_tokens
from mlx_dgemma.errors import ConstraintError
from mlx_dgemma.request import prepare
from mlx_dgemma.server import BackgroundServer, create_app
from tests.conftest import DEMO24, HANG_S

FAST = {"max_denoising_steps": 3}
RECORD = "Fill the record: Meet Maya, 34, a pilot living in Oslo. Maya speaks Greek and Hindi."
MIDDLE = 6  # tokens between the first canvas and the suffix


@pytest.fixture(scope="module")
def reference():
    return load(DEMO24)


@pytest.fixture(scope="module")
def document(reference) -> dict[str, Any]:
    """The demo model's answer to ``RECORD`` cut into prompt (template + first canvas), middle and suffix."""
    model, tokenizer = reference
    messages = [{"role": "user", "content": RECORD}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    answer = [
        t
        for e in stream_generate(model, tokenizer, messages, 72, seed=0)
        if isinstance(e, Commit)
        for t in e.tokens
    ]
    canvas = model.args.canvas_length
    assert len(answer) > canvas + MIDDLE + 2, "the demo model's record is shorter than the test needs"
    text = tokenizer.decode(ids + answer[:canvas])
    assert text.startswith(tokenizer.bos_token)  # the server's raw prompt gets its <bos> from the tokenizer
    return {
        "prompt": text[len(tokenizer.bos_token) :],
        "record": tokenizer.decode(answer[:canvas]),
        "middle": tokenizer.decode(answer[canvas : canvas + MIDDLE]),
        "suffix": tokenizer.decode(answer[canvas + MIDDLE :]),
        "answer": tokenizer.decode(answer),
    }


@pytest.fixture(scope="module")
def server():
    with BackgroundServer(create_app(str(DEMO24), max_concurrency=4)) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=HANG_S)


def fim(client: openai.OpenAI, document: dict[str, Any], **kw: Any) -> Any:
    kw = {"max_tokens": MIDDLE, "seed": 0, "extra_body": FAST, **kw}
    return client.completions.create(
        model="default", prompt=document["prompt"], suffix=document["suffix"], **kw
    )


def library(
    reference, document: dict[str, Any], max_tokens: int, seed: int = 0, suffix: str | None = None
) -> str:
    model, tokenizer = reference
    return generate(
        model,
        tokenizer,
        document["prompt"],
        max_tokens=max_tokens,
        seed=seed,
        use_chat_template=False,
        infill=FillInMiddle(document["suffix"] if suffix is None else suffix),
        **FAST,
    )


def test_the_sdk_gets_the_middle_and_the_document_reads_whole(client, document):
    r = fim(client, document)
    middle = r.choices[0].text
    assert middle == document["middle"] and r.object == "text_completion"
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == MIDDLE  # the hole is full
    assert document["suffix"] not in middle  # the suffix is context, not answer
    assert json.loads(document["record"] + middle + document["suffix"]) == json.loads(document["answer"])


@pytest.mark.parametrize("seed", [0, 5])
def test_the_server_answers_what_the_library_does(client, reference, document, seed):
    assert fim(client, document, seed=seed).choices[0].text == library(reference, document, MIDDLE, seed)
    # Without max_tokens the middle may use the rest of the canvas beside the suffix.
    model, tokenizer = reference
    room = model.args.canvas_length - len(tokenizer.encode(document["suffix"], add_special_tokens=False))
    r = client.completions.create(
        model="default", prompt=document["prompt"], suffix=document["suffix"], seed=seed, extra_body=FAST
    )
    assert r.choices[0].text == library(reference, document, room, seed)
    assert r.usage.completion_tokens <= room


def test_streaming_equals_the_plain_answer(client, document):
    plain = fim(client, document, seed=3)
    chunks = list(fim(client, document, seed=3, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == plain.choices[0].text
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [plain.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


@pytest.mark.parametrize("foreign", [False, True])
def test_the_suffix_is_held_in_the_committed_canvas(reference, document, foreign):
    """The raw committed canvas (before EOS/pad finalization) holds the suffix right after the hole, then the end
    token, whatever the model would rather write there (``foreign``: a suffix that contradicts the record)."""
    model, tokenizer = reference
    suffix = ' "Lima", "job": "baker"}' if foreign else document["suffix"]
    request = prepare(
        model,
        tokenizer,
        document["prompt"],
        MIDDLE,
        use_chat_template=False,
        seed=0,
        infill=FillInMiddle(suffix),
        **FAST,
    )
    assert isinstance(request.constraint, MiddleConstraint)
    cache = model.make_cache()
    prefill(model, mx.array([request.ids]), cache)
    events = generate_tokens(
        model,
        cache,
        MIDDLE,
        request.sampler,
        seed=0,
        eos_ids=list(request.eos),
        constraint=request.constraint,
    )
    (commit,) = [e for e in events if isinstance(e, CommitEvent)]
    raw = np.asarray(commit.argmax[0]).tolist()
    held = tokenizer.encode(suffix, add_special_tokens=False)
    end = MIDDLE + len(held)
    assert raw[MIDDLE:end] == held
    assert raw[end] in request.eos and set(raw[end + 1 :]) == {model.args.pad_token_id}
    # What the library returns is the hole alone: the same tokens as the canvas's first positions.
    middle = library(reference, document, MIDDLE, suffix=suffix)
    kept = next((i for i, t in enumerate(raw[:MIDDLE]) if t in request.eos), MIDDLE)
    assert middle == tokenizer.decode(raw[:kept])


def test_the_middle_ends_at_the_first_end_token_or_pad_in_the_hole(reference):
    """The projection: a pad in the hole ends the middle as the end token the logits rank best; special tokens
    before it are replaced; positions after it are the model's (the commit pads them); the suffix is held."""
    model, tokenizer = reference
    eos, pad, vocab = sorted(model.args.eos_token_id), model.args.pad_token_id, model.args.vocab_size
    special = special_tokens(ll_tokenizer(tokenizer, eos, vocab), vocab)
    words = [t for t in range(vocab) if not special[t]][:6]
    other_special = next(t for t in range(vocab) if special[t] and t not in (pad, *eos))
    c = MiddleConstraint(5, words[4:6], eos, pad, special)
    logits = np.zeros(vocab, dtype=np.float32)
    logits[[words[3], eos[-1]]] = 5.0  # the best plain token, and the best end token
    argmax = np.array([words[0], other_special, pad, words[1], words[2], 7, 7, 7, 7, 7])
    out = c.project(0, argmax, lambda i: logits).tolist()
    assert out[:5] == [words[0], words[3], eos[-1], words[1], words[2]]
    assert out[5:] == [words[4], words[5], eos[-1], pad, pad]
    # A hole the model fills to its end: nothing in it changes.
    full = np.array([*words[:5], 7, 7, 7, 7, 7])
    assert c.project(0, full, lambda i: logits).tolist()[:5] == words[:5]


def test_an_empty_suffix_is_a_plain_completion(client, document):
    kw = {
        "model": "default",
        "prompt": document["prompt"],
        "max_tokens": MIDDLE,
        "seed": 2,
        "extra_body": FAST,
    }
    assert (
        client.completions.create(suffix="", **kw).choices[0].text
        == client.completions.create(**kw).choices[0].text
    )


def _error(r: httpx.Response) -> dict[str, Any]:
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert "\n" not in error["message"]
    return error


@pytest.mark.parametrize(
    "extra, words",
    [
        ({"max_tokens": 20}, ["max_tokens=20", "24-token canvas", "at most 18"]),
        ({"suffix_times": 5}, ["30 tokens", "at most 23"]),
        ({"suffix": "x" * 100_000}, ["100000 characters", "24-token canvas"]),
        ({"response_format": {"type": "json_object"}}, ["response_format"]),
    ],
)
def test_requests_that_cannot_be_filled_are_400s_naming_suffix(server, document, extra, words):
    body = {
        "prompt": document["prompt"],
        "suffix": document["suffix"] * extra.pop("suffix_times", 1),
        **extra,
    }
    error = _error(httpx.post(f"{server.url}/completions", json=body, timeout=HANG_S))
    assert error["param"] == "suffix" and all(w in error["message"] for w in words), error["message"]


def test_suffix_with_chat_is_a_400_pointing_to_completions(server, client):
    body = {"messages": [{"role": "user", "content": RECORD}], "max_tokens": 4, "suffix": "}"}
    error = _error(httpx.post(f"{server.url}/chat/completions", json=body, timeout=HANG_S))
    assert error["param"] == "suffix" and "/v1/completions" in error["message"]
    with pytest.raises(openai.BadRequestError, match="suffix"):
        client.completions.create(model="default", prompt="x", suffix="y" * 100_000, max_tokens=4)


@pytest.mark.parametrize(
    "suffix, words", [("", "empty"), ([10**9], "outside the vocabulary"), (3.5, "text or token ids")]
)
def test_the_library_refuses_a_bad_suffix_in_one_line(reference, suffix, words):
    model, tokenizer = reference
    with pytest.raises(ConstraintError) as e:
        prepare(model, tokenizer, "x", 4, use_chat_template=False, infill=FillInMiddle(suffix))
    assert words in str(e.value) and "\n" not in str(e.value)
