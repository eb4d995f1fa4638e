"""The converter: layout, equivalence, streaming memory, atomic output, bad input, LM Studio export, CLI."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import select
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlx_dgemma import DEFAULT_MODEL, CheckpointError, generate, load, load_model
from mlx_dgemma.convert import ConvertError, convert, stream
from mlx_dgemma.convert import cli as convert_cli
from mlx_dgemma.convert.layout import is_vision
from mlx_dgemma.convert.lmstudio import lmstudio_home
from mlx_dgemma.convert.progress import Progress
from mlx_dgemma.model.loader import check_safetensors, load_weights
from tests.conftest import HANG_S, MAKE_FIXTURE, SPECS, reference_env
from tests.layouts import write_mlx_community

ROOT = Path(__file__).resolve().parents[2]


def run_convert(src: Path, dst: Path, **kwargs):
    return convert(src, dst, progress=False, **kwargs)


def tensors(folder: Path) -> dict[str, mx.array]:
    return load_weights(folder)


def config_of(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def denoise_logits(model, ref: dict, self_conditioning: bool = True) -> mx.array:
    cache = model.make_cache()
    model.encode(mx.array(ref["prompt"]), cache)
    sc = mx.array(ref["sc_logits"]) if self_conditioning else None
    return model.denoise(mx.array(ref["canvas1"]), cache, sc)


def assert_same_tensors(a: dict[str, mx.array], b: dict[str, mx.array]) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
        assert mx.array_equal(a[key], b[key]).item(), key


def folder_digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def one_line_error(exc_type, fn, *args, **kwargs) -> str:
    with pytest.raises(exc_type) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message and message
    return message


class Checkpoint:
    """A checkpoint written by the reference (both HF layouts, vision tower included), and model inputs."""

    def __init__(self, folder: Path, vocab: int, seed: int = 0):
        self.hf, self.hf_released = folder / "hf", folder / "hf_released"
        rng = np.random.default_rng(seed)
        self.ref = {
            "prompt": rng.integers(4, vocab - 4, (1, 40)).astype(np.int32),
            "canvas1": rng.integers(4, vocab - 4, (1, 16)).astype(np.int32),
            "sc_logits": (3 * rng.standard_normal((1, 16, vocab))).astype(np.float32),
        }


@pytest.fixture(scope="module")
def wide(tmp_path_factory) -> Checkpoint:
    """The ``wide`` spec (every quantized width a multiple of the group size 64), checkpoints only: these tests
    compare our outputs with each other, so the reference's own outputs are not needed."""
    folder = tmp_path_factory.mktemp("convert-wide")
    subprocess.run(
        [
            sys.executable,
            str(MAKE_FIXTURE),
            "--spec",
            json.dumps(SPECS["wide"]),
            "--out",
            str(folder),
            "--scenarios",
            "none",
        ],
        check=True,
        env=reference_env(),
        capture_output=True,
    )
    return Checkpoint(folder, SPECS["wide"]["text"]["vocab_size"])


# -- the output: layout and equivalence -----------------------------------------------------------------------


def test_unquantized_output_matches_source(wide, tmp_path):
    """The released (sharded) checkpoint converts into a folder that computes the same logits."""
    out = run_convert(wide.hf_released, tmp_path / "out").path
    assert (out / "model.safetensors").is_file()  # one shard: named as mlx-lm names it
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(tensors(out))
    config = config_of(out)
    assert config["model_type"] == "diffusion_gemma" and "quantization" not in config
    source, converted = load_model(wide.hf, dtype=mx.float32), load_model(out, dtype=mx.float32)
    for sc in (False, True):
        diff = (
            mx.abs(denoise_logits(source, wide.ref, sc) - denoise_logits(converted, wide.ref, sc))
            .max()
            .item()
        )
        assert diff <= 1e-5, diff


@pytest.mark.parametrize("bits", [None, 4, 8])
def test_layout_is_mlx_community(wide, tmp_path, bits):
    """Text-only output is tensor for tensor (bitwise) the mlx-community layout, same quantization block."""
    ours = run_convert(
        wide.hf_released, tmp_path / "ours", quantize=bits is not None, q_bits=bits or 4, drop_vision=True
    ).path
    theirs = write_mlx_community(wide.hf_released, tmp_path / "theirs", bits=bits)
    assert_same_tensors(tensors(ours), tensors(theirs))
    ours_config, theirs_config = config_of(ours), config_of(theirs)
    assert ours_config.pop("vision_config") is None and theirs_config.pop("vision_config")
    assert ours_config == theirs_config  # quantization and quantization_config included


