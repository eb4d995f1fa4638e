"""DiffusionGemma split over two ranks (``mlx.launch --backend ring -n 2`` over loopback) against one process.

One launch (``tests/distributed_ranks.py``) does everything that needs two ranks: decoder logits on the
embedded model (HF layout) and a 4-bit MLX folder, seeded generation with and without the drafter, the
server (rank 0 answers, rank 1 follows), the generate CLI, and two ranks holding different models.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_dgemma.generation import generate
from mlx_dgemma.model.loader import load_model, load_tokenizer
from mlx_dgemma.model.shard import plan, weight_bytes
from mlx_dgemma.runtime.distributed import DistributedError
from tests.conftest import DEMO24
from tests.distributed_ranks import PROMPT, logits
from tests.layouts import write_mlx_community

ROOT = Path(__file__).resolve().parents[2]
RANKS_SCRIPT = ROOT / "tests" / "distributed_ranks.py"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")
LAUNCH_TIMEOUT = 900  # a generous bound against a hang: the launch takes ~1 minute on two idle cores


def launch(*args: str, n: int = 2, timeout: float = LAUNCH_TIMEOUT) -> subprocess.CompletedProcess:
    """``mlx.launch --backend ring -n N`` of ``tests/distributed_ranks.py`` on free loopback ports."""
    port = random.randrange(20000, 60000, 16)
    cmd = [
        sys.executable,
        "-c",
        "from mlx._distributed_utils.launch import main; main()",
        "--backend",
        "ring",
        "-n",
        str(n),
        "-p",
        str(port),
        "--python",
        sys.executable,
        str(RANKS_SCRIPT),
        *args,
    ]
    # The ranks import this checkout, installed or not.
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    return subprocess.run(
        cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout
    )


def quantized_copy(out: Path) -> Path:
    """The embedded model as a 4-bit (group 32) mlx-community folder, with its tokenizer."""
    write_mlx_community(DEMO24, out, bits=4, group_size=32)
    for name in TOKENIZER_FILES:
        shutil.copy(DEMO24 / name, out / name)
    return out


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("distributed")
    folders = {"default": DEMO24, "q4": quantized_copy(tmp / "q4")}
    for r in range(2):  # the same model, but rank 1's generation config differs: a different checkpoint
        shutil.copytree(DEMO24, tmp / f"mismatch{r}")
    config = json.loads((tmp / "mismatch1" / "generation_config.json").read_text())
    (tmp / "mismatch1" / "generation_config.json").write_text(json.dumps({**config, "max_new_tokens": 7}))
    out = tmp / "out"
    out.mkdir()
    result = launch(
        "--models",
        *(f"{k}={v}" for k, v in folders.items()),
        "--out",
        str(out),
        "--mismatch",
        str(tmp / "mismatch{rank}"),
        "--server",
        str(DEMO24),
        "--cli",
        str(DEMO24),
    )
    # mlx.launch exits 0 even when a rank fails: the ranks' files are the evidence.
    assert all((out / f"rank{r}.npz").is_file() for r in range(2)), (result.stdout + result.stderr)[-3000:]
    return folders, [dict(np.load(out / f"rank{r}.npz")) for r in range(2)], result


@pytest.fixture(scope="module")
def single(ranks):
    """Each model loaded whole in this process, in float32 like the ranks."""
    folders, _, _ = ranks
    return {
        name: (load_model(folder, mx.float32), load_tokenizer(folder)) for name, folder in folders.items()
    }


@pytest.fixture(scope="module")
def answers(single):
    """One process's seeded answers, per model and drafter."""
    return {
        (name, drafter): generate(model, tokenizer, PROMPT, max_tokens=40, seed=3, drafter=drafter)
        for name, (model, tokenizer) in single.items()
        for drafter in ("none", "auto")
    }


