"""mlx-lm's own idioms, unchanged, against our API (on the embedded demo model)."""

from __future__ import annotations

import re
from dataclasses import fields
from itertools import accumulate

import mlx.core as mx
import pytest
from mlx_lm.generate import GenerationResponse
from mlx_lm.models.cache import load_prompt_cache, make_prompt_cache, save_prompt_cache

from mlx_dgemma import Commit, Done, GenerationError, Preview, generate, load, stream_generate
from mlx_dgemma.cli.generate import DEMO_PROMPT
from mlx_dgemma.request import encode_prompt
from tests.conftest import DEMO24

OPTS = {"max_tokens": 64, "drafter": "none"}  # the demo prompt's answer spans two canvases


@pytest.fixture(scope="module")
def demo():
    return load(DEMO24)


@pytest.fixture(scope="module")
def answer(demo):
    model, tokenizer = demo
    events = list(stream_generate(model, tokenizer, DEMO_PROMPT, seed=0, **OPTS))
    return events[-1]


def test_the_streaming_loop_collects_the_answer_once(demo, answer):
    model, tokenizer = demo
    # mlx-lm's README loop, verbatim.
    text = ""
    for response in stream_generate(model, tokenizer, DEMO_PROMPT, seed=0, **OPTS):
        text += response.text
    assert text == answer.answer and answer.stats.canvases >= 2
    assert response.finish_reason == "stop" and response.text == ""
    names = {f.name for f in fields(GenerationResponse)}
    assert names <= set(vars(response))  # every field mlx-lm's GenerationResponse has
    assert response.generation_tokens == answer.stats.generated_tokens > 0
    assert response.prompt_tokens == len(encode_prompt(tokenizer, DEMO_PROMPT))
    assert response.prompt_tps > 0 and response.generation_tps > 0 and response.peak_memory > 0
    assert response.token is not None and response.logprobs is None


def test_commits_carry_running_figures_and_previews_come_only_when_asked(demo):
    model, tokenizer = demo
    plain = list(stream_generate(model, tokenizer, DEMO_PROMPT, seed=0, **OPTS))
    assert not any(isinstance(e, Preview) for e in plain)
    commits = [e for e in plain if isinstance(e, Commit)]
    assert [c.generation_tokens for c in commits] == list(accumulate(len(c.tokens) for c in commits))
    assert all(c.finish_reason is None for c in commits)
    with_previews = list(stream_generate(model, tokenizer, DEMO_PROMPT, seed=0, previews=True, **OPTS))
    previews = [e for e in with_previews if isinstance(e, Preview)]
    assert previews and all(d.text == "" and isinstance(d.canvas_text, str) for d in previews)
    assert any(d.canvas_text for d in previews)
    assert with_previews[-1].answer == plain[-1].answer  # previews change nothing
    old_name = list(
        stream_generate(model, tokenizer, DEMO_PROMPT, seed=0, drafts=True, **OPTS)
    )  # previews' old name
    assert [e.canvas_text for e in old_name if isinstance(e, Preview)] == [d.canvas_text for d in previews]


def test_verbose_prints_as_mlx_lm_does(demo, answer, capsys):
    model, tokenizer = demo
    text = generate(model, tokenizer, DEMO_PROMPT, True, seed=0, **OPTS)  # mlx-lm's 4th positional: verbose
    out = capsys.readouterr().out
    assert text == answer.answer
    lines = out.splitlines()
    assert lines[0] == "=" * 10 and lines[1] == text and lines[2] == "=" * 10
    assert re.fullmatch(r"Prompt: \d+ tokens, [\d.]+ tokens-per-sec", lines[3])
    assert re.fullmatch(
        rf"Generation: {answer.stats.generated_tokens} tokens, [\d.]+ tokens-per-sec", lines[4]
    )
    assert re.fullmatch(r"Peak memory: [\d.]+ GB", lines[5])
    assert generate(model, tokenizer, DEMO_PROMPT, seed=0, **OPTS) == text
    assert capsys.readouterr().out == ""  # not verbose: silent
    with pytest.raises(GenerationError, match="verbose"):
        generate(model, tokenizer, DEMO_PROMPT, 20)  # mlx_dgemma's old 4th positional, max_tokens


def test_token_id_prompts_are_used_as_given(demo, answer):
    model, tokenizer = demo
    messages = [{"role": "user", "content": DEMO_PROMPT}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)  # mlx-lm's idiom: token ids
    assert isinstance(ids, list) and all(isinstance(t, int) for t in ids)
    assert generate(model, tokenizer, ids, seed=0, **OPTS) == answer.answer
    assert generate(model, tokenizer, mx.array(ids), seed=0, **OPTS) == answer.answer
    raw = tokenizer.encode("no template here")
    done = list(stream_generate(model, tokenizer, raw, max_tokens=4, max_denoising_steps=2))[-1]
    assert done.prompt_tokens == len(raw)  # not templated
    with pytest.raises(GenerationError, match="1-D"):
        generate(model, tokenizer, mx.zeros((2, 3), dtype=mx.int32))


