"""The text API and the CLI, on the embedded default model."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys

import pytest

from mlx_dgemma import DEFAULT_MODEL, Commit, Done, GenerationError, Preview, generate, load, stream_generate
from mlx_dgemma.decoding.sampler import SamplerConfigError
from mlx_dgemma.generation import _keep
from mlx_dgemma.request import encode_prompt

FAST = {"max_denoising_steps": 4}


@pytest.fixture(scope="module")
def default():
    return load()


def test_load_without_argument_is_the_embedded_model(default):
    model, tokenizer = default
    assert DEFAULT_MODEL.is_dir() and (DEFAULT_MODEL / "config.json").is_file()
    assert model.args.num_hidden_layers >= 2 and tokenizer.chat_template


def test_the_default_answers_the_readme_example_with_its_own_sampler_settings(default):
    """The README's first command: the long-answer demo model (128-token canvases) and the sampler settings its
    generation_config.json ships, which are not the released model's (demo/train.py's GENERATION)."""
    model, tokenizer = default
    assert model.args.canvas_length == 128
    assert (model.generation_config["t_max"], model.generation_config["sampler_config"]["entropy_bound"]) == (
        1.0,
        0.01,
    )
    prompt = "Fill the record: Meet Maya, 34, a pilot living in Oslo. Maya speaks Greek and Hindi."
    record = {"name": "Maya", "age": 34, "city": "Oslo", "job": "pilot", "languages": ["Greek", "Hindi"]}
    assert json.loads(generate(model, tokenizer, prompt, max_tokens=256, seed=0)) == record


def test_seeded_generation_is_reproducible(default):
    model, tokenizer = default
    a = generate(model, tokenizer, "Hello there", max_tokens=20, seed=3, **FAST)
    b = generate(model, tokenizer, "Hello there", max_tokens=20, seed=3, **FAST)
    c = generate(model, tokenizer, "Hello there", max_tokens=20, seed=4, **FAST)
    assert isinstance(a, str) and a == b and a != c


@pytest.mark.parametrize("max_tokens", [1, 5, 33])
def test_max_tokens_is_exact(default, max_tokens):
    model, tokenizer = default
    done = list(stream_generate(model, tokenizer, "Count with me", max_tokens=max_tokens, seed=0, **FAST))[-1]
    assert isinstance(done, Done)
    s = done.stats
    assert s.generated_tokens <= max_tokens
    assert (done.finish_reason == "length") == (s.generated_tokens == max_tokens)
    canvas = model.args.canvas_length
    assert s.canvases <= -(-max_tokens // canvas)


def test_events_stream_in_order(default):
    model, tokenizer = default
    events = list(
        stream_generate(model, tokenizer, "Tell me a story", max_tokens=70, seed=1, previews=True, **FAST)
    )
    drafts = [e for e in events if isinstance(e, Preview)]
    commits = [e for e in events if isinstance(e, Commit)]
    done = events[-1]
    assert isinstance(done, Done) and all(not isinstance(e, Done) for e in events[:-1])
    assert len(drafts) == done.stats.decoder_passes  # one preview per decoder pass
    assert sum(c.decoder_passes for c in commits) == done.stats.decoder_passes
    assert len(commits) == done.stats.canvases >= 1
    assert "".join(c.text for c in commits) == done.answer and done.text == ""
    assert all(d.text == "" for d in drafts)
    assert sum(len(c.tokens) for c in commits) == done.stats.generated_tokens
    assert done.stats.tokens_per_forward == pytest.approx(
        done.stats.generated_tokens / done.stats.decoder_passes
    )
    assert done.stats.prompt_tokens > 0 and done.stats.peak_memory_gb > 0


def test_eos_ends_the_answer():
    eos = {1, 5}
    assert _keep([7, 8, 5, 9, 1], eos, 10) == ([7, 8], True)
    assert _keep([7, 8, 9], eos, 2) == ([7, 8], False)
    assert _keep([5, 8], eos, 10) == ([], True)


def test_chat_template_system_and_thinking(default):
    _, tokenizer = default
    plain = tokenizer.decode(encode_prompt(tokenizer, "hi"))
    with_system = tokenizer.decode(encode_prompt(tokenizer, "hi", system="You are terse."))
    assert "You are terse." in with_system and "You are terse." not in plain
    thinking = encode_prompt(tokenizer, "hi", thinking=True)
    not_thinking = encode_prompt(tokenizer, "hi", thinking=False)
    assert thinking != not_thinking
    raw = encode_prompt(tokenizer, "hi", use_chat_template=False)
    assert len(raw) < len(encode_prompt(tokenizer, "hi"))
    messages = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
    ]
    assert len(encode_prompt(tokenizer, messages)) > len(encode_prompt(tokenizer, "c"))


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"top_p": 0.9}, ["top_p", "entropy_bound"]),
        ({"repetition_penalty": 1.1}, ["repetition_penalty"]),
        ({"temperature": 0.7, "t_max": 0.5}, ["temperature", "t_max"]),
        ({"temperature": -1.0}, ["temperature"]),
        ({"max_denoising_steps": 0}, ["max_denoising_steps"]),
        ({"t_min": 0.9, "t_max": 0.5}, ["t_max", "t_min"]),
        ({"entropy_bound": 0.0}, ["entropy_bound"]),
        ({"max_tokens": 0}, ["max_tokens"]),
    ],
)
def test_bad_options_are_one_line_errors(default, kwargs, words):
    model, tokenizer = default
    with pytest.raises((GenerationError, SamplerConfigError)) as info:
        generate(model, tokenizer, "hi", **{"max_tokens": 4, **kwargs})
    message = str(info.value)
    assert "\n" not in message and all(w in message for w in words)


def test_empty_and_oversize_prompts(default):
    model, tokenizer = default
    with pytest.raises(GenerationError, match="empty"):
        generate(model, tokenizer, "   ")
    window = model.args.max_position_embeddings
    long_prompt = "word " * (window + 10)
    with pytest.raises(GenerationError) as info:
        generate(model, tokenizer, long_prompt, max_tokens=8)
    assert str(window) in str(info.value) and "context window" in str(info.value)


def cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mlx_dgemma", "generate", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_cli_generates_with_stats():
    out = cli(
        "--prompt", "Hello", "--max-tokens", "12", "--steps", "3", "--seed", "0", "--verbose", "--show-canvas"
    )
    assert out.returncode == 0, out.stderr
    assert "\x1b[" not in out.stdout  # piped: no live redraw
    assert "Generation:" in out.stderr and "tokens per forward" in out.stderr


def test_cli_reads_stdin_and_reports_errors_in_one_line():
    assert cli("--prompt", "-", "--max-tokens", "4", "--steps", "2", stdin="from stdin").returncode == 0
    bad = cli("--prompt", "hi", "--steps", "0")
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0 and bad.stderr.startswith("error:") and "steps" in bad.stderr
    missing = cli("--model", "/nonexistent/folder", "--prompt", "hi")
    assert missing.returncode == 2 and "not found" in missing.stderr and "Traceback" not in missing.stderr


def test_cli_show_canvas_redraws_on_a_terminal():
    """Under a pseudo-terminal, --show-canvas redraws the draft in place with ANSI cursor moves."""
    primary, secondary = pty.openpty()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlx_dgemma",
            "generate",
            "--prompt",
            "Hello",
            "--max-tokens",
            "40",
            "--steps",
            "3",
            "--seed",
            "0",
            "--show-canvas",
        ],
        stdout=secondary,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    os.close(secondary)
    chunks = []
    while True:
        try:
            data = os.read(primary, 4096)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    assert proc.wait(timeout=600) == 0
    screen = b"".join(chunks).decode(errors="replace")
    assert "[canvas 1, step 3]" in screen and "\x1b[2K" in screen


def test_adapter_path_applies_fine_tuned_adapters(tmp_path):
    """load(adapter_path=...) and the CLI's --adapter-path apply adapters saved by mlx_dgemma.train."""
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_unflatten

    from mlx_dgemma.train.lora import LoRAConfig, adapter_config, apply_lora, save_adapters

    model, _ = load()
    apply_lora(model, LoRAConfig())
    trained = {
        k: mx.random.normal(v.shape, key=mx.random.key(i)) * 0.1
        for i, (k, v) in enumerate(tree_flatten(model.trainable_parameters()))
    }
    model.update(tree_unflatten(list(trained.items())))
    save_adapters(
        model, tmp_path / "adapters", adapter_config("lora", LoRAConfig(), model.args.num_hidden_layers)
    )

    base, _ = load()
    tuned, _ = load(adapter_path=tmp_path / "adapters")
    canvas = mx.arange(model.args.canvas_length)[None] + 20
    logits = []
    for m in (base, tuned, model):
        cache = m.make_cache()
        m.encode(mx.array([[2, 40, 41, 42]]), cache)
        logits.append(m.denoise(canvas, cache))
    assert not mx.allclose(logits[0], logits[1]).item()
    assert mx.allclose(logits[1], logits[2], atol=1e-4).item()
    out = cli(
        "--adapter-path", str(tmp_path / "adapters"), "--prompt", "hi", "--max-tokens", "4", "--steps", "2"
    )
    assert out.returncode == 0, out.stderr
    bad = cli("--adapter-path", str(tmp_path / "nothing"), "--prompt", "hi")
    assert bad.returncode == 2 and bad.stderr.startswith("error:") and "Traceback" not in bad.stderr
