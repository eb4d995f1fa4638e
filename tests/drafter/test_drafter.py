"""The drafter and its verification: what a proposer can and cannot change, on the embedded demo model."""

from __future__ import annotations

import io
import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlx_dgemma import Done, load, stream_generate
from mlx_dgemma.decoding.sampler import SamplerConfig, entropy, process_logits
from mlx_dgemma.decoding.verify import DraftSession, Proposal, VerifyConfig
from mlx_dgemma.drafter import (
    DrafterError,
    DrafterProposer,
    LookupProposer,
    NoiseProposer,
    bundled_drafter,
    load_drafter,
    make_proposer,
)
from mlx_dgemma.drafter import train as drafter_train
from mlx_dgemma.drafter.distill import Samples
from mlx_dgemma.drafter.model import Drafter, DrafterArgs
from mlx_dgemma.train.checkpoint import current
from mlx_dgemma.train.trainer import Progress
from tests.conftest import DEMO24, DEMO_PROMPTS

PROMPTS = DEMO_PROMPTS


@pytest.fixture(scope="module")
def demo():
    return load(DEMO24, dtype=mx.float32)


def run(model, tokenizer, prompt, drafter, seed=0, **kw) -> Done:
    events = list(stream_generate(model, tokenizer, prompt, max_tokens=96, seed=seed, drafter=drafter, **kw))
    assert isinstance(events[-1], Done)
    return events[-1]


@pytest.mark.parametrize("seed", [0, 1])
def test_null_drafter_commits_exactly_what_no_drafter_commits(demo, seed):
    model, tokenizer = demo
    for prompt in PROMPTS:
        plain = run(model, tokenizer, prompt, "none", seed)
        noise = run(model, tokenizer, prompt, NoiseProposer(), seed)
        assert noise.answer == plain.answer
        assert noise.stats.drafted_canvases == noise.stats.restarted_canvases == plain.stats.canvases
        # A rejected draft costs its one verification pass, nothing else.
        assert noise.stats.decoder_passes == plain.stats.decoder_passes + plain.stats.canvases


def test_session_switches_a_failing_drafter_off(demo):
    model, tokenizer = demo
    cfg = VerifyConfig(patience=1, min_success=0.5)
    done = run(model, tokenizer, PROMPTS[0], NoiseProposer(), verify=cfg)
    assert done.stats.canvases >= 2
    assert done.stats.drafted_canvases == 1  # off after its first rejection


class FixedProposer:
    """Drafts canvas ``i`` as ``answers[i] + shift`` (token ids mod the vocabulary): the target's own answer with
    ``shift=0``, always wrong otherwise."""

    name = "fixed"

    def __init__(self, answers: list[mx.array], shift: int = 0):
        self.answers, self.shift = answers, shift

    def begin(self, prompt_ids):
        self.index = 0

    def draft(self, index: int, vocab: int) -> mx.array:
        return ((self.answers[min(index, len(self.answers) - 1)] + self.shift) % vocab).astype(mx.int32)

    def propose(self, model, cache):
        canvas = self.draft(self.index, model.args.vocab_size)
        self.index += 1
        return Proposal(canvas, mx.ones(canvas.shape, dtype=mx.bool_))

    def commit(self, tokens):
        pass


class Spy:
    """Records every decoder pass of a model: its input canvas and raw logits."""

    def __init__(self, model):
        self.model, self.denoise, self.calls = model, model.denoise, []

    def __call__(self, canvas, cache, self_conditioning_logits=None, **kw):
        logits = self.denoise(canvas, cache, self_conditioning_logits, **kw)
        mx.eval(logits)
        self.calls.append(logits)
        return logits