def test_vision_tower_kept_by_default_unquantized(wide, tmp_path):
    out = run_convert(wide.hf, tmp_path / "out", quantize=True).path
    ours = tensors(out)
    text_only = tensors(write_mlx_community(wide.hf_released, tmp_path / "theirs", bits=4))
    source = tensors(wide.hf)
    vision = {k for k in ours if is_vision(k)}
    assert vision == {k for k in source if is_vision(k)} and vision
    assert set(ours) - vision == set(text_only)
    for key in vision:
        assert mx.array_equal(ours[key], source[key]).item(), key
    config = config_of(out)
    assert config["vision_config"] and not any(is_vision(k) for k in config["quantization"])
    # save_pretrained's per_layer_config becomes the released form, which mlx-vlm reads
    text = config["text_config"]
    assert "per_layer_config" not in text and (
        text["global_head_dim"],
        text["num_global_key_value_heads"],
    ) == (64, 2)
    load_model(out)  # our loader skips the vision tower


def dequantized_copy(folder: Path, out: Path) -> Path:
    """The same folder with every quantized tensor expanded back to float32, no quantization block."""
    weights = tensors(folder)
    config = config_of(folder)
    q = config.pop("quantization")
    config.pop("quantization_config")
    for key in [k for k in weights if k.endswith(".scales")]:
        module = key.removesuffix(".scales")
        spec = q.get(module, q)
        weights[f"{module}.weight"] = mx.dequantize(
            weights[f"{module}.weight"],
            weights.pop(key),
            weights.pop(f"{module}.biases"),
            spec["group_size"],
            spec["bits"],
        )
    out.mkdir()
    mx.save_safetensors(str(out / "model.safetensors"), weights)
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.mark.parametrize("recipe", ["mixed", "uniform"])
def test_quantized_output_computes_its_dequantized_weights(wide, tmp_path, recipe):
    out = run_convert(wide.hf, tmp_path / "q", quantize=True, q_recipe=recipe, shard_size=1 << 20).path
    model = load_model(out, dtype=mx.float32)
    layer = model.layers[0]
    assert isinstance(model.model.decoder.embed_tokens, nn.QuantizedEmbedding)
    assert layer.experts.gate_up_proj.bits == 4
    assert layer.self_attn.q_proj.bits == (8 if recipe == "mixed" else 4)
    assert model.model.decoder.self_conditioning.gate_proj.bits == 4
    plain = load_model(dequantized_copy(out, tmp_path / "plain"), dtype=mx.float32)
    ours, expected = denoise_logits(model, wide.ref), denoise_logits(plain, wide.ref)
    err = (mx.abs(ours - expected).max() / mx.abs(expected).max()).item()
    assert err < 1e-4, err


def test_every_supported_bit_width_loads_back(wide, tmp_path):
    for bits, group_size in ((2, 64), (3, 32), (5, 128), (6, 64)):
        out = run_convert(
            wide.hf,
            tmp_path / f"q{bits}",
            quantize=True,
            q_bits=bits,
            q_group_size=group_size,
            q_recipe="uniform",
            drop_vision=True,
        ).path
        q = config_of(out)["quantization"]
        assert q == {
            "group_size": group_size,
            "bits": bits,
            "mode": "affine",
        }  # uniform: no per-module entries
        model = load_model(out, dtype=mx.float32)
        experts = model.layers[0].experts.gate_up_proj
        assert (experts.bits, experts.group_size) == (bits, group_size)
        assert mx.isfinite(denoise_logits(model, wide.ref)).all().item()


def test_dtype_is_applied(wide, tmp_path):
    out = run_convert(wide.hf, tmp_path / "bf16", dtype="bfloat16", quantize=True).path
    weights = tensors(out)
    floats = {v.dtype for v in weights.values() if mx.issubdtype(v.dtype, mx.floating)}
    assert floats == {mx.bfloat16} and config_of(out)["dtype"] == "bfloat16"
    logits = denoise_logits(load_model(out), wide.ref)
    assert logits.dtype == mx.float32 and mx.isfinite(logits).all().item()


