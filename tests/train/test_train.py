"""Training: the objective against the inference path, LoRA / QLoRA, fusing, resume, data errors, the CLI.

Everything runs on the embedded default model in float32; sizes and special ids are read from it.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import mlx_dgemma  # noqa: F401  # isort: skip  (first: it preloads OpenBLAS before mlx loads)
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models.switch_layers import QuantizedSwitchLinear

from mlx_dgemma import load, load_model, load_tokenizer
from mlx_dgemma.request import encode_prompt, eos_ids
from mlx_dgemma.train import (
    Example,
    LoRAConfig,
    ObjectiveConfig,
    TrainConfig,
    Trainer,
    TrainError,
    apply_lora,
    load_adapters,
    load_jsonl,
    prepare_full,
    save_fused,
)
from mlx_dgemma.train.checkpoint import current
from mlx_dgemma.train.cli import main
from mlx_dgemma.train.lora import LoRASwitchLinear, adapter_config, stored_dtype
from mlx_dgemma.train.objective import (
    Noise,
    denoise_self_conditioned,
    make_batch,
    sample_noise,
    split_batch,
    training_loss,
)
from mlx_dgemma.train.trainer import Progress, StepLog
from tests.conftest import DEMO24

ARGS = load_model(DEMO24).args
C, VOCAB, WINDOW, BOS = ARGS.canvas_length, ARGS.vocab_size, ARGS.sliding_window, ARGS.bos_token_id
EOS_FILL = load_tokenizer(DEMO24).eos_token_id
FIRST_PLAIN_ID = max(load_tokenizer(DEMO24)._tokenizer.all_special_ids) + 1
ALL_TARGETS = ("attn", "mlp", "experts", "self_conditioning")


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(DEMO24)


def fresh_model():
    return load_model(DEMO24, mx.float32)


def lora_model(seed: int = 0, targets=("attn", "mlp")):
    model = fresh_model()
    mx.random.seed(seed)
    return apply_lora(model, LoRAConfig(rank=4, alpha=8, targets=targets))


def random_ids(rng: np.random.Generator, n: int) -> list[int]:
    return rng.integers(FIRST_PLAIN_ID, VOCAB, n).tolist()


def sort_records(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    records = []
    for i in range(n):
        xs = rng.integers(0, 100, rng.integers(3, 10)).tolist()
        prompt, answer = "Sort: " + " ".join(map(str, xs)), " ".join(map(str, sorted(xs)))
        if i % 2:
            records.append({"prompt": prompt, "completion": answer})
        else:
            records.append(
                {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}
            )
    return records


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def sort_examples(tokenizer, n: int, tmp_path: Path) -> list[Example]:
    model = fresh_model()
    return load_jsonl(
        write_jsonl(tmp_path / "train.jsonl", sort_records(n)), tokenizer, eos_ids(model, tokenizer)
    )


def make_trainer(model, examples, out: Path, targets=("attn", "mlp"), **overrides) -> Trainer:
    settings = {
        "iters": 4,
        "batch_size": 2,
        "learning_rate": 3e-3,
        "val_every": 0,
        "save_every": 0,
        "seed": 0,
        "objective": ObjectiveConfig(self_conditioning_p=0.5),
    }
    cfg = TrainConfig(**{**settings, **overrides})
    config = adapter_config("lora", LoRAConfig(rank=4, alpha=8, targets=targets), len(model.layers))
    return Trainer(model, examples, None, out, cfg, config, fill_id=EOS_FILL)


def ce_numpy(logits: mx.array, targets) -> np.ndarray:
    """Cross-entropy by hand, in float64."""
    x = np.array(logits, dtype=np.float64)
    t = np.array(targets)
    m = x.max(-1, keepdims=True)
    logz = (m + np.log(np.exp(x - m).sum(-1, keepdims=True)))[..., 0]
    return logz - np.take_along_axis(x, t[..., None], -1)[..., 0]


def canvas_logits(model) -> np.ndarray:
    """Self-conditioned decoder logits of a fixed canvas after a fixed prompt: the output adapters must keep."""
    rng = np.random.default_rng(3)
    prompt, canvas = mx.array([[BOS, *random_ids(rng, 40)]]), mx.array([random_ids(rng, C)])
    cache = model.make_cache()
    model.encode(prompt, cache)
    return np.array(model.denoise(canvas, cache, model.denoise(canvas, cache)))


def test_objective_equals_the_inference_path_computed_by_hand():
    """Batched, left-padded training loss = CE over each row's inference-path decoder logits (+ encoder CE)."""
    model = fresh_model()
    rng = np.random.default_rng(0)
    # Row 0: prompt longer than the sliding window, answer of 3 canvases, canvas 1 trained, self-conditioned.
    # Row 1: short prompt, answer shorter than a canvas (EOS fill), canvas 0, not self-conditioned.
    short = C // 3
    examples = [
        Example([BOS, *random_ids(rng, WINDOW + 12)], random_ids(rng, 2 * C + 6)),
        Example([BOS, *random_ids(rng, 20)], random_ids(rng, short)),
    ]
    batch = make_batch(examples, [1, 0], C, pad_id=ARGS.pad_token_id, fill_id=EOS_FILL)
    noise = sample_noise(np.array(batch.targets), VOCAB, rng, ObjectiveConfig())
    noise.self_condition = np.array([True, False])
    total, diffusion, encoder = training_loss(model, batch, noise, encoder_loss_weight=0.5)

    assert np.array(batch.targets[1]).tolist() == examples[1].answer + [EOS_FILL] * (C - short)
    canvas_ce, token_ce = [], []
    for row, (ex, k) in enumerate(zip(examples, [1, 0])):
        cache = model.make_cache()  # what generation holds before canvas k: prompt + k committed canvases
        model.encode(mx.array([ex.prompt + ex.answer[: k * C]]), cache)
        canvas = noise.canvas[row : row + 1]
        logits = model.denoise(canvas, cache)
        if noise.self_condition[row]:
            logits = model.denoise(canvas, cache, logits)
        canvas_ce.append(ce_numpy(logits, batch.targets[row : row + 1]))
        sequence = ex.prompt + ex.answer
        hidden = model.encode(mx.array([sequence]), model.make_cache())
        token_ce.append(ce_numpy(model.logits(hidden[:, :-1]), [sequence[1:]]).ravel())
    want_diffusion = np.concatenate(canvas_ce).mean()
    want_encoder = np.concatenate(token_ce).mean()
    assert diffusion.item() == pytest.approx(want_diffusion, rel=1e-4)
    assert encoder.item() == pytest.approx(want_encoder, rel=1e-4)
    assert total.item() == pytest.approx(want_diffusion + 0.5 * want_encoder, rel=1e-4)