def test_a_wrong_drafter_never_gets_a_token_committed_the_target_disagrees_with(demo, monkeypatch):
    model, tokenizer = demo
    cfg = SamplerConfig.from_generation_config(dict(model.generation_config))
    plain = run(model, tokenizer, PROMPTS[1], "none")
    wrong = FixedProposer(_committed_argmax(model, tokenizer, PROMPTS[1]), shift=1)
    spy = Spy(model)
    monkeypatch.setattr(model, "denoise", spy, raising=False)
    events = list(
        stream_generate(
            model,
            tokenizer,
            PROMPTS[1],
            max_tokens=96,
            seed=0,
            drafter=wrong,
            verify=VerifyConfig(guard=0.0),
            previews=True,
        )
    )
    monkeypatch.undo()
    done = events[-1]
    drafts = [e for e in events if type(e).__name__ == "Preview"]
    assert len(spy.calls) == done.stats.decoder_passes == len(drafts)
    assert done.stats.drafted_canvases == done.stats.canvases and done.stats.restarted_canvases == 0
    assert done.stats.decoder_passes > plain.stats.decoder_passes  # a wrong draft costs passes ...

    # ... and every canvas ends on the target's commit rule: stable and confident under its own logits, or
    # the step limit. Replay the recorded passes canvas by canvas.
    at = 0
    commits = [e for e in events if type(e).__name__ == "Commit"]
    for index, commit in enumerate(commits):
        passes = [d for d in drafts if d.canvas_index == index]
        logits = spy.calls[at : at + len(passes)]
        at += len(passes)
        steps = range(cfg.max_denoising_steps, cfg.max_denoising_steps - len(passes), -1)
        argmaxes = [mx.argmax(process_logits(lg, n, cfg), axis=-1) for lg, n in zip(logits, steps)]
        last = argmaxes[-1]
        assert np.array(last[0]).tolist()[: len(commit.tokens)] == commit.tokens  # the target's argmax
        if len(passes) < cfg.max_denoising_steps:
            previous = argmaxes[-2] if len(argmaxes) > 1 else wrong.draft(index, model.args.vocab_size)
            assert mx.array_equal(last, previous)
            mean_entropy = entropy(process_logits(logits[-1], steps[-1], cfg)).mean().item()
            assert mean_entropy < cfg.confidence_threshold
    assert done.answer == plain.answer  # here the target's answer does not depend on where it started


def _committed_argmax(model, tokenizer, prompt) -> list[mx.array]:
    from mlx_dgemma.decoding.block_loop import CommitEvent, generate_tokens, prefill
    from mlx_dgemma.request import encode_prompt, sampler_config

    cache = model.make_cache()
    prefill(model, mx.array([encode_prompt(tokenizer, prompt)]), cache)
    events = generate_tokens(model, cache, 96, sampler_config(model), seed=0)
    return [e.argmax for e in events if isinstance(e, CommitEvent)]


def test_a_draft_the_target_agrees_with_commits_after_one_pass(demo):
    model, tokenizer = demo
    for prompt in PROMPTS:
        plain = run(model, tokenizer, prompt, "none")
        answers = _committed_argmax(model, tokenizer, prompt)
        exact = run(
            model,
            tokenizer,
            prompt,
            FixedProposer(answers),
            verify=VerifyConfig(renoise=0.0, draft_ends=True),
        )
        assert exact.answer == plain.answer
        assert exact.stats.decoder_passes == exact.stats.canvases < plain.stats.decoder_passes
        # Re-noised, the target must predict part of the canvas itself: it may take another pass, never more
        # than without the draft, and it commits the same answer.
        renoised = run(model, tokenizer, prompt, FixedProposer(answers), verify=VerifyConfig(renoise=0.1))
        assert renoised.answer == plain.answer and renoised.stats.decoder_passes <= plain.stats.decoder_passes


