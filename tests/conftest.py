"""Tiny random DiffusionGemma checkpoints written by the reference (transformers), and their outputs.

The reference runs in its own process (``tests/reference/make_fixture.py``): our package preloads OpenBLAS,
which slows torch, and a separate process keeps torch and MLX from sharing a BLAS.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
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
HANG_S = int(os.environ.get("MLX_DGEMMA_TEST_HANG_S", "600"))  # a hang guard, never a speed check
try:  # httpx waits 5 s by default (connect, read, write): a request a busy machine can outlast; make it a guard
    import httpx

    for _function in (
        httpx.request,
        httpx.get,
        httpx.post,
        httpx.put,
        httpx.patch,
        httpx.delete,
        httpx.head,
        httpx.options,
        httpx.stream,
        httpx.Client.__init__,
        httpx.AsyncClient.__init__,
    ):
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
    import mlx_dgemma.decoding.constrain as constrain
    import mlx_dgemma.prompt.chat_template as chat_template

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(constrain, "COMPILE_TIMEOUT_S", float(HANG_S))
        patch.setattr(chat_template, "PROBE_WALL_S", HANG_S)
        yield


BASE_TEXT = {
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 96,
    "moe_intermediate_size": 48,
    "num_hidden_layers": 6,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_global_key_value_heads": 1,
    "head_dim": 16,
    "global_head_dim": 32,
    "num_experts": 8,
    "top_k_experts": 2,
    "sliding_window": 16,
    "max_position_embeddings": 4096,
    "use_bidirectional_attention": "vision",
}

# Prompts (40 tokens) longer than the sliding window (16); batch rows of different lengths.
SPECS = {
    "base": {
        "text": BASE_TEXT,
        "canvas_length": 8,
        "seed": 0,
        "prompt_len": 40,
        "batch_prompt_lens": [30, 19],
    },
    "narrow": {
        "text": {
            **BASE_TEXT,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "num_global_key_value_heads": 2,
            "head_dim": 32,
            "global_head_dim": 64,
            "num_experts": 4,
            "top_k_experts": 1,
            "moe_intermediate_size": 40,
            "num_hidden_layers": 7,
        },
        "canvas_length": 12,
        "seed": 1,
        "prompt_len": 23,
        "batch_prompt_lens": [9, 23],
    },
    "wide": {
        "text": {
            **BASE_TEXT,
            "hidden_size": 128,
            "intermediate_size": 128,
            "moe_intermediate_size": 64,
            "num_attention_heads": 8,
            "num_key_value_heads": 4,
            "num_global_key_value_heads": 2,
            "head_dim": 32,
            "global_head_dim": 64,
            "num_experts": 16,
            "top_k_experts": 4,
            "sliding_window": 24,
            "num_hidden_layers": 12,
        },
        "canvas_length": 16,
        "seed": 2,
        "prompt_len": 64,
        "batch_prompt_lens": [64, 37],
    },
}


def reference_env() -> dict[str, str]:
    """The environment for the reference process: no OpenBLAS preload (it slows torch 3x)."""
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    env["PYTHONHASHSEED"] = "0"
    return env


# Reference fixtures are kept between runs (the reference's torch process is most of a parity test's time), keyed
# by everything that decides their contents: the spec, the builder scripts and the reference's versions.
# MLX_DGEMMA_TEST_CACHE=0 turns the cache off; another path moves it.
FIXTURE_CACHE = os.environ.get(
    "MLX_DGEMMA_TEST_CACHE", str(Path.home() / ".cache" / "mlx_dgemma" / "test-fixtures")
)


def _fixture_key(script: Path, spec: dict) -> str:
    from importlib.metadata import PackageNotFoundError, version

    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode() + script.name.encode())
    for builder in sorted((ROOT / "reference").glob("*.py")):
        digest.update(builder.read_bytes())
    for package in ("torch", "transformers", "numpy", "safetensors"):
        try:
            digest.update(f"{package}={version(package)}".encode())
        except PackageNotFoundError:
            digest.update(package.encode())
    return digest.hexdigest()[:24]


def run_reference(script: Path, spec: dict, out: Path) -> Path:
    """``script --spec SPEC --out OUT`` in its own process, or a copy of the same run kept in ``FIXTURE_CACHE``."""
    cached = None if FIXTURE_CACHE == "0" else Path(FIXTURE_CACHE) / _fixture_key(script, spec)
    if cached is not None and (cached / "reference.npz").exists():
        shutil.copytree(cached, out, dirs_exist_ok=True)
        return out
    subprocess.run(
        [sys.executable, str(script), "--spec", json.dumps(spec), "--out", str(out)],
        check=True,
        env=reference_env(),
        capture_output=True,
        text=True,
    )
    if cached is not None:
        with contextlib.suppress(OSError):  # a read-only or full home: the next run builds it again
            cached.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=cached.name + ".", dir=cached.parent))
            shutil.copytree(out, staging, dirs_exist_ok=True)
            try:
                os.replace(staging, cached)  # whole or not at all
            except OSError:  # a concurrent run got there first: keep its copy
                shutil.rmtree(staging, ignore_errors=True)
    return out


def make_fixture(spec: dict, out: Path) -> Path:
    return run_reference(MAKE_FIXTURE, spec, out)


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


# The quick tier (``pytest -m "not slow"``) leaves out the tests that start the reference's torch process (when its
# fixtures are not cached yet) or several MLX ranks; the README's full command runs everything, as CI does.
_SLOW_FIXTURES = {"fixture", "base", "fixture_factory", "vfx", "vision_factory"}
_SLOW_FILES = {"test_distributed.py"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name in _SLOW_FILES or _SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