def test_a_batch_split_by_canvas_has_the_loss_of_one_layout():
    """``split_batch`` lays rows of different canvases out apart (less padding); the loss must not change."""
    model = fresh_model()
    rng = np.random.default_rng(5)
    examples = [
        Example([BOS, *random_ids(rng, n)], random_ids(rng, m))
        for n, m in ((30, 2 * C + 3), (9, C // 2), (17, C + 5), (40, C))
    ]
    canvases = [2, 0, 1, 0]
    one = make_batch(examples, canvases, C, ARGS.pad_token_id, EOS_FILL)
    noise = sample_noise(np.array(one.targets), VOCAB, rng, ObjectiveConfig())
    noise.self_condition = np.array([True, False, True, True])
    parts = split_batch(examples, canvases, C, ARGS.pad_token_id, EOS_FILL)
    rows = [[1, 3], [2], [0]]  # rows of ``one`` in each part: canvas 0, 1, 2
    noises = [Noise(noise.canvas[mx.array(r)], noise.t[r], noise.self_condition[r]) for r in rows]
    assert [p.size for p in parts] == [2, 1, 1]
    assert sum(p.tokens.size for p in parts) < 0.7 * one.tokens.size  # the padding saved
    for weight, mask in ((0.5, False), (1.0, True)):
        want = [x.item() for x in training_loss(model, one, noise, weight, mask)]
        got = [x.item() for x in training_loss(model, parts, noises, weight, mask)]
        assert got == pytest.approx(want, rel=1e-5)


def test_group_by_length_batches_similar_examples_and_covers_each_epoch(tokenizer, tmp_path):
    examples = sort_examples(tokenizer, 12, tmp_path)
    trainer = make_trainer(lora_model(), examples, tmp_path / "out", batch_size=3, group_by_length=True)
    lengths = [len(e.prompt) + len(e.answer) for e in examples]
    batches = []
    for step in range(8):  # two epochs of four batches
        parts, _ = trainer.micro_batch(step, 0)
        batches.append(
            sorted(int(n) for b in parts for n in b.valid.sum(axis=1))
        )  # prompt + answer, each row
    first, second = (sorted(n for b in epoch for n in b) for epoch in (batches[:4], batches[4:]))
    assert first == sorted(lengths) == second  # every example once an epoch
    ordered = sorted(lengths)
    assert sorted(batches[:4]) == [ordered[i : i + 3] for i in range(0, 12, 3)]  # neighbours in length
    assert batches[:4] != batches[4:]  # the batches' order is reshuffled each epoch
    assert trainer.micro_batch(5, 0)[0][0].tokens.tolist() == trainer.micro_batch(5, 0)[0][0].tokens.tolist()


def test_decoder_loss_reaches_the_encoder_through_the_cache():
    """The encoder's own layer scalars only act through the cache: the diffusion loss alone must move them."""
    model = fresh_model()
    rng = np.random.default_rng(4)
    example = Example([BOS, *random_ids(rng, 30)], random_ids(rng, C + 8))
    batch = make_batch([example], [1], C, ARGS.pad_token_id, EOS_FILL)
    noise = sample_noise(np.array(batch.targets), VOCAB, rng, ObjectiveConfig(self_conditioning_p=0.0))
    _, grads = nn.value_and_grad(
        model, lambda: training_loss(model, batch, noise, encoder_loss_weight=0.0)[0]
    )()
    scalar = grads["model"]["encoder"]["language_model"]["layers"][0]["layer_scalar"]
    assert abs(scalar.item()) > 1e-4


def test_corruption_rate_matches_t_with_uniform_tokens():
    rng = np.random.default_rng(1)
    targets = np.full((64, 2048), 7, dtype=np.int32)
    noise = sample_noise(targets, 2048, rng, ObjectiveConfig(eps=1e-3, self_conditioning_p=0.5))
    canvas = np.array(noise.canvas)
    assert ((noise.t >= 1e-3) & (noise.t < 1)).all()
    changed = (canvas != targets).mean(axis=1)
    expected = noise.t * (1 - 1 / 2048)  # a replacement draws the original token 1 time in 2048
    sigma = np.sqrt(expected * (1 - expected) / 2048)
    assert np.all(np.abs(changed - expected) < 5 * sigma + 1e-3)
    replaced = canvas[canvas != targets]
    assert (
        replaced.min() >= 0 and replaced.max() < 2048 and len(np.unique(replaced)) > 2000
    )  # uniform, no mask id
    assert 0.3 < noise.self_condition.mean() < 0.7


def test_self_conditioning_first_pass_carries_no_gradient():
    model = fresh_model()
    rng = np.random.default_rng(2)
    cache = model.make_cache()
    model.encode(mx.array([[BOS, *random_ids(rng, 30)]]), cache)
    canvas, targets = mx.array([random_ids(rng, C)]), mx.array([random_ids(rng, C)])
    first = mx.stop_gradient(model.denoise(canvas, cache))  # a constant, computed outside the gradient

    def ours(m):
        return nn.losses.cross_entropy(denoise_self_conditioned(m, canvas, cache), targets).mean()

    def constant_first_pass(m):
        return nn.losses.cross_entropy(m.denoise(canvas, cache, first), targets).mean()

    def gradient_through_both(m):
        return nn.losses.cross_entropy(m.denoise(canvas, cache, m.denoise(canvas, cache)), targets).mean()

    g_ours, g_const, g_both = (
        dict(tree_flatten(nn.value_and_grad(model, f)(model)[1]))
        for f in (ours, constant_first_pass, gradient_through_both)
    )
    key = "model.decoder.layers.0.self_attn.q_proj.weight"
    assert all(np.allclose(g_ours[k], g_const[k], atol=1e-6) for k in g_const)
    assert not np.allclose(g_ours[key], g_both[key], atol=1e-6)  # the check would see a leak


def test_few_steps_lower_the_loss_on_a_fixed_batch(tokenizer, tmp_path):
    model = lora_model()
    trainer = make_trainer(model, sort_examples(tokenizer, 2, tmp_path), tmp_path / "out", iters=8)
    batch, noise = trainer.micro_batch(0, 0)
    before = training_loss(model, batch, noise)[0].item()
    trainer.run()
    after = training_loss(model, batch, noise)[0].item()
    print(f"fixed-batch loss: {before:.4f} -> {after:.4f} after 8 LoRA steps")
    assert after < 0.8 * before


def test_lora_leaves_base_weights_bit_identical(tokenizer, tmp_path):
    model = fresh_model()
    base = {k: np.array(v) for k, v in tree_flatten(model.parameters())}
    mx.random.seed(0)
    apply_lora(model, LoRAConfig(rank=4, alpha=8, targets=ALL_TARGETS))
    make_trainer(model, sort_examples(tokenizer, 4, tmp_path), tmp_path / "out", iters=3).run()
    after = dict(tree_flatten(model.parameters()))
    # (the vision tower's own ``*.linear.weight`` names are not LoRA wrappers)
    unwrap = {
        k if "vision_tower" in k else k.replace(".linear.", "."): v
        for k, v in after.items()
        if ".lora_" not in k
    }
    assert set(unwrap) == set(base)
    assert all(np.array_equal(np.array(unwrap[k]), base[k]) for k in base)
    trained = [np.abs(np.array(v)).max() for k, v in after.items() if k.endswith("lora_b")]
    assert len(trained) > 0 and min(trained) > 0  # every adapter moved off its zero start


def test_fused_adapters_reproduce_adapter_outputs(tokenizer, tmp_path):
    model = fresh_model()
    mx.random.seed(0)
    apply_lora(model, LoRAConfig(rank=4, alpha=8, targets=ALL_TARGETS))
    out = tmp_path / "adapters"
    make_trainer(model, sort_examples(tokenizer, 4, tmp_path), out, targets=ALL_TARGETS, iters=3).run()

    model.eval()
    with_adapters = canvas_logits(model)
    reloaded = canvas_logits(load_adapters(fresh_model(), out))
    fused_model, _ = load(save_fused(model, DEMO24, tmp_path / "fused"), mx.float32)
    fused = canvas_logits(fused_model)
    plain = canvas_logits(fresh_model())
    scale = np.abs(
        with_adapters
    ).max()  # float32 reassociation (W + BA)x vs Wx + B(Ax): compare at this scale
    print(
        f"fused vs adapters: max |diff| {np.abs(fused - with_adapters).max():.2e} at logit scale {scale:.1f}"
    )
    assert np.abs(with_adapters - plain).max() > 1e-2 * scale  # the adapters do change the output
    assert np.abs(reloaded - with_adapters).max() <= 1e-6 * scale
    assert np.abs(fused - with_adapters).max() < 1e-5 * scale


def test_resumed_run_continues_at_the_same_step_with_the_same_losses(tokenizer, tmp_path):
    examples = sort_examples(tokenizer, 6, tmp_path)
    settings = {"iters": 4, "grad_accum": 2, "seed": 5}
    straight = make_trainer(lora_model(seed=1), examples, tmp_path / "straight", **settings).run()

    out = tmp_path / "interrupted"
    first = make_trainer(lora_model(seed=1), examples, out, **{**settings, "iters": 2}).run()
    assert first.step == 2 and (current(out) / "optimizer.safetensors").is_file()
    resumed_trainer = make_trainer(lora_model(seed=99), examples, out, **settings)  # init is overwritten
    assert resumed_trainer.resume() == 2
    assert resumed_trainer.seconds == pytest.approx(sum(s.seconds for s in first.steps))  # time so far, kept
    resumed = resumed_trainer.run()

    assert [s.step for s in resumed.steps] == [3, 4]
    want = [s.loss for s in straight.steps[2:]]
    assert [s.loss for s in resumed.steps] == pytest.approx(want, rel=1e-6, abs=1e-6)
    assert [s.loss for s in first.steps] == pytest.approx([s.loss for s in straight.steps[:2]], rel=1e-6)


def test_lora_on_a_quantized_base_trains(tokenizer, tmp_path):
    model = fresh_model()
    # every layer the loader would quantize, experts included (the vision tower stays as converters leave it)
    nn.quantize(
        model,
        group_size=64,
        bits=4,
        class_predicate=lambda p, m: hasattr(m, "to_quantized") and not p.startswith("model.encoder."),
    )
    with pytest.raises(TrainError, match="unquantized"):
        prepare_full(model)
    frozen = {k: np.array(v) for k, v in tree_flatten(model.parameters())}
    mx.random.seed(0)
    apply_lora(model, LoRAConfig(rank=4, alpha=8, targets=ALL_TARGETS))
    experts = model.layers[0].experts.gate_up_proj
    assert isinstance(experts, LoRASwitchLinear) and isinstance(experts.linear, QuantizedSwitchLinear)
    trainer = make_trainer(model, sort_examples(tokenizer, 2, tmp_path), tmp_path / "out", iters=6)
    batch, noise = trainer.micro_batch(0, 0)
    before = training_loss(model, batch, noise)[0].item()
    trainer.run()
    after = training_loss(model, batch, noise)[0].item()
    print(f"QLoRA fixed-batch loss: {before:.4f} -> {after:.4f} after 6 steps")
    assert after < 0.9 * before
    base = {
        k if "vision_tower" in k else k.replace(".linear.", "."): v
        for k, v in tree_flatten(model.parameters())
        if ".lora_" not in k
    }
    assert all(np.array_equal(np.array(base[k]), frozen[k]) for k in frozen)

    # Fusing into a quantized base would round every layer again; --dequantize keeps the adapter model's outputs.
    model.eval()
    with_adapters = canvas_logits(model)
    fused, _ = load(save_fused(model, DEMO24, tmp_path / "fused", dequantize=True), mx.float32)
    assert not any(isinstance(m, nn.QuantizedLinear) for _, m in fused.named_modules())
    assert np.abs(canvas_logits(fused) - with_adapters).max() < 1e-5 * np.abs(with_adapters).max()


def test_records_become_the_prompt_generation_sees_and_an_answer_ending_its_turn(tokenizer, tmp_path):
    messages = [{"role": "user", "content": "Sort: 5 3 9"}, {"role": "assistant", "content": " 3 5 9 "}]
    path = write_jsonl(
        tmp_path / "d.jsonl", [{"messages": messages}, {"prompt": "Sort: 5 3 9", "completion": "3 5 9"}]
    )
    eos = eos_ids(fresh_model(), tokenizer)
    chat, plain = load_jsonl(path, tokenizer, eos)
    end_of_turn = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    assert chat == plain
    assert chat.prompt == encode_prompt(tokenizer, messages[:1])
    assert chat.answer == [*tokenizer.encode("3 5 9", add_special_tokens=False), end_of_turn]
    assert end_of_turn in eos and end_of_turn != tokenizer.eos_token_id  # generation stops at the turn's end


@pytest.mark.parametrize(
    ("line", "words"),
    [
        ('{"prompt": "a", "completion": "b"', "not valid JSON"),
        ('{"text": "hello"}', "expected 'messages' or 'prompt' and 'completion'"),
        ('{"messages": [{"role": "user", "content": "hi"}]}', "must end with the assistant's answer"),
        ('{"prompt": "a", "completion": "  "}', "answer (last message / completion) is empty"),
        ('["a", "b"]', "expected a JSON object"),
    ],
)
def test_bad_data_lines_are_reported_with_their_line_number(tokenizer, tmp_path, line, words):
    good = json.dumps({"prompt": "Sort: 2 1", "completion": "1 2"})
    path = write_jsonl(tmp_path / "train.jsonl", [good, "", line, good])
    with pytest.raises(TrainError) as e:
        load_jsonl(path, tokenizer, {tokenizer.eos_token_id})
    message = str(e.value)
    assert message.startswith("train.jsonl line 3: ") and words in message and "\n" not in message


def test_cli_trains_with_plain_progress_lines_and_fuses(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "train.jsonl", sort_records(6))
    write_jsonl(data / "valid.jsonl", sort_records(2, seed=1))
    out, fused = tmp_path / "adapters", tmp_path / "fused"
    argv = [
        "--data",
        str(data),
        "--out",
        str(out),
        "--iters",
        "2",
        "--batch-size",
        "2",
        "--report-every",
        "1",
        "--rank",
        "4",
        "--fuse",
        "--fused-out",
        str(fused),
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "step 2/2  loss" in printed and "tok/s" in printed and "validation loss" in printed
    assert "\r" not in printed  # piped: plain lines, no bar
    assert json.loads((out / "adapter_config.json").read_text())["fine_tune_type"] == "lora"
    assert json.loads((current(out) / "trainer_state.json").read_text())["step"] == 2
    load(fused)  # a plain model folder, in the base's dtype
    assert stored_dtype(fused) == stored_dtype(DEMO24) == mx.bfloat16

    bad = write_jsonl(tmp_path / "bad.jsonl", ['{"prompt": "x"}'])
    assert main(["--data", str(bad), "--out", str(tmp_path / "x"), "--iters", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: bad.jsonl line 1: ") and "\n" not in err


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_is_a_tqdm_bar_on_a_terminal():
    out = Terminal()
    bar = Progress(4, out, every=2)
    for step in range(1, 5):
        bar.update(StepLog(step, loss=float(step), diffusion=0.0, encoder=0.0, tokens=1000, seconds=0.5))
    bar.line("step 4: validation loss 1.0")
    bar.close()
    text = out.getvalue()
    assert text.count("\r") >= 4  # redrawn in place
    assert "4/4" in text and "loss 3.5000, 2,000 tok/s" in text  # loss: mean of the last 2 steps
    assert text.count("step 4: validation loss 1.0\n") == 1  # a line of its own, above the bar
    assert text.endswith("\n")  # closed: the shell prompt starts on a fresh line


def test_piped_progress_lines_average_the_last_mean_of_steps_and_show_parts_when_there_are():
    def lines(progress: Progress, parts: bool) -> list[str]:
        for step in range(1, 5):
            part = 0.5 * step if parts else None
            progress.update(StepLog(step, float(step), part, part, tokens=1000, seconds=0.5))
        return progress.out.getvalue().splitlines()

    # The drafter's: a loss without parts, averaged over more steps than a line is printed for.
    assert lines(Progress(4, io.StringIO(), every=2, mean_of=3), parts=False) == [
        "step 2/4  loss 1.5000  2,000 tok/s",
        "step 4/4  loss 3.0000  2,000 tok/s",  # steps 2..4
    ]
    assert (
        lines(Progress(4, io.StringIO(), every=1), parts=True)[-1]
        == (
            "step 4/4  loss 4.0000  2,000 tok/s  (diffusion 2.0000, encoder 2.0000)"  # every 1: the step's own loss
        )
    )