@pytest.mark.parametrize("fast", [False, True])
def test_blind_verification_never_shows_the_target_the_draft(demo, fast):
    """Blind: the first pass is the reference's, over noise. A draft wrong everywhere then changes nothing (same
    answer, same passes as without a drafter); the target's own answer as the draft commits that answer in fewer
    passes, since the tokens the first pass already agrees with join the next input."""
    model, tokenizer = demo
    blind = VerifyConfig(blind=True)
    saved = 0
    for prompt in PROMPTS:
        plain = run(model, tokenizer, prompt, "none", fast=fast)
        answers = _committed_argmax(model, tokenizer, prompt)
        wrong = run(model, tokenizer, prompt, FixedProposer(answers, shift=1), verify=blind, fast=fast)
        assert wrong.answer == plain.answer and wrong.stats.decoder_passes == plain.stats.decoder_passes
        assert wrong.stats.drafted_canvases == plain.stats.canvases and wrong.stats.restarted_canvases == 0
        right = run(model, tokenizer, prompt, FixedProposer(answers), verify=blind, fast=fast)
        assert right.answer == plain.answer and right.stats.decoder_passes <= plain.stats.decoder_passes
        saved += plain.stats.decoder_passes - right.stats.decoder_passes
    assert saved > 0


def test_prompt_lookup_proposes_what_followed_the_last_ngram():
    lookup = LookupProposer(max_ngram=3, min_ngram=2)
    ids = [5, 6, 7, 8, 9, 10, 1, 2, 6, 7]
    assert lookup.continuation(ids, 3) == [8, 9, 10]
    assert lookup.continuation([1, 2, 3, 4], 3) == []
    assert lookup.continuation([4, 4, 4, 4], 2) == [4]  # never reads past the end


def test_lookup_drafts_a_repeated_answer(demo):
    from mlx_dgemma.request import encode_prompt

    model, tokenizer = demo
    plain = run(model, tokenizer, PROMPTS[2], "none")
    # A conversation that already holds the answer, and a new answer that has begun the same way: lookup
    # proposes the rest of the earlier answer; the target still decides what is committed.
    turns = [
        {"role": "user", "content": PROMPTS[2]},
        {"role": "assistant", "content": plain.answer},
        {"role": "user", "content": PROMPTS[2]},
    ]
    ids = encode_prompt(tokenizer, turns) + tokenizer.encode(plain.answer, add_special_tokens=False)[:4]

    def answer(drafter):
        events = list(stream_generate(model, tokenizer, None, 96, prompt_ids=ids, seed=0, drafter=drafter))
        return events[-1]

    looked, without = answer("lookup"), answer("none")
    assert looked.stats.drafter == "lookup" and looked.stats.drafted_canvases >= 1
    assert looked.stats.restarted_canvases < looked.stats.drafted_canvases  # the target took the draft up
    assert without.stats.drafted_canvases == 0


def test_bundled_drafter_is_used_by_default_and_helps(demo):
    model, tokenizer = demo
    assert bundled_drafter(model) is not None
    assert isinstance(make_proposer("auto", model), DrafterProposer)
    plain = [run(model, tokenizer, p, "none", i) for i, p in enumerate(PROMPTS)]
    drafted = [run(model, tokenizer, p, "auto", i) for i, p in enumerate(PROMPTS)]
    assert all(d.stats.drafter == "drafter" for d in drafted)
    assert sum(d.stats.decoder_passes for d in drafted) < sum(p.stats.decoder_passes for p in plain)


def test_a_confident_drafter_drafts_only_the_positions_it_is_sure_of(demo):
    """``confidence=c`` keeps the drafter's tokens and drafts exactly the positions whose drafter probability
    reaches ``c`` (the others start as noise); ``0`` drafts every position; a bad value is a one-line error."""
    from mlx_dgemma.decoding.block_loop import prefill
    from mlx_dgemma.request import encode_prompt

    model, tokenizer = demo
    drafter = load_drafter(bundled_drafter(model), model)
    cache = model.make_cache()
    cache.capture = tuple(drafter.args.target_layers)
    prefill(model, mx.array([encode_prompt(tokenizer, PROMPTS[0])], dtype=mx.int32), cache)

    def propose(confidence: float) -> Proposal:
        proposer = DrafterProposer(drafter, confidence=confidence)
        proposer.begin([[]])
        return proposer.propose(model, cache)

    every = propose(0.0)
    assert every.drafted.all().item()
    context = drafter.fuse(mx.concatenate(cache.features, axis=1))
    pad = mx.full(every.canvas.shape, model.args.pad_token_id, dtype=mx.int32)
    probs = mx.softmax(
        model.logits(drafter(model.model.decoder.embed(pad), context, cache.valid)).astype(mx.float32),
        axis=-1,
    )
    sure = np.array(probs.max(axis=-1))
    assert (
        0 < (sure >= 0.9).sum() < sure.size
    )  # the threshold splits this canvas (else the test shows nothing)
    for c in (0.5, 0.9, 0.99):
        p = propose(c)
        assert np.array_equal(np.array(p.canvas), np.array(every.canvas))
        np.testing.assert_array_equal(np.array(p.drafted), sure >= c)
    with pytest.raises(DrafterError, match="confidence"):
        DrafterProposer(drafter, confidence=1.0)


