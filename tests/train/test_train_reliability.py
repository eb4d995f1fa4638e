"""Training reliability: checkpoints that cannot tear, non-finite losses, bad data lines, --mask-prompt and
--grad-checkpoint (the loss and gradients they must leave as they are, or change as documented)."""

from __future__ import annotations

import json
from pathlib import Path

import mlx_dgemma  # noqa: F401  # isort: skip  (first: it preloads OpenBLAS before mlx loads)
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten

from mlx_dgemma import load_model, load_tokenizer
from mlx_dgemma.request import eos_ids
from mlx_dgemma.train import (
    LoRAConfig,
    ObjectiveConfig,
    TrainConfig,
    Trainer,
    TrainError,
    apply_lora,
    load_jsonl,
)
from mlx_dgemma.train import checkpoint as checkpoint_module
from mlx_dgemma.train.checkpoint import POINTER, current, write_folder
from mlx_dgemma.train.grad_checkpoint import checkpoint_layers
from mlx_dgemma.train.lora import adapter_config, prepare_full
from mlx_dgemma.train.objective import encoder_loss, keep_all_cache, training_loss
from mlx_dgemma.train.trainer import example_indices
from tests.conftest import DEMO24

TOKENIZER = load_tokenizer(DEMO24)


def model_with_lora(seed: int = 0):
    model = load_model(DEMO24, mx.float32)
    mx.random.seed(seed)
    return apply_lora(model, LoRAConfig(rank=4, alpha=8))


@pytest.fixture(scope="module")
def examples(tmp_path_factory):
    records = [
        {"prompt": f"Sort: {i + 3} {i + 1} {i + 2}", "completion": f"{i + 1} {i + 2} {i + 3}"}
        for i in range(4)
    ]
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    model = load_model(DEMO24, mx.float32)
    return load_jsonl(path, TOKENIZER, eos_ids(model, TOKENIZER))


def trainer(model, examples, out: Path, **overrides) -> Trainer:
    cfg = TrainConfig(
        **{
            "iters": 2,
            "batch_size": 1,
            "learning_rate": 3e-3,
            "val_every": 0,
            "save_every": 1,
            "seed": 0,
            **overrides,
        }
    )
    config = adapter_config("lora", LoRAConfig(rank=4, alpha=8), len(model.layers))
    return Trainer(model, examples, None, out, cfg, config, fill_id=TOKENIZER.eos_token_id)


@pytest.fixture(scope="module")
def straight(examples, tmp_path_factory):
    """Losses of an uninterrupted 2-step run: what a resumed run must reproduce."""
    return [
        s.loss for s in trainer(model_with_lora(), examples, tmp_path_factory.mktemp("straight")).run().steps
    ]


def crash_on_optimizer(monkeypatch):
    real = mx.save_safetensors

    def save(path, arrays, *args, **kwargs):
        if path.endswith("optimizer.safetensors"):
            raise OSError("simulated crash")
        real(path, arrays, *args, **kwargs)

    monkeypatch.setattr(mx, "save_safetensors", save)


def crash_on_pointer(monkeypatch):
    def replace(path, text):
        raise OSError("simulated crash")

    monkeypatch.setattr(checkpoint_module, "_replace_text", replace)


def crash_on_publish(monkeypatch):
    def publish(*args, **kwargs):
        raise OSError("simulated crash")

    monkeypatch.setattr("mlx_dgemma.train.trainer.publish", publish)


@pytest.mark.parametrize(
    ("crash", "kept"), [(crash_on_optimizer, 1), (crash_on_pointer, 1), (crash_on_publish, 2)]
)
def test_a_crash_inside_save_leaves_a_whole_checkpoint(
    examples, straight, tmp_path, monkeypatch, crash, kept
):
    """Before the pointer moves, the previous checkpoint stays; after it, the new one is whole."""
    out = tmp_path / "run"
    first = trainer(model_with_lora(), examples, out)
    first.train_step(0)  # step 1, saved whole
    first.step = 1
    first.save()
    saved = {1: {k: np.array(v) for k, v in mx.load(str(out / "adapters.safetensors")).items()}}
    first.step = first.train_step(1).step  # step 2: its save dies half-way
    saved[2] = {k: np.array(v) for k, v in tree_flatten(first.model.trainable_parameters())}
    with monkeypatch.context() as m:
        crash(m)
        with pytest.raises(OSError, match="simulated crash"):
            first.save()

    resumed = trainer(model_with_lora(seed=7), examples, out)
    assert resumed.resume() == kept
    assert json.loads((out / POINTER).read_text())["step"] == kept
    published = mx.load(str(out / "adapters.safetensors"))  # what --adapter-path reads: the same step's
    assert all(np.array_equal(np.array(published[k]), v) for k, v in saved[kept].items())
    # weights and optimizer state of the same step: the rest of the run is the uninterrupted one
    assert [s.loss for s in resumed.run().steps] == pytest.approx(straight[kept:], rel=1e-6, abs=1e-6)
    assert current(out).name == "checkpoint-0000002"
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["checkpoint-0000002"]  # leftovers removed