def test_sidecar_files_and_model_card(wide, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(wide.hf, src)
    sidecars = {
        "tokenizer.json": "{}",
        "tokenizer_config.json": '{"chat_template": "x"}',
        "chat_template.jinja": "{{ messages }}",
        "special_tokens_map.json": "{}",
        "LICENSE": "Apache",
    }
    for name, text in sidecars.items():
        (src / name).write_text(text)
    (src / "pytorch_model.bin").write_bytes(b"not copied")
    (src / "README.md").write_text("the source card")
    out = run_convert(src, tmp_path / "out", quantize=True).path
    for name in [*sidecars, "generation_config.json"]:
        assert (out / name).read_bytes() == (src / name).read_bytes(), name
    assert not (out / "pytorch_model.bin").exists()
    card = (out / "README.md").read_text()
    assert "src" in card and "mixed 4-bit" in card and "library_name: mlx" in card


def test_default_model_end_to_end(tmp_path):
    """The embedded model (bf16, real tokenizer and chat template) converts into folders ``load`` runs: the
    unquantized one generates exactly what the source generates."""
    plain = run_convert(DEFAULT_MODEL, tmp_path / "plain").path
    q4 = run_convert(DEFAULT_MODEL, tmp_path / "q4", quantize=True).path
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        assert (plain / name).read_bytes() == (DEFAULT_MODEL / name).read_bytes(), name
    assert config_of(plain)["dtype"] == "bfloat16"

    def haiku(folder: Path) -> str:
        return generate(*load(folder), "Write a haiku.", max_tokens=8, max_denoising_steps=4, seed=0)

    assert haiku(plain) == haiku(DEFAULT_MODEL)
    assert isinstance(haiku(q4), str)


def test_shards_are_valid_safetensors(wide, tmp_path):
    limit = 1 << 20
    out = run_convert(wide.hf, tmp_path / "out", shard_size=limit).path
    files = sorted(out.glob("model-*.safetensors"))
    assert len(files) > 3 and [f.name for f in files] == stream.shard_names(len(files))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    from safetensors.numpy import load_file

    total = 0
    for file in files:
        check_safetensors(file)
        ours, numpy_view = mx.load(str(file)), load_file(str(file))  # the reference reader agrees
        assert sorted(ours) == sorted(numpy_view)
        for key, value in numpy_view.items():
            assert np.array_equal(np.array(ours[key]), value)
            assert index["weight_map"][key] == file.name
        size = sum(v.nbytes for v in numpy_view.values())
        assert size <= limit or len(numpy_view) == 1
        total += size
    assert index["metadata"]["total_size"] == total


def test_mlx_community_source_reconverts(wide, tmp_path):
    """An unquantized mlx-community folder is a valid source: quantizing it gives what the HF checkpoint gives."""
    community = write_mlx_community(wide.hf_released, tmp_path / "community")
    a = run_convert(community, tmp_path / "a", quantize=True).path
    b = run_convert(wide.hf_released, tmp_path / "b", quantize=True, drop_vision=True).path
    assert_same_tensors(tensors(a), tensors(b))


# -- bounded memory -----------------------------------------------------------------------------------------

BIG_TEXT = {
    "vocab_size": 4096,
    "hidden_size": 256,
    "intermediate_size": 256,
    "moe_intermediate_size": 128,
    "num_hidden_layers": 8,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_global_key_value_heads": 1,
    "head_dim": 64,
    "global_head_dim": 128,
    "num_experts": 16,
    "top_k_experts": 2,
    "sliding_window": 64,
}

MEMORY_SCRIPT = """
import json, sys
from pathlib import Path
import mlx.core as mx
from mlx_dgemma.convert import convert

def status(field):
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(field))
    return int(line.split()[1]) * 1024

mx.eval(mx.zeros((4,)) + 1)
Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) restarts from the current RSS
base = status("VmRSS")
convert(sys.argv[1], sys.argv[2], quantize=sys.argv[4] == "q4", shard_size=int(sys.argv[3]), progress=False)
print(status("VmHWM") - base)
"""


def write_big_hf_checkpoint(folder: Path) -> tuple[int, int]:
    """A ~69 MB float32 checkpoint in the HF layout (two shards); returns (total bytes, largest tensor bytes)."""
    from mlx.utils import tree_flatten
    from safetensors.numpy import save_file

    from mlx_dgemma import Model, ModelArgs

    shapes = {k: v.shape for k, v in tree_flatten(Model(ModelArgs(**BIG_TEXT)).parameters())}
    rng = np.random.default_rng(0)
    weights = {
        (k.removesuffix(".weight") if ".experts." in k else k): rng.random(s, dtype=np.float32) - 0.5
        for k, s in shapes.items()
    }
    keys = sorted(weights)
    folder.mkdir()
    weight_map = {}
    for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2 :])):
        name = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({k: weights[k] for k in part}, str(folder / name))
        weight_map.update(dict.fromkeys(part, name))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (folder / "config.json").write_text(
        json.dumps({"model_type": "diffusion_gemma", "text_config": BIG_TEXT})
    )
    return sum(w.nbytes for w in weights.values()), max(w.nbytes for w in weights.values())