def test_drafter_train_cli_distils_resumes_and_records_its_target(demo, tmp_path, capsys):
    model, _ = demo
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": p}) for p in PROMPTS) + "\n")
    out = tmp_path / "drafter"
    argv = [
        "--data",
        str(prompts),
        "--out",
        str(out),
        "--iters",
        "4",
        "--save-every",
        "2",
        "--batch-size",
        "2",
        "--dtype",
        "float32",
        "--max-tokens",
        "48",
        "--model",
        str(DEMO24),
    ]
    assert drafter_train.main(argv) == 0
    printed = capsys.readouterr().out  # piped: plain lines, no bars
    assert "\r" not in printed and "step 4/4  loss" in printed and "distillation: " in printed
    config = json.loads((out / "config.json").read_text())
    assert config["target"]["vocab_size"] == model.args.vocab_size and config["training"]["steps"] == 4
    checkpoint = current(tmp_path / "drafter.work")  # training's layout: a step folder named by a pointer
    assert json.loads((checkpoint / "trainer_state.json").read_text())["step"] == 4
    assert {f.name for f in checkpoint.iterdir()} == {
        "drafter.safetensors",
        "optimizer.safetensors",
        "trainer_state.json",
    }
    assert drafter_train.main([*argv[:5], "8", *argv[6:], "--resume"]) == 0
    printed = capsys.readouterr().out  # the features are reused, training continues its checkpoint
    assert "features: all 3 records collected already" in printed and "resuming at step 4" in printed
    assert "distil 1/3" not in printed
    assert json.loads((out / "config.json").read_text())["training"]["steps"] == 8
    assert not [p.name for p in tmp_path.iterdir() if ".tmp" in p.name]  # the folder writers left nothing
    proposer = make_proposer(out, model)
    assert isinstance(proposer, DrafterProposer)
    assert run(model, load(DEMO24)[1], PROMPTS[0], proposer).stats.drafted_canvases >= 1

    # A drafter refuses a target of another shape, in one line.
    config["target"]["config_hash"] = "0" * 16
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(DrafterError, match="trained for another target"):
        load_drafter(out, model)


def toy_trainer(model, work, iters: int, save_every: int) -> drafter_train.DrafterTrainer:
    """A drafter trainer on 12 random samples (features of 3 to 8 positions): no distillation to wait for."""
    rng = np.random.default_rng(0)
    a = model.args
    dargs = DrafterArgs(a.hidden_size, a.vocab_size, a.canvas_length, num_layers=1)
    F = len(dargs.target_layers) * a.hidden_size
    lengths = rng.integers(3, 9, size=12)
    features = [mx.array(rng.standard_normal((int(n), F)), dtype=mx.float16) for n in lengths]
    canvases = [mx.array(rng.integers(0, a.vocab_size, a.canvas_length)) for _ in lengths]
    mx.random.seed(5)
    cfg = drafter_train.train_config(
        drafter_train.build_parser().parse_args(
            f"--data - --out - --iters {iters} --save-every {save_every} --batch-size 3 --lr 3e-3 --seed 2".split()
        )
    )
    return drafter_train.DrafterTrainer(
        Drafter(dargs), model, Samples.stack(features, canvases, 4), cfg, work
    )


