"""Tiny random DiffusionGemma checkpoints written by the reference (transformers), and their outputs.

The reference runs in its own process (``tests/reference/make_fixture.py``): our package preloads OpenBLAS,
which slows torch, and a separate process keeps torch and MLX from sharing a BLAS.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import mlx_dgemma  # noqa: F401 (before any test module imports mlx.core: on Linux it preloads OpenBLAS)

ROOT = Path(__file__).resolve().parent
# The embedded default's files (mlx_dgemma/default_model, with its drafter) as a fixture, so that the default can
# change without the tests: the record task on 24-token canvases, whose answers span two canvases (streaming, stop
# sequences and disconnects across canvases, the drafter switching off); its small canvas keeps the tests quick.
DEMO24 = ROOT / "fixtures" / "demo24"
# Demo-task prompts (the embedded model's task) that the drafter and fast-mode tests share.
DEMO_PROMPTS = [
    "Fill the record: Meet Maya, 34, a pilot living in Oslo. Maya speaks Greek and Hindi.",
    "Extract the person as JSON: Bob (51) works as an editor in Lima and speaks French.",
    "JSON record for this text: From Kyoto: Iris, chef, 27 years old, fluent in German and Swahili.",
]
MAKE_FIXTURE = ROOT / "reference" / "make_fixture.py"
# Every wait in the tests waits for an event; a time is only a guard against a hang, never a speed assumption: a
# loaded machine (other suites running beside this one) may take minutes over what takes a second alone.
HANG_S = 600
try:  # httpx waits 5 s by default (connect, read, write): a request a busy machine can outlast; make it a guard
    import httpx

    for _function in (httpx.request, httpx.get, httpx.post, httpx.put, httpx.patch, httpx.delete, httpx.head,
                      httpx.options, httpx.stream, httpx.Client.__init__, httpx.AsyncClient.__init__):
        _function = getattr(_function, "__wrapped__", _function)  # httpx.stream is a context manager
        if "timeout" in (_function.__kwdefaults__ or {}):
            _function.__kwdefaults__["timeout"] = httpx.Timeout(HANG_S)
except ImportError:  # the server's extra is not installed: no test uses httpx
    pass


@pytest.fixture(scope="session", autouse=True)
def _product_time_limits_are_hang_guards():
    """The package's own wall-clock limits on work that a test needs to succeed (a grammar's compile, 20 s; the
    chat template's load-time probe, 60 s) become hang guards: a loaded machine may be slower than they allow.
    Session-wide, so that module-scoped servers load under it; a test of such a limit sets its own value."""
    import mlx_dgemma.chat_template as chat_template
    import mlx_dgemma.constrain as constrain

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(constrain, "COMPILE_TIMEOUT_S", float(HANG_S))
        patch.setattr(chat_template, "PROBE_WALL_S", HANG_S)
        yield


BASE_TEXT = {
    "vocab_size": 512, "hidden_size": 64, "intermediate_size": 96, "moe_intermediate_size": 48,
    "num_hidden_layers": 6, "num_attention_heads": 4, "num_key_value_heads": 2, "num_global_key_value_heads": 1,
    "head_dim": 16, "global_head_dim": 32, "num_experts": 8, "top_k_experts": 2, "sliding_window": 16,
    "max_position_embeddings": 4096, "use_bidirectional_attention": "vision",
}

# Prompts (40 tokens) longer than the sliding window (16); batch rows of different lengths.
SPECS = {
    "base": {"text": BASE_TEXT, "canvas_length": 8, "seed": 0, "prompt_len": 40, "batch_prompt_lens": [30, 19]},
    "narrow": {
        "text": {**BASE_TEXT, "num_attention_heads": 2, "num_key_value_heads": 1, "num_global_key_value_heads": 2,
                 "head_dim": 32, "global_head_dim": 64, "num_experts": 4, "top_k_experts": 1,
                 "moe_intermediate_size": 40, "num_hidden_layers": 7},
        "canvas_length": 12, "seed": 1, "prompt_len": 23, "batch_prompt_lens": [9, 23],
    },
    "wide": {
        "text": {**BASE_TEXT, "hidden_size": 128, "intermediate_size": 128, "moe_intermediate_size": 64,
                 "num_attention_heads": 8, "num_key_value_heads": 4, "num_global_key_value_heads": 2,
                 "head_dim": 32, "global_head_dim": 64, "num_experts": 16, "top_k_experts": 4,
                 "sliding_window": 24, "num_hidden_layers": 12},
        "canvas_length": 16, "seed": 2, "prompt_len": 64, "batch_prompt_lens": [64, 37],
    },
}


def reference_env() -> dict[str, str]:
    """The environment for the reference process: no OpenBLAS preload (it slows torch 3x)."""
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    env["PYTHONHASHSEED"] = "0"
    return env


def make_fixture(spec: dict, out: Path) -> Path:
    subprocess.run(
        [sys.executable, str(MAKE_FIXTURE), "--spec", json.dumps(spec), "--out", str(out)],
        check=True, env=reference_env(), capture_output=True, text=True,
    )
    return out


class Fixture:
    """A fixture folder: checkpoints in several layouts plus the reference's outputs."""

    def __init__(self, name: str, folder: Path):
        self.name, self.folder = name, folder
        self.ref = dict(np.load(folder / "reference.npz"))
        self.hf = folder / "hf"
        self.hf_released = folder / "hf_released"
        self.spec = SPECS.get(name)


_CACHE: dict[str, Fixture] = {}


@pytest.fixture(scope="session")
def fixture_factory(tmp_path_factory):
    def get(name: str) -> Fixture:
        if name not in _CACHE:
            folder = tmp_path_factory.mktemp(f"fixture-{name}")
            _CACHE[name] = Fixture(name, make_fixture(SPECS[name], folder))
        return _CACHE[name]

    return get


@pytest.fixture(scope="session", params=sorted(SPECS))
def fixture(request, fixture_factory) -> Fixture:
    return fixture_factory(request.param)


@pytest.fixture(scope="session")
def base(fixture_factory) -> Fixture:
    return fixture_factory("base")