@pytest.mark.skipif(
    not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc to measure peak RSS"
)
def test_peak_memory_is_bounded_by_the_largest_tensor(tmp_path):
    """Peak RSS growth stays near the largest tensor, far below the model size, even with shards larger
    than that bound: shards are streamed to disk tensor by tensor, never assembled in memory."""
    total, largest = write_big_hf_checkpoint(tmp_path / "src")
    shard_size = 32 << 20
    # One source tensor, its cast copy and its quantized outputs, plus allocator and interpreter slack.
    bound = 3 * largest + (8 << 20)
    assert bound < shard_size < total  # a writer that buffered a shard, or the model, would fail
    growth = {}
    for kind in ("plain", "q4"):  # each in a fresh process
        result = subprocess.run(
            [
                sys.executable,
                "-c",
                MEMORY_SCRIPT,
                str(tmp_path / "src"),
                str(tmp_path / kind),
                str(shard_size),
                kind,
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        growth[kind] = int(result.stdout.strip().splitlines()[-1])
    print(
        f"\nmodel {total / 1e6:.1f} MB, largest tensor {largest / 1e6:.1f} MB, shard {shard_size / 1e6:.0f} MB, "
        f"bound {bound / 1e6:.1f} MB; peak RSS growth: "
        + ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in growth.items())
    )
    assert max(growth.values()) < bound, growth


# -- atomic output -----------------------------------------------------------------------------------------

# The converter in a child process, with a hook: it stops after the first shard until the test acts (an event,
# never a time), or kills itself at a named step of publishing (staging.reached), as a power cut or kill -9 would.
CHILD = """
import os, signal, sys
import mlx_dgemma.convert.staging as staging
import mlx_dgemma.convert.stream as stream
mode, point, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
if mode == "hold":
    write_shard = stream.write_shard

    def held(*args, **kwargs):
        write_shard(*args, **kwargs)
        print("shard written", flush=True)
        sys.stdin.readline()  # until the test signals, or closes stdin

    stream.write_shard = held
else:
    def reached(name):
        if name == point:
            os.kill(os.getpid(), signal.SIGKILL)

    staging.reached = reached
    if mode == "no-exchange":
        staging.exchange = lambda a, b: False
from mlx_dgemma.convert.cli import main
sys.exit(main(argv))
"""


def child(mode: str, point: str, *argv: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", CHILD, mode, point, *map(str, argv)], text=True, **kwargs)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_interrupted_conversion_leaves_no_model(wide, tmp_path, sig):
    target = tmp_path / "out"
    with open(
        tmp_path.parent / f"{tmp_path.name}-stderr.txt", "w+"
    ) as err:  # a file: a full pipe cannot block it
        proc = child(
            "hold",
            "",
            "--hf-path",
            wide.hf_released,
            "--mlx-path",
            target,
            "--shard-size",
            "300KB",
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=err,
        )
        try:
            ready, _, _ = select.select([proc.stdout], [], [], HANG_S)
            line = proc.stdout.readline().strip() if ready else ""
            assert line == "shard written", err.seek(0) or err.read()
            partial = [p for p in tmp_path.iterdir() if p.name.startswith(".out.partial-")]
            assert len(partial) == 1 and list(partial[0].glob("model/model-*.safetensors"))  # it had started
            proc.send_signal(sig)
            proc.wait(timeout=HANG_S)
        finally:
            proc.kill()
            proc.communicate()
    assert not target.exists()
    leftovers = [p for p in tmp_path.iterdir() if p.name != "out"]
    if sig == signal.SIGTERM:
        assert proc.returncode == 130 and leftovers == []
    else:  # killed outright: a hidden partial folder remains, which no loader accepts
        assert proc.returncode == -signal.SIGKILL and leftovers == partial
        one_line_error(CheckpointError, load_model, partial[0])
    run_convert(wide.hf_released, target)  # the next run succeeds and removes the leftover
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    load_model(target)


def killed_at(point: str, src: Path, target: Path, exchange: bool = True) -> None:
    """Run the converter with --force -q into ``target`` and kill it (SIGKILL) at ``point`` of publishing."""
    proc = child(
        "exchange" if exchange else "no-exchange",
        point,
        "--hf-path",
        src,
        "--mlx-path",
        target,
        "--force",
        "-q",
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    _, err = proc.communicate(timeout=HANG_S)
    assert proc.returncode == -signal.SIGKILL, err


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize(
    ("exchange", "point", "after", "kinds"),
    [
        (True, "staged", "old", ["partial"]),
        (True, "committed", "new", ["partial"]),
        (False, "staged", "old", ["partial"]),
        (False, "moved-aside", None, ["old", "partial"]),
        (False, "swapped", "new", ["old", "partial"]),
        (False, "committed", "new", ["partial"]),
    ],
)
def test_force_killed_while_publishing_keeps_a_whole_model(wide, tmp_path, exchange, point, after, kinds):
    """kill -9 at each step of replacing a model: the target holds the old or the new one, whole, or (only between
    the two renames of the fallback) the next run puts the old one back; nothing is left over after it."""
    target = tmp_path / "out"
    run_convert(wide.hf, target)
    old = folder_digest(target)
    killed_at(point, wide.hf, target, exchange)
    left = hidden(tmp_path)
    assert [name.split("-")[0] for name in left] == [f".out.{kind}" for kind in kinds]
    assert all((tmp_path / name / ".mlx_dgemma-convert").is_file() for name in left)  # marked: provably ours
    if after is None:  # between the two renames: the previous model waits in the marked folder
        assert not target.exists() and folder_digest(tmp_path / left[0] / "model") == old
    else:
        assert ("quantization" in config_of(target)) == (after == "new")
        if after == "old":
            assert folder_digest(target) == old
        load_model(target)
    # the next run (here killed at the same step again) first restores and cleans up what the last one left
    killed_at(point, wide.hf, target, exchange)
    again = hidden(tmp_path)
    assert len(again) == len(left) and not set(again) & set(left)  # its own leftovers only, not two runs'
    message = one_line_error(ConvertError, run_convert, wide.hf, target)  # without --force: refused, but ...
    assert "--force" in message and hidden(tmp_path) == []  # ... what the killed run left was cleaned up
    if after != "new":
        assert folder_digest(target) == old
    load_model(target)


def test_leftovers_are_named_and_only_ours_are_removed(wide, tmp_path, capsys):
    from mlx_dgemma.convert import staging

    target = tmp_path / "out"
    foreign = tmp_path / ".out.partial-999999999-0000"  # our name, but no marker: never deleted
    (foreign / "model").mkdir(parents=True)
    (foreign / "model" / "notes.txt").write_text("keep me")
    (tmp_path / ".out.old-999999999-0001").mkdir()  # killed before writing its marker: empty, removed
    ours = staging.make_marked_dir(target, staging.PARTIAL)
    ours.rename(tmp_path / ours.name.replace(f"-{os.getpid()}-", "-999999999-"))  # of a process that is gone
    run_convert(wide.hf, target)
    assert hidden(tmp_path) == [foreign.name] and (foreign / "model" / "notes.txt").read_text() == "keep me"
    lines = [line for line in capsys.readouterr().err.splitlines() if str(target) in line]  # one line each
    assert len(lines) == 2 and "removed 2 leftover folder(s)" in lines[0] and foreign.name in lines[1]


def test_fallback_swap_puts_the_old_model_back_when_the_second_rename_fails(wide, tmp_path, monkeypatch):
    from mlx_dgemma.convert import staging

    target = tmp_path / "out"
    run_convert(wide.hf, target)
    old = folder_digest(target)
    monkeypatch.setattr(staging, "exchange", lambda a, b: False)

    def reached(point):
        if point == "moved-aside":
            raise OSError(errno.EIO, "simulated failure", str(target))

    monkeypatch.setattr(staging, "reached", reached)
    message = one_line_error(ConvertError, run_convert, wide.hf, target, force=True, quantize=True)
    assert "simulated failure" in message
    assert folder_digest(target) == old and hidden(tmp_path) == []


def test_exchange_swaps_two_folders_atomically(tmp_path):
    from mlx_dgemma.convert.staging import exchange

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "A").touch()
    (tmp_path / "b").mkdir()
    if not exchange(tmp_path / "a", tmp_path / "b"):
        pytest.skip(
            "this system or file system cannot exchange two folders (the two-rename fallback is used)"
        )
    assert [p.name for p in (tmp_path / "b").iterdir()] == ["A"] and not any((tmp_path / "a").iterdir())


def test_existing_target_needs_force(wide, tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "config.json").write_text("{}")
    (target / "stale.txt").write_text("old")
    assert "--force" in one_line_error(ConvertError, run_convert, wide.hf, target)
    assert (target / "stale.txt").exists()
    run_convert(wide.hf, target, force=True)
    assert not (target / "stale.txt").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    load_model(target)


def test_force_never_replaces_a_folder_that_is_not_a_model(wide, tmp_path):
    target = tmp_path / "documents"
    target.mkdir()
    (target / "thesis.tex").write_text("precious")
    assert "not a model folder" in one_line_error(ConvertError, run_convert, wide.hf, target, force=True)
    assert (target / "thesis.tex").read_text() == "precious"


def test_target_inside_or_around_the_source_is_refused(wide, tmp_path):
    src = tmp_path / "ckpt"
    shutil.copytree(wide.hf, src)
    before = folder_digest(src)
    assert "inside the source" in one_line_error(ConvertError, run_convert, src, src / "mlx")
    assert "inside the source" in one_line_error(ConvertError, run_convert, src, src, force=True)
    assert "contains the source" in one_line_error(ConvertError, run_convert, src, tmp_path, force=True)
    assert folder_digest(src) == before


# -- bad input: one line, nothing written, source untouched ------------------------------------------------


def assert_nothing_written(folder: Path, expected: set[str]) -> None:
    assert {p.name for p in folder.iterdir()} == expected


def test_missing_shard(wide, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(wide.hf_released, src)
    shard = sorted(src.glob("model-*.safetensors"))[-1]
    shard.unlink()
    message = one_line_error(CheckpointError, run_convert, src, tmp_path / "out")
    assert "missing" in message and shard.name in message
    assert_nothing_written(tmp_path, {"src"})


def test_not_diffusion_gemma(wide, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(wide.hf, src)
    config = config_of(src)
    config["model_type"] = "gemma4"
    (src / "config.json").write_text(json.dumps(config))
    assert "'gemma4'" in one_line_error(CheckpointError, run_convert, src, tmp_path / "out")
    assert_nothing_written(tmp_path, {"src"})


def test_already_quantized_source(wide, tmp_path):
    community = write_mlx_community(wide.hf, tmp_path / "community", bits=4)
    message = one_line_error(ConvertError, run_convert, community, tmp_path / "out", quantize=True)
    assert "already quantized" in message
    assert_nothing_written(tmp_path, {"community"})


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"quantize": True, "q_bits": 7}, "unsupported bit width 7"),
        ({"quantize": True, "q_bits": 1}, "unsupported bit width 1"),
        ({"quantize": True, "q_group_size": 16}, "unsupported group size 16"),
        ({"quantize": True, "q_recipe": "fancy"}, "unknown quantization recipe"),
        ({"dtype": "int8"}, "unsupported dtype"),
        ({"shard_size": 0}, "invalid shard size"),
    ],
)
def test_bad_options(wide, tmp_path, options, expected):
    assert expected in one_line_error(ConvertError, run_convert, wide.hf, tmp_path / "out", **options)
    assert_nothing_written(tmp_path, set())