def steps(trainer) -> list[float]:
    return [trainer.train_step().loss for _ in range(trainer.step, trainer.cfg.iters)]


def test_drafter_training_resumes_with_the_losses_of_an_uninterrupted_run(demo, tmp_path):
    """The checkpoint (training's step folder) holds weights, optimizer state and step: a resumed run continues
    exactly; so does one resumed from the single-file checkpoint work folders held before that layout."""
    model, _ = demo
    whole = steps(toy_trainer(model, tmp_path / "whole", 6, 0))
    first = toy_trainer(model, tmp_path / "cut", 6, 4)
    first.run(Progress(6, io.StringIO()))  # saves at step 4 only
    assert json.loads((current(tmp_path / "cut") / "trainer_state.json").read_text()) == {"step": 4}
    again = toy_trainer(model, tmp_path / "cut", 6, 0)
    assert again.resume() and again.step == 4
    assert steps(again) == whole[4:]
    assert not toy_trainer(model, tmp_path / "empty", 6, 0).resume()

    # The legacy layout: <work>/checkpoint.safetensors, drafter.* and optimizer.* arrays, the step in metadata.
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    folder = current(tmp_path / "cut")
    arrays = {f"drafter.{k}": v for k, v in mx.load(str(folder / "drafter.safetensors")).items()}
    arrays |= {f"optimizer.{k}": v for k, v in mx.load(str(folder / "optimizer.safetensors")).items()}
    mx.save_safetensors(str(legacy / "checkpoint.safetensors"), arrays, metadata={"step": "4"})
    old = toy_trainer(model, legacy, 6, 5)
    assert old.resume() and old.step == 4
    assert steps(old) == whole[4:]
    old.save()  # a checkpoint of training's layout supersedes the legacy file
    assert not (legacy / "checkpoint.safetensors").exists() and current(legacy).name == "checkpoint-0000006"


def test_drafter_training_uses_trainings_optimizer_and_schedule(demo, tmp_path):
    """AdamW (weight decay 0.01) with a cosine decay from --lr to a tenth over --iters, no warmup."""
    import mlx.optimizers as optim

    trainer = toy_trainer(demo[0], tmp_path, 10, 0)
    opt = trainer.optimizer
    assert isinstance(opt, optim.AdamW) and opt.weight_decay == 0.01
    want = optim.cosine_decay(3e-3, 10, 3e-4)
    for k in range(10):
        trainer.train_step()  # step k + 1 ran at the rate of step k
        assert opt.learning_rate.item() == pytest.approx(want(mx.array(k)).item(), rel=1e-6)


DEMO_ANSWERS = [
    '{"name": "Maya", "age": 34, "city": "Oslo", "job": "pilot", "languages": ["Greek", "Hindi"]}',
    '{"name": "Bob", "age": 51, "city": "Lima", "job": "editor", "languages": ["French"]}',
]


