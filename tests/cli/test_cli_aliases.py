"""The generate CLI takes mlx-lm's and mlx-vlm's names, refuses abbreviations, and hints at AR-only flags.

Runs ``main`` in-process with the real embedded model; ``stream_generate`` is wrapped to record what the
command line turned into.
"""

from __future__ import annotations

import io
import subprocess
import sys
from dataclasses import replace

import pytest

import mlx_dgemma.generation as generation
from mlx_dgemma import load
from mlx_dgemma.cli.generate import UNSUPPORTED_FLAGS, main
from mlx_dgemma.cli.shared import AR_ONLY_FLAGS
from tests.conftest import DEMO24


@pytest.fixture(scope="module")
def demo():
    return load(DEMO24)


@pytest.fixture
def calls(demo, monkeypatch):
    import mlx_dgemma.model.loader as loader

    seen: list[dict] = []
    real = generation.prepare

    def recording(model, tokenizer, prompt, max_tokens=None, **kw):
        request = real(model, tokenizer, prompt, 4, **kw)
        # What the options came to: the schedule the sampler runs (temperature mapped), besides the call's kwargs.
        seen.append({"prompt": prompt, **kw, "t_max": request.sampler.t_max, "t_min": request.sampler.t_min})
        request.sampler = replace(
            request.sampler, max_denoising_steps=2
        )  # fast: these tests are about the options
        return request

    monkeypatch.setattr(generation, "prepare", recording)
    monkeypatch.setattr(loader, "load", lambda *a, **k: demo)
    return seen


def run(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        rc = main(list(argv))
    except SystemExit as e:
        rc = e.code
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--temp", "0.6"], {"t_max": 0.6, "t_min": 0.3}),
        (["--temperature", "0.6"], {"t_max": 0.6, "t_min": 0.3}),
        (["--temp", "0"], {"t_max": 0.01, "t_min": 0.005}),
        (["--system-prompt", "Be brief."], {"system": "Be brief."}),
        (["--system", "Be brief."], {"system": "Be brief."}),
        (["--ignore-chat-template"], {"use_chat_template": False}),
        (
            ["--chat-template-config", '{"enable_thinking": true}'],
            {"chat_template_kwargs": {"enable_thinking": True}, "thinking": None},
        ),
        (["--max-denoising-steps", "3"], {"max_denoising_steps": 3}),
        (["--steps", "3"], {"max_denoising_steps": 3}),
        (["--seed", str(2**64 - 1)], {"seed": 2**64 - 1}),
    ],
)
def test_aliases_mean_what_they_mean_in_mlx_lm(calls, capsys, argv, expected):
    rc, _, err = run(capsys, "--prompt", "hi", *argv)
    assert rc == 0, err
    got = {k: calls[-1][k] for k in expected}
    assert got == pytest.approx(expected) if "t_max" in expected else got == expected


@pytest.mark.parametrize(
    ("argv", "stats"),
    [
        (["--verbose"], True),
        (["--verbose", "True"], True),
        (["--verbose=false"], False),
        (["--verbose", "F"], False),
        (["-v"], True),
        ([], False),
    ],
)
def test_verbose_takes_an_optional_bool(calls, capsys, argv, stats):
    rc, _, err = run(capsys, "--prompt", "hi", *argv)
    assert rc == 0 and ("Generation:" in err) == stats


def test_trust_remote_code_and_log_level_are_accepted(calls, capsys):
    rc, _, err = run(capsys, "--prompt", "hi", "--trust-remote-code", "--log-level", "info")
    assert rc == 0 and "--trust-remote-code is ignored" in err
    assert run(capsys, "--prompt", "hi", "--log-level", "DEBUG")[0] == 0
    rc, _, err = run(capsys, "--prompt", "hi", "--log-level", "loud")
    assert rc == 2 and err.count("\n") == 1 and "DEBUG" in err


@pytest.mark.parametrize("flag", sorted(AR_ONLY_FLAGS))
def test_autoregressive_flags_get_a_one_line_hint(calls, capsys, flag):
    rc, _, err = run(capsys, "--prompt", "hi", flag, "1")
    assert rc == 2 and err.count("\n") == 1
    assert err.startswith(f"error: {flag} is for autoregressive decoding") and "instead" in err
    assert not calls  # refused before loading anything


@pytest.mark.parametrize("flag", sorted(UNSUPPORTED_FLAGS))
def test_other_mlx_lm_flags_say_what_to_do(calls, capsys, flag):
    rc, _, err = run(capsys, "--prompt", "hi", flag, "1")
    assert (
        rc == 2 and err.count("\n") == 1 and err.startswith(f"error: {flag} has no counterpart") and not calls
    )


@pytest.mark.parametrize("argv", [["--tem", "0.5"], ["--temp-ma", "0.5"], ["--max-denoising", "3"]])
def test_abbreviations_are_refused(calls, capsys, argv):
    rc, _, err = run(capsys, "--prompt", "hi", *argv)
    assert rc == 2 and err.count("\n") == 1 and argv[0] in err and not calls


@pytest.mark.parametrize(
    ("argv", "word"),
    [
        (["--seed", "-1"], "seed"),
        (["--seed", str(2**64)], "seed"),
        (["--seed", "x"], "seed"),
        (["--temp", "0.5", "--temp-max", "0.9"], "--temp"),
        (["--chat-template-config", "[1]"], "JSON object"),
        (["--chat-template-config", "{"], "JSON"),
        (["--verbose", "maybe"], "True or False"),
    ],
)
def test_bad_values_are_one_line_errors(calls, capsys, argv, word):
    rc, _, err = run(capsys, "--prompt", "hi", *argv)
    assert rc == 2 and err.count("\n") == 1 and err.startswith("error:") and word in err, err


def test_stdin_must_be_utf8(calls, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO("héllo".encode())))
    assert run(capsys, "--prompt", "-")[0] == 0 and calls[-1]["prompt"] == "héllo"
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"caf\xe9 \xff")))
    rc, _, err = run(capsys, "--prompt", "-")
    assert rc == 2 and err.count("\n") == 1 and "UTF-8" in err


def test_non_utf8_stdin_in_a_real_process():
    out = subprocess.run(
        [sys.executable, "-m", "mlx_dgemma", "generate", "--prompt", "-"],
        input=b"\xff\xfe\x00",
        capture_output=True,
        timeout=600,
    )
    assert out.returncode == 2 and b"Traceback" not in out.stderr and b"UTF-8" in out.stderr