def test_write_folder_replaces_a_folder_whole_or_not_at_all(tmp_path):
    """The drafter's folder writer: a failed write leaves the old folder; a later one replaces it whole and
    removes the temporaries a killed writer (another pid) left beside it."""
    final = tmp_path / "drafter"
    write_folder(final, {"a.txt": lambda p: p.write_text("old"), "b.txt": lambda p: p.write_text("old")})

    def dies(path: Path) -> None:
        raise OSError("simulated crash")

    with pytest.raises(OSError, match="simulated crash"):
        write_folder(final, {"a.txt": lambda p: p.write_text("new"), "b.txt": dies})
    assert sorted(f.read_text() for f in final.iterdir()) == ["old", "old"]
    (tmp_path / ".drafter.tmp-999999999").mkdir()  # a writer killed mid-write
    write_folder(final, {"a.txt": lambda p: p.write_text("new")})
    assert [f.name for f in final.iterdir()] == ["a.txt"] and (final / "a.txt").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["drafter"]


def test_a_full_fine_tune_killed_while_publishing_leaves_no_orphan_after_the_next_save(
    examples, tmp_path, monkeypatch
):
    """Killed between writing the temporary copy of the weights beside the adapters and renaming it: the next
    save (a later process: another pid) removes that copy and every other temporary it left."""
    out = tmp_path / "full"
    model = prepare_full(load_model(DEMO24, mx.float32))
    first = trainer(model, examples, out)
    first.train_step(0)
    first.step = 1
    real = checkpoint_module.os.replace

    def killed(src, dst, *args, **kwargs):
        if Path(src).name.startswith(".adapters.safetensors.tmp-"):
            raise KeyboardInterrupt  # the process stops here; what it wrote stays, as after a kill -9
        real(src, dst, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(checkpoint_module.os, "replace", killed)
        with pytest.raises(KeyboardInterrupt):
            first.save()
    dead = 999_999_999  # what the killed process left bears its pid, not this one's
    for path in out.glob(".*.tmp-*"):
        path.rename(path.with_name(path.name.rsplit("-", 1)[0] + f"-{dead}"))
    (out / f".checkpoint.json.tmp-{dead}").write_text("{}")  # as if killed before the pointer's rename
    (out / f".checkpoint-0000009.tmp-{dead}").mkdir()
    orphans = sorted(p.name for p in out.glob(".*.tmp-*"))
    assert f".adapters.safetensors.tmp-{dead}" in orphans  # the orphaned copy of the weights
    assert (out / f".adapters.safetensors.tmp-{dead}").stat().st_size > 0

    later = trainer(prepare_full(load_model(DEMO24, mx.float32)), examples, out)
    assert later.resume() == 1
    later.step = later.train_step(1).step
    later.save()
    assert sorted(p.name for p in out.iterdir() if ".tmp-" in p.name) == []
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter_config.json",
        "adapters.safetensors",
        "checkpoint-0000002",
        "checkpoint.json",
    ]


def test_a_folder_without_the_pointer_but_with_a_torn_legacy_checkpoint_is_refused(examples, tmp_path):
    out = tmp_path / "legacy"
    out.mkdir()
    (out / "trainer_state.json").write_text('{"step": 3}\n')
    with pytest.raises(TrainError, match=r"adapters\.safetensors is missing"):
        trainer(model_with_lora(), examples, out).resume()


def test_a_diverging_run_stops_with_an_error_and_keeps_the_last_good_checkpoint(examples, tmp_path):
    out = tmp_path / "diverged"
    run = trainer(model_with_lora(), examples, out, learning_rate=1e30, iters=4)
    with pytest.raises(TrainError) as e:
        run.run()
    message = str(e.value)
    print(message)
    assert "not a finite number" in message and "\n" not in message
    kept = json.loads((out / POINTER).read_text())["step"]
    assert kept < run.step + 1 and f"checkpoint (step {kept})" in message
    weights = mx.load(str(current(out) / "adapters.safetensors"))
    assert all(bool(mx.isfinite(v).all()) for v in weights.values())


def test_weights_that_are_not_finite_are_never_saved(examples, tmp_path):
    out = tmp_path / "nan"
    run = trainer(model_with_lora(), examples, out)
    run.step = 1
    run.save()
    layer = run.model.layers[0].self_attn.q_proj
    layer.lora_b = mx.full(layer.lora_b.shape, float("nan"))
    run.step = 2
    with pytest.raises(TrainError, match="no longer finite"):
        run.save()
    assert current(out).name == "checkpoint-0000001"


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        (
            b'{"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]}',
            "message 1 has role 'robot'",
        ),
        (
            b'{"messages": [{"role": 5, "content": "hi"}, {"role": "assistant", "content": "x"}]}',
            "has role 5",
        ),
        (b'{"prompt": "a\\ud800", "completion": "b"}', "unpaired surrogate"),
        (b'{"prompt": "caf\xe9", "completion": "b"}', "not UTF-8 text (byte 0xe9"),
        (
            b'{"messages": [{"role": "tool", "content": "hi"}, {"role": "assistant", "content": "x"}]}',
            "unknown role 'tool'",
        ),  # the template's own error, as one line
    ],
)
def test_bad_roles_bytes_and_surrogates_are_reported_with_their_line_number(tmp_path, raw, words):
    good = b'{"prompt": "Sort: 2 1", "completion": "1 2"}\n'
    path = tmp_path / "train.jsonl"
    path.write_bytes(good + b"\n" + raw + b"\n" + good)
    with pytest.raises(TrainError) as e:
        load_jsonl(path, TOKENIZER, {TOKENIZER.eos_token_id})
    message = str(e.value)
    assert message.startswith("train.jsonl line 3: ") and words in message and "\n" not in message