def test_distillation_from_data_is_the_teacher_forced_answers(demo, tmp_path, capsys):
    """--from-data: one sample per answer canvas, EOS-filled as training fills it, with the context a target's
    cache holds before that canvas at inference (prompt + earlier canvases; the encoder is causal)."""
    from mlx_dgemma.decoding.block_loop import prefill
    from mlx_dgemma.drafter.distill import collect_from_data
    from mlx_dgemma.request import eos_ids
    from mlx_dgemma.train.data import load_jsonl

    model, tokenizer = demo  # answers of two 24-token canvases
    records = tmp_path / "data.jsonl"
    records.write_text(
        "".join(json.dumps({"prompt": p, "completion": a}) + "\n" for p, a in zip(DEMO_PROMPTS, DEMO_ANSWERS))
    )
    layers, C = (1, 3, 5), model.args.canvas_length
    samples = collect_from_data(model, tokenizer, records, layers, 256, max_tokens=96)
    at = 0
    for ex in load_jsonl(records, tokenizer, eos_ids(model, tokenizer)):
        for k in range(-(-len(ex.answer) // C)):
            part = ex.answer[k * C : (k + 1) * C]
            assert np.array(samples.canvases[at]).tolist() == part + [tokenizer.eos_token_id] * (
                C - len(part)
            )
            cache = model.make_cache()
            cache.capture = layers
            prefill(model, mx.array([ex.prompt + ex.answer[: k * C]]), cache)
            want = np.array(mx.concatenate(cache.features, axis=1)[0, -256:].astype(mx.float32))
            got = np.array(
                samples.features[int(samples.starts[at]) : int(samples.starts[at] + samples.lengths[at])]
            )
            assert got.shape == want.shape
            np.testing.assert_allclose(got.astype(np.float32), want, atol=2e-2, rtol=2e-2)
            at += 1
    assert at == len(samples) == 4 and samples.prompts == 2

    out = tmp_path / "drafter"
    assert (
        drafter_train.main(
            [
                "--data",
                str(records),
                "--out",
                str(out),
                "--from-data",
                "--iters",
                "2",
                "--batch-size",
                "2",
                "--dtype",
                "float32",
                "--model",
                str(DEMO24),
            ]
        )
        == 0
    )
    assert "distillation: 4 canvases from 2 records" in capsys.readouterr().out
    assert isinstance(make_proposer(out, model), DrafterProposer)


def test_bad_prompt_lines_are_reported_with_their_number(tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "fine"}\n{"text": "no prompt"}\n')
    code = drafter_train.main(["--data", str(prompts), "--out", str(tmp_path / "d")])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: prompts.jsonl line 2:") and "\n" not in err
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (["--lr", "0"], "--lr must be a positive number"),
        (["--batch-size", "0"], "--batch-size must be at least 1"),
        (["--iters", "-2"], "--iters must be at least 0"),
        (["--layers", "0"], "--layers must be at least 1"),
        (["--confidence", "1"], "--confidence must be in [0, 1)"),
    ],
)
def test_drafter_train_numbers_out_of_range_are_one_line_errors(tmp_path, capsys, flags, words):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "fine"}\n')
    assert drafter_train.main(["--data", str(prompts), "--out", str(tmp_path / "d"), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and words in err and "\n" not in err


def test_drafter_train_flags_are_never_abbreviated():
    with pytest.raises(SystemExit):
        drafter_train.build_parser().parse_args(["--data", "p", "--out", "d", "--iter", "3"])


def test_default_target_layers_spread_over_the_target():
    assert drafter_train.default_target_layers(6) == [1, 3, 5]
    assert drafter_train.default_target_layers(30) == [1, 6, 11, 17, 22, 27]


def test_a_conversion_carries_the_models_drafter(tmp_path):
    from mlx_dgemma import load_model
    from mlx_dgemma.convert import convert

    out = convert(DEMO24, tmp_path / "q4", quantize=True, progress=False).path
    assert isinstance(make_proposer("auto", load_model(out)), DrafterProposer)


@pytest.mark.parametrize("fast", [False, True])
def test_held_drafts_stay_in_the_input_and_commit_sooner(demo, fast):
    """Hold: a drafted token the target agrees with stays in the next input instead of fresh noise. The target's
    own answer as the draft then commits that answer in fewer passes than unheld; a draft wrong everywhere, held
    only where the target happens to agree with it, still ends on the target's answer."""
    model, tokenizer = demo
    # Half the draft re-noised: the first pass cannot commit, and what it does not accept is held or re-noised.
    held, unheld = VerifyConfig(renoise=0.5, guard=0.0), VerifyConfig(hold=False, renoise=0.5, guard=0.0)
    saved = 0
    for prompt in PROMPTS:
        answers = _committed_argmax(model, tokenizer, prompt)
        wrong = [
            run(model, tokenizer, prompt, FixedProposer(answers, shift=1), verify=v, fast=fast)
            for v in (held, unheld)
        ]
        assert wrong[0].answer == wrong[1].answer
        right = [
            run(model, tokenizer, prompt, FixedProposer(answers), verify=v, fast=fast) for v in (held, unheld)
        ]
        assert right[0].answer == right[1].answer == run(model, tokenizer, prompt, "none", fast=fast).answer
        assert right[0].stats.decoder_passes <= right[1].stats.decoder_passes
        saved += right[1].stats.decoder_passes - right[0].stats.decoder_passes
    assert saved > 0


def test_drafted_end_tokens_start_as_noise_with_draft_ends_off(demo):
    """With ``VerifyConfig(draft_ends=False)`` a session drafts no end-of-sequence or pad token; by default it
    drafts them (measured: docs/drafter.md)."""
    model, _ = demo
    a = model.args
    canvas = mx.array(
        [[7, a.eos_token_id[0], 9, a.pad_token_id] + [11] * (a.canvas_length - 4)], dtype=mx.int32
    )
    proposer = FixedProposer([canvas])
    session = DraftSession(proposer, [[1, 2]], VerifyConfig(draft_ends=False))
    assert session.propose(model, None).drafted[0, :4].tolist() == [True, False, True, False]
    session = DraftSession(proposer, [[1, 2]])
    assert session.propose(model, None).drafted.all().item()


def test_a_drafter_folder_drafts_at_the_confidence_it_records(demo, tmp_path):
    """``"propose": {"confidence": c}`` in a drafter's config.json is what ``make_proposer`` drafts at (0 without
    it); a bad value is a one-line error naming the file and the fix."""
    import shutil

    model, _ = demo
    folder = tmp_path / "drafter"
    shutil.copytree(bundled_drafter(model), folder)
    config = json.loads((folder / "config.json").read_text())
    config.pop("propose", None)
    (folder / "config.json").write_text(json.dumps(config))
    assert make_proposer(str(folder), model).confidence == 0.0
    (folder / "config.json").write_text(json.dumps({**config, "propose": {"confidence": 0.9}}))
    assert make_proposer(str(folder), model).confidence == 0.9
    for bad in (1.5, "high", True):
        (folder / "config.json").write_text(json.dumps({**config, "propose": {"confidence": bad}}))
        with pytest.raises(DrafterError, match=r"propose.confidence must be a number in \[0, 1\)") as e:
            make_proposer(str(folder), model)
        assert "\n" not in str(e.value) and "config.json" in str(e.value)


def test_fast_mode_freezes_held_drafted_tokens_after_the_first_pass(demo):
    """``FastConfig.freeze_drafts``: a held draft's tokens count as accepted, so those the first pass reproduces
    surely freeze at once and later passes compute fewer positions, for the same answer."""
    from mlx_dgemma.decoding.fast import FastConfig

    model, tokenizer = demo
    for prompt in PROMPTS:
        answers = _committed_argmax(model, tokenizer, prompt)
        on, off = (
            run(
                model,
                tokenizer,
                prompt,
                FixedProposer(answers),
                fast=FastConfig(freeze_drafts=f),
                verify=VerifyConfig(renoise=0.5),
            )
            for f in (True, False)
        )
        assert on.answer == off.answer == run(model, tokenizer, prompt, "none").answer
        assert on.stats.decoder_positions < off.stats.decoder_positions


def test_a_bundled_drafter_for_another_target_is_ignored_with_a_warning(tmp_path, caplog):
    """``--drafter auto`` on a folder whose ``drafter/`` was trained for another model: no drafter, and one
    warning line naming the folder and the fix (a hand-copied drafter folder used to cost its passes silently)."""
    import shutil

    from mlx_dgemma import DEFAULT_MODEL

    folder = tmp_path / "model"
    shutil.copytree(DEMO24, folder)
    shutil.copytree(Path(DEFAULT_MODEL) / "drafter", folder / "drafter", dirs_exist_ok=True)
    model, _ = load(folder, dtype=mx.float32)
    with caplog.at_level("WARNING"):
        assert bundled_drafter(model) is None and make_proposer("auto", model) is None
    warned = [r.getMessage() for r in caplog.records if "another target" in r.getMessage()]
    assert warned and str(folder / "drafter") in warned[0] and "mlx_dgemma.drafter.train" in warned[0]