@pytest.mark.parametrize("name", ["default", "q4"])
def test_sharded_logits_equal_one_process(ranks, single, name):
    _, results, _ = ranks
    model, tokenizer = single[name]
    for key, want in zip(("logits", "logits_sc"), logits(model, list(tokenizer.encode(PROMPT)))):
        for r in results:
            got = r[f"{name}/{key}"]
            assert got.shape == want.shape
            assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max(), (name, key)
        assert np.array_equal(results[0][f"{name}/{key}"], results[1][f"{name}/{key}"])


@pytest.mark.parametrize("name", ["default", "q4"])
def test_seeded_generation_gives_the_same_text(ranks, answers, name):
    _, results, _ = ranks
    for drafter in ("none", "auto"):
        want = answers[name, drafter]
        assert want
        for r in results:
            assert json.loads(str(r[f"{name}/text_{drafter}"])) == want, (name, drafter)


@pytest.mark.parametrize("name", ["default", "q4"])
def test_each_rank_holds_its_share_of_the_weights(ranks, single, name):
    """Split modules hold half their bytes on each rank; everything else is whole on both."""
    _, results, _ = ranks
    model, _ = single[name]
    cuts, _ = plan(model, 2, 0)
    split = sum(v.nbytes for k, v in tree_flatten(model.parameters()) if k.rsplit(".", 1)[0] in cuts)
    whole = weight_bytes(model)
    assert split > whole / 3
    for r in results:
        assert int(r[f"{name}/weight_bytes"]) == pytest.approx(whole - split / 2, rel=0.02)


def test_server_on_two_ranks_answers_as_one_process(ranks, answers):
    """Plain and streamed chat as one process; a request with an image is answered, and its processed pixels
    reach rank 1 unchanged."""
    _, results, _ = ranks
    want = answers["default", "auto"]  # the server's default drafter is the model's own
    plain, streamed, image = json.loads(str(results[0]["server"]))
    assert [plain, streamed] == [want, want]
    status, body = image.split(" ", 1)
    assert status == "200", body
    assert json.loads(body)["choices"][0]["message"]["content"]
    assert json.loads(str(results[1]["server"])) == []
    pixels = [json.loads(str(r["pixels"])) for r in results]
    assert len(pixels[0]) == 1 and pixels[0] == pixels[1]


def test_generate_cli_prints_on_rank_0_only(ranks, answers):
    *_, result = ranks
    want = answers["default", "auto"]
    assert result.stdout.count(want) == 1, result.stdout


def test_ranks_with_different_models_refuse_in_one_line(ranks):
    _, results, _ = ranks
    for r in results:
        message = str(r["mismatch"])
        assert "rank 1 has another model than rank 0" in message and "same checkpoint folder" in message
        assert "\n" not in message


def test_more_ranks_than_the_model_splits_into(tmp_path):
    model = load_model(DEMO24)  # 2 key/value heads in its sliding layers
    with pytest.raises(DistributedError, match=r"cannot split this model over 3 ranks: .* 1, 2 ranks"):
        plan(model, 3, 0)
    quantized = load_model(quantized_copy(tmp_path / "q4"))
    cuts, _ = plan(quantized, 2, 1)  # expert width 64 = 2 groups of 32: one each
    assert cuts["model.decoder.layers.0.experts.down_proj"].ranges == ((32, 64),)


def test_unreachable_rank_times_out_with_one_line(tmp_path):
    """Rank 0 of two, with no rank 1 listening: an error after the connect timeout, not a hang."""
    hostfile = tmp_path / "hosts.json"
    port = random.randrange(20000, 60000, 16)
    hostfile.write_text(json.dumps([[f"127.0.0.1:{port}"], [f"127.0.0.1:{port + 1}"]]))
    env = {**os.environ, "MLX_RANK": "0", "MLX_HOSTFILE": str(hostfile), "MLX_DGEMMA_CONNECT_TIMEOUT": "2"}
    r = subprocess.run(
        [sys.executable, "-m", "mlx_dgemma", "generate", "--max-tokens", "8"],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode != 0  # ended by its watchdog: init cannot be interrupted from Python
    assert r.stderr.strip().startswith("error: rank 0 could not reach the other ranks within 2 s")
    assert len(r.stderr.strip().splitlines()) == 1