def test_mask_prompt_drops_the_prompts_next_token_loss(examples):
    model = model_with_lora()
    t = trainer(model, examples, Path("unused"), batch_size=2)
    parts, noises = t.micro_batch(0, 0)
    rows = [examples[i] for i in example_indices(len(examples), 0, 0, 2)]
    answers = [int(n) for b in parts for n in b.answer.sum(axis=1)]
    assert sorted(answers) == sorted(len(e.answer) for e in rows)  # exactly each row's answer, in every part
    batch, noise = parts[0], noises[0]  # the checks below on one part
    assert not (batch.answer & ~batch.valid).any()

    total, diffusion, encoder = training_loss(model, batch, noise, 1.0, mask_prompt=True)
    _, diffusion_all, encoder_all = training_loss(model, batch, noise, 1.0)
    hidden = model.encode(batch.tokens, keep_all_cache(model), mx.array(batch.valid))
    pairs = batch.valid[:, :-1] & batch.valid[:, 1:] & batch.answer[:, 1:]
    ce = np.array(nn.losses.cross_entropy(model.logits(hidden[:, :-1]), batch.tokens[:, 1:]))
    assert encoder.item() == pytest.approx(ce[pairs].mean(), rel=1e-5)
    assert encoder.item() != pytest.approx(encoder_all.item(), rel=1e-3)  # the prompt's term is gone
    assert diffusion.item() == pytest.approx(diffusion_all.item(), rel=1e-6)
    assert total.item() == pytest.approx(diffusion.item() + encoder.item(), rel=1e-6)
    unmasked = encoder_loss(model, hidden, batch.tokens, batch.valid)
    assert unmasked.item() == pytest.approx(encoder_all.item(), rel=1e-5)


@pytest.mark.parametrize("full", [False, True])
def test_grad_checkpoint_leaves_loss_and_gradients_unchanged(examples, full):
    model = load_model(DEMO24, mx.float32)
    if full:
        prepare_full(model)
    else:
        mx.random.seed(0)
        apply_lora(model, LoRAConfig(rank=4, alpha=8))
        model.update(random_lora_b(model))  # non-zero B, so that every LoRA gradient is non-trivial
    t = trainer(
        model, examples, Path("unused"), batch_size=2, objective=ObjectiveConfig(self_conditioning_p=1.0)
    )  # both decoder passes
    batch, noise = t.micro_batch(0, 0)

    def loss(b, n):
        return training_loss(model, b, n)[0]

    plain_loss, plain = nn.value_and_grad(model, loss)(batch, noise)
    checkpoint_layers(model)
    assert all(type(layer).__name__ == "CheckpointedDecoderLayer" for layer in model.layers)
    ckpt_loss, ckpt = nn.value_and_grad(model, loss)(batch, noise)
    plain, ckpt = dict(tree_flatten(plain)), dict(tree_flatten(ckpt))
    assert ckpt_loss.item() == pytest.approx(plain_loss.item(), rel=1e-6)
    assert set(plain) == set(ckpt) and len(plain) > 0
    for k in plain:
        scale = float(mx.abs(plain[k]).max()) + 1e-12
        assert float(mx.abs(plain[k] - ckpt[k]).max()) <= 1e-5 * scale, k
    assert any(float(mx.abs(g).max()) > 0 for g in plain.values())


def random_lora_b(model) -> dict:
    rng = np.random.default_rng(0)
    pairs = [
        (k, mx.array(rng.normal(0, 0.02, v.shape).astype(np.float32)))
        for k, v in tree_flatten(model.trainable_parameters())
        if k.endswith("lora_b")
    ]
    return tree_unflatten(pairs)


def test_loading_adapters_does_not_import_the_training_package(tmp_path):
    """Imports flow one way: train -> loader -> adapters, never back."""
    import subprocess
    import sys

    from mlx_dgemma.train.lora import save_adapters

    model = model_with_lora()
    save_adapters(
        model, tmp_path / "adapters", adapter_config("lora", LoRAConfig(rank=4, alpha=8), len(model.layers))
    )
    code = (
        "import sys, mlx_dgemma; mlx_dgemma.load(adapter_path=sys.argv[1]); "
        "print(sorted(m for m in sys.modules if m.startswith('mlx_dgemma.train')))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "adapters")], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