def test_disk_full_while_writing(wide, tmp_path, monkeypatch):
    src = tmp_path / "src"
    shutil.copytree(wide.hf_released, src)
    before = folder_digest(src)
    calls = []

    def full_disk(f, data):
        calls.append(len(data))
        if len(calls) > 20:
            raise OSError(errno.ENOSPC, "No space left on device")
        f.write(data)

    monkeypatch.setattr(stream, "write_bytes", full_disk)
    message = one_line_error(ConvertError, run_convert, src, tmp_path / "out", shard_size=300_000)
    assert "disk full" in message and len(calls) == 21
    assert_nothing_written(tmp_path, {"src"})
    assert folder_digest(src) == before


def test_disk_full_while_copying_the_drafter_is_one_clear_line(tmp_path, monkeypatch):
    real = shutil.copyfile

    def full_disk(src, dst, *args, **kwargs):
        if "drafter" in Path(dst).parts:
            raise OSError(errno.ENOSPC, "No space left on device", str(dst))
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(shutil, "copyfile", full_disk)
    message = one_line_error(ConvertError, run_convert, DEFAULT_MODEL, tmp_path / "out")
    assert (
        message.startswith("disk full while writing") and "[" not in message and "permission" not in message
    )
    assert_nothing_written(tmp_path, set())