def test_a_templated_string_is_not_templated_again(demo, answer):
    model, tokenizer = demo
    messages = [{"role": "user", "content": DEMO_PROMPT}]
    templated = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert templated.startswith(tokenizer.bos_token)
    assert encode_prompt(tokenizer, templated) == encode_prompt(tokenizer, DEMO_PROMPT)
    without_bos = templated[len(tokenizer.bos_token) :]  # starts with the turn marker
    assert encode_prompt(tokenizer, without_bos) == encode_prompt(tokenizer, DEMO_PROMPT)[1:]
    assert generate(model, tokenizer, templated, seed=0, **OPTS) == answer.answer


def test_prompt_cache_round_trips_through_mlx_lm(demo, answer, tmp_path):
    model, tokenizer = demo
    cache = make_prompt_cache(model)
    first = generate(model, tokenizer, DEMO_PROMPT, prompt_cache=cache, seed=0, **OPTS)
    assert first == answer.answer
    # The cache holds the prompt, the answer and the end-of-turn token that ended it, as mlx-lm's does.
    prompt = encode_prompt(tokenizer, DEMO_PROMPT)
    assert cache[0].offset == len(prompt) + answer.stats.generated_tokens + 1

    file = str(tmp_path / "cache.safetensors")
    save_prompt_cache(file, cache, {"model": "demo"})
    loaded, meta = load_prompt_cache(file, return_metadata=True)
    assert meta == {"model": "demo"}
    assert [type(c).__name__ for c in loaded] == [type(c).__name__ for c in cache]
    for a, b in zip(cache, loaded):
        assert a.offset == b.offset
        ka, va = a.fetch(
            mx.zeros((1, a.keys.shape[1], 0, a.keys.shape[3])),
            mx.zeros((1, a.values.shape[1], 0, a.values.shape[3])),
        )
        kb, vb = b.fetch(
            mx.zeros((1, b.keys.shape[1], 0, b.keys.shape[3])),
            mx.zeros((1, b.values.shape[1], 0, b.values.shape[3])),
        )
        assert mx.array_equal(ka, kb).item() and mx.array_equal(va, vb).item()

    follow = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Meet Ivo, 50, a chef in Rome."}], add_generation_prompt=True
    )
    kw = {**OPTS, "max_tokens": 8, "max_denoising_steps": 4, "seed": 1}
    from_loaded = generate(model, tokenizer, follow, prompt_cache=loaded, **kw)
    from_live = generate(model, tokenizer, follow, prompt_cache=cache, **kw)
    assert from_loaded == from_live
    assert loaded[0].offset == cache[0].offset > len(prompt) + len(follow)
    with pytest.raises(GenerationError, match="does not fit this model"):
        generate(model, tokenizer, follow, prompt_cache=loaded[:-1], **kw)


@pytest.mark.parametrize("seed", [-1, 2**64, 1.5, True])
def test_bad_seeds_are_one_line_errors(demo, seed):
    model, tokenizer = demo
    with pytest.raises(GenerationError, match="seed") as info:
        generate(model, tokenizer, "hi", seed=seed, max_tokens=4)
    assert "\n" not in str(info.value)


def test_mlx_lm_only_options_name_what_to_use(demo):
    model, tokenizer = demo
    for option, word in [("sampler", "t_max"), ("draft_model", "drafter"), ("kv_bits", "convert")]:
        with pytest.raises(GenerationError, match=word):
            generate(model, tokenizer, "hi", max_tokens=4, **{option: None})


def test_done_has_the_statistics(answer):
    assert isinstance(answer, Done)
    s = answer.stats
    assert s.decoder_passes >= s.canvases >= 2 and s.tokens_per_forward > 0


def test_messages_the_template_rejects_are_one_line_errors(demo):
    model, tokenizer = demo
    with pytest.raises(GenerationError, match="chat template rejected") as info:
        generate(model, tokenizer, [{"role": "robot", "content": "beep"}], max_tokens=4)
    assert "\n" not in str(info.value)


def test_the_cli_module_does_not_shadow_the_generate_function():
    import mlx_dgemma
    import mlx_dgemma.cli.generate  # the command line of generate: its own name, no collision

    assert callable(mlx_dgemma.generate) and mlx_dgemma.generate.__module__ == "mlx_dgemma.generation"