def test_the_space_check_counts_the_drafter_it_copies(tmp_path, monkeypatch):
    from mlx_dgemma.convert.folder import sidecar_files
    from mlx_dgemma.convert.plan import build_plan

    assert (DEFAULT_MODEL / "drafter" / "config.json").is_file()
    without_drafter = build_plan(DEFAULT_MODEL).nbytes + sum(
        p.stat().st_size for p in sidecar_files(DEFAULT_MODEL)
    )
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=without_drafter))
    assert "not enough disk space" in one_line_error(
        ConvertError, run_convert, DEFAULT_MODEL, tmp_path / "out"
    )
    assert_nothing_written(tmp_path, set())


def test_not_enough_space_is_refused_before_writing(wide, tmp_path, monkeypatch):
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=1000))
    assert "not enough disk space" in one_line_error(ConvertError, run_convert, wide.hf, tmp_path / "out")
    assert_nothing_written(tmp_path, set())


# -- LM Studio export ---------------------------------------------------------------------------------------


def test_lmstudio_export(wide, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LMSTUDIO_HOME", str(tmp_path / "lmstudio"))
    assert convert_cli.main(["--hf-path", str(wide.hf), "-q", "--lmstudio", "--publisher", "me"]) == 0
    target = tmp_path / "lmstudio" / "models" / "me" / "hf-MLX-4bit"
    assert str(target) in capsys.readouterr().out
    assert config_of(target)["model_type"] == "diffusion_gemma"
    assert {"config.json", "model.safetensors.index.json", "generation_config.json", "README.md"} <= {
        p.name for p in target.iterdir()
    }
    assert "## LM Studio" in (target / "README.md").read_text()
    load_model(target)
    # --lmstudio-dir overrides the models folder; --mlx-path names the model
    assert (
        convert_cli.main(
            [
                "--hf-path",
                str(wide.hf),
                "--lmstudio",
                "--lmstudio-dir",
                str(tmp_path / "models"),
                "--mlx-path",
                "mine",
            ]
        )
        == 0
    )
    assert (tmp_path / "models" / "local" / "mine" / "config.json").is_file()
    assert convert_cli.main(["--hf-path", str(wide.hf), "--lmstudio", "--publisher", "a/b"]) == 2
    assert "invalid LM Studio publisher" in capsys.readouterr().err


def test_lmstudio_home_resolution(tmp_path, monkeypatch):
    monkeypatch.delenv("LMSTUDIO_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert lmstudio_home() == tmp_path / ".lmstudio"
    (tmp_path / ".lmstudio-home-pointer").write_text(str(tmp_path / "elsewhere") + "\n")
    assert lmstudio_home() == tmp_path / "elsewhere"
    monkeypatch.setenv("LMSTUDIO_HOME", str(tmp_path / "env"))
    assert lmstudio_home() == tmp_path / "env"


# -- command line and progress --------------------------------------------------------------------------------


def test_cli_piped_is_quiet(wide, tmp_path):
    out = tmp_path / "out"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mlx_dgemma.convert",
            "--hf-path",
            str(wide.hf),
            "--mlx-path",
            str(out),
            "-q",
            "--q-bits",
            "8",
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("\n") == 1 and result.stdout.startswith(f"wrote {out}")
    assert "\r" not in result.stderr and "tensors" not in result.stderr
    assert config_of(out)["quantization"]["bits"] == 8


def test_cli_errors_are_one_line(wide, tmp_path, capsys):
    assert (
        convert_cli.main(
            ["--hf-path", str(wide.hf), "--mlx-path", str(tmp_path / "out"), "-q", "--q-bits", "7"]
        )
        == 2
    )
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("error: unsupported bit width 7")
    assert captured.err.count("\n") == 1
    assert_nothing_written(tmp_path, set())


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--q-bits", "0"], "unsupported bit width 0"),
        (["--q-group-size", "0"], "unsupported group size 0"),
    ],
)
def test_zero_bits_or_group_size_are_refused_not_replaced_by_defaults(tmp_path, capsys, flags, expected):
    out = tmp_path / "out"
    assert convert_cli.main(["--hf-path", str(DEFAULT_MODEL), "--mlx-path", str(out), "-q", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {expected}") and err.count("\n") == 1
    assert_nothing_written(tmp_path, set())


def test_flags_are_never_abbreviated():
    with pytest.raises(SystemExit):
        convert_cli.build_parser().parse_args(["--hf-path", "x", "--q-bit", "8"])


def test_cli_flag_checks(wide, tmp_path, capsys):
    assert (
        convert_cli.main(["--hf-path", str(wide.hf), "--mlx-path", str(tmp_path / "o"), "--q-bits", "8"]) == 2
    )
    assert "add -q" in capsys.readouterr().err
    assert convert_cli.parse_size("5GB") == 5 * 10**9 and convert_cli.parse_size("512MiB") == 512 << 20
    assert convert_cli.parse_size("1000") == 1000
    with pytest.raises(ConvertError):
        convert_cli.parse_size("lots")


def test_console_script_is_declared():
    assert '"mlx_dgemma.convert" = "mlx_dgemma.convert.cli:main"' in (ROOT / "pyproject.toml").read_text()
    assert callable(convert_cli.main)


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_on_a_terminal_only():
    terminal = FakeTerminal()
    bar = Progress(10, 5_000_000, stream=terminal)
    bar.advance(4, 2_000_000)
    bar.close()
    text = terminal.getvalue()
    assert "\r" in text and "4/10 tensors" in text and "2.00M/5.00M" in text and text.endswith("\n")
    piped = io.StringIO()
    quiet = Progress(10, 5_000_000, stream=piped)
    quiet.advance(10, 5_000_000)
    quiet.close()
    assert piped.getvalue() == ""


def test_adapter_path_fuses_adapters_before_converting(tmp_path):
    from mlx.utils import tree_flatten, tree_unflatten

    from mlx_dgemma.train import LoRAConfig, apply_lora
    from mlx_dgemma.train.lora import adapter_config, save_adapters

    model = load_model(DEFAULT_MODEL, mx.float32)
    mx.random.seed(0)
    lora = LoRAConfig(rank=4, alpha=8)
    apply_lora(model, lora)
    trained = [(k, 0.05 * mx.random.normal(v.shape)) for k, v in tree_flatten(model.trainable_parameters())]
    model.update(tree_unflatten(trained))  # lora_b starts at zero: give the adapters an effect
    adapters = tmp_path / "adapters"
    save_adapters(model, adapters, adapter_config("lora", lora, len(model.layers)))

    out = tmp_path / "out" / "fused"
    argv = ["--hf-path", str(DEFAULT_MODEL), "--mlx-path", str(out), "--adapter-path", str(adapters)]
    assert convert_cli.main(argv) == 0
    assert [p.name for p in out.parent.iterdir()] == ["fused"]  # the temporary fused folder is gone
    assert "adapters" in (out / "README.md").read_text()

    def logits(m) -> np.ndarray:
        cache = m.make_cache()
        m.encode(mx.array([[2, 4, 40, 41, 42, 43, 5]]), cache)
        return np.array(m.denoise(mx.arange(10, 10 + m.args.canvas_length)[None], cache))

    adapted = logits(load(DEFAULT_MODEL, mx.float32, adapter_path=adapters)[0])
    plain = logits(load(DEFAULT_MODEL, mx.float32)[0])
    converted = logits(load(out, mx.float32)[0])
    err, effect = np.abs(converted - adapted).max(), np.abs(plain - adapted).max()
    print(f"fused (bf16) vs adapters: {err:.3g}; adapters' effect {effect:.3g}")
    assert err < 0.05 * effect  # bf16 rounding of the fused weights
