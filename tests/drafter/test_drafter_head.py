"""The drafter's shortlist head (``mlx_dgemma.drafter.head``): building a shortlist from token counts, the file in a
drafter folder, proposals over it against the full head's, and its command line, on the 24-token demo model."""

from __future__ import annotations

import json
import shutil

import mlx.core as mx
import mlx.nn as nn
import pytest

from mlx_dgemma import load, stream_generate
from mlx_dgemma.decoding.block_loop import prefill
from mlx_dgemma.drafter import DrafterProposer, load_drafter, make_proposer
from mlx_dgemma.drafter import head as head_module
from mlx_dgemma.drafter.head import (
    SHORTLIST_FILE,
    DraftHead,
    Shortlist,
    build_shortlist,
    count_tokens,
    coverage,
    read_shortlist,
    save_shortlist,
)
from mlx_dgemma.errors import DrafterError
from mlx_dgemma.request import encode_prompt
from tests.conftest import DEMO24, DEMO_PROMPTS


@pytest.fixture(scope="module")
def demo():
    return load(DEMO24, dtype=mx.float32)


@pytest.fixture(scope="module")
def drafter(demo):
    return load_drafter(DEMO24 / "drafter", demo[0])


def filled_cache(model, tokenizer, proposer, prompt):
    """A cache holding ``prompt``, with the features ``proposer`` reads (its first canvas's proposal)."""
    cache = model.make_cache()
    cache.capture = proposer.capture
    prefill(model, mx.array([encode_prompt(tokenizer, prompt)]), cache)
    return cache


def proposal(model, cache, proposer, prompt_ids=()):
    proposer.begin([list(prompt_ids)])
    p = proposer.propose(model, cache)
    assert p is not None
    return p


def test_a_shortlist_holds_the_ends_then_the_most_frequent():
    counts = count_tokens([[7, 7, 3, 9], [3, 7, 5], [9]])
    assert counts == {7: 3, 3: 2, 9: 2, 5: 1}
    ids = build_shortlist(counts, 4, 16, always=[1])
    assert ids.tolist() == [1, 7, 3, 9]  # ties: the lower id first
    assert build_shortlist(counts, 7, 16, always=[1]).tolist() == [1, 7, 3, 9, 5, 0, 2]  # then unseen ids
    assert coverage(counts, ids) == pytest.approx(7 / 8)
    assert coverage(counts, build_shortlist(counts, 16, 16)) == 1.0


@pytest.mark.parametrize(
    "size, always, counts, message",
    [
        (0, [], {}, "the shortlist size must be between 1 and the vocabulary (16); got 0"),
        (17, [], {}, "the shortlist size must be between 1 and the vocabulary (16); got 17"),
        (1, [1, 2], {}, "a shortlist of 1 cannot hold the 2 end tokens: give a larger --size"),
        (4, [], {20: 1}, "token id 20 is outside the vocabulary of 16: wrong tokenizer?"),
    ],
)
def test_bad_shortlists_are_one_line(size, always, counts, message):
    with pytest.raises(DrafterError) as e:
        build_shortlist(counts, size, 16, always)
    assert str(e.value) == message


def test_a_shortlist_is_saved_and_loaded_with_its_drafter(demo, tmp_path):
    model, _ = demo
    folder = tmp_path / "drafter"
    shutil.copytree(DEMO24 / "drafter", folder)
    assert read_shortlist(folder, model.args.vocab_size) is None
    assert make_proposer(folder, model).shortlist is None
    saved = Shortlist(mx.array([1, 5, 40, 3], dtype=mx.int32), prompt=True, estimate_rest=False)
    save_shortlist(folder, saved, {"coverage": "0.5"})
    loaded = read_shortlist(folder, model.args.vocab_size)
    assert loaded is not None and loaded.ids.tolist() == [1, 5, 40, 3]
    assert (loaded.prompt, loaded.estimate_rest) == (True, False)
    proposer = make_proposer(folder, model)
    assert isinstance(proposer, DrafterProposer) and proposer.shortlist is not None
    assert proposer.shortlist.ids.tolist() == [1, 5, 40, 3]
    assert not list(folder.glob(".tmp-*"))  # written through a temporary file, renamed into place


@pytest.mark.parametrize(
    "arrays, problem",
    [
        ({"ids": mx.array([1, 1], dtype=mx.int32)}, "its ids must be distinct and in [0, "),
        ({"ids": mx.array([1, 99999], dtype=mx.int32)}, "its ids must be distinct and in [0, "),
        ({"other": mx.array([1], dtype=mx.int32)}, "holds no 1-D integer 'ids'"),
        ({"ids": mx.array([1.0])}, "holds no 1-D integer 'ids'"),
    ],
)
def test_a_broken_shortlist_file_is_one_line(demo, tmp_path, arrays, problem):
    mx.save_safetensors(str(tmp_path / SHORTLIST_FILE), arrays)
    with pytest.raises(DrafterError) as e:
        read_shortlist(tmp_path, demo[0].args.vocab_size)
    message = str(e.value)
    assert problem in message and "python -m mlx_dgemma.drafter.head" in message and "\n" not in message


def test_an_unreadable_shortlist_file_is_one_line(demo, tmp_path):
    (tmp_path / SHORTLIST_FILE).write_bytes(b"not a safetensors file")
    with pytest.raises(DrafterError, match=r"^cannot read .*shortlist\.safetensors"):
        read_shortlist(tmp_path, demo[0].args.vocab_size)


@pytest.mark.parametrize("confidence", [0.0, 0.9])
def test_a_shortlist_of_everything_proposes_what_the_full_head_does(demo, drafter, confidence):
    model, tokenizer = demo
    V = model.args.vocab_size
    everything = Shortlist(mx.array(list(range(V))[::-1], dtype=mx.int32))  # another order: ids mapped back
    full = DrafterProposer(drafter, confidence=confidence)
    short = DrafterProposer(drafter, confidence=confidence, shortlist=everything)
    for prompt in DEMO_PROMPTS:
        cache = filled_cache(model, tokenizer, full, prompt)
        a, b = proposal(model, cache, full), proposal(model, cache, short)
        assert a.canvas.tolist() == b.canvas.tolist()
        assert a.drafted.tolist() == b.drafted.tolist()
        assert mx.allclose(a.soft, b.soft, atol=1e-4).item()


def test_tokens_outside_the_shortlist_are_never_drafted(demo, drafter):
    model, tokenizer = demo
    full = DrafterProposer(drafter)
    cache = filled_cache(model, tokenizer, full, DEMO_PROMPTS[0])
    drafted = set(proposal(model, cache, full).canvas.reshape(-1).tolist())
    keep = sorted(drafted)[: len(drafted) // 2]  # half of what the full head drafts here
    ids = mx.array(sorted({*keep, 1}), dtype=mx.int32)
    for prompt_tokens in (False, True):
        short = DrafterProposer(drafter, shortlist=Shortlist(ids, prompt=prompt_tokens))
        prompt_ids = encode_prompt(tokenizer, DEMO_PROMPTS[0])
        p = proposal(model, cache, short, prompt_ids)
        allowed = set(keep) | {1} | (set(prompt_ids) if prompt_tokens else set())
        assert set(p.canvas.reshape(-1).tolist()) <= allowed
        assert p.soft is not None and p.soft.shape == (1, model.args.canvas_length, model.args.hidden_size)


def test_the_estimate_of_the_rest_only_lowers_the_confidence(demo, drafter):
    model, tokenizer = demo
    ids = build_shortlist(count_tokens([encode_prompt(tokenizer, p) for p in DEMO_PROMPTS]), 64, 1024, [1])
    renormalised = DrafterProposer(drafter, confidence=0.9, shortlist=Shortlist(ids, estimate_rest=False))
    estimated = DrafterProposer(drafter, confidence=0.9, shortlist=Shortlist(ids, estimate_rest=True))
    for prompt in DEMO_PROMPTS:
        cache = filled_cache(model, tokenizer, renormalised, prompt)
        a, b = proposal(model, cache, renormalised), proposal(model, cache, estimated)
        assert a.canvas.tolist() == b.canvas.tolist()
        assert not (b.drafted & ~a.drafted).any().item()  # drafts nothing the renormalised head does not


def test_a_quantized_embedding_gives_its_own_logits_at_the_shortlist(demo):
    model, _ = demo
    embedding = nn.QuantizedEmbedding.from_embedding(model.model.decoder.embed_tokens, group_size=64, bits=4)
    ids = mx.array([9, 1, 500, 33], dtype=mx.int32)
    head = DraftHead(embedding, 30.0, ids)
    h = mx.random.normal((2, 3, model.args.hidden_size), key=mx.random.key(0))
    full = mx.tanh(embedding.as_linear(h) / 30.0) * 30.0
    assert mx.allclose(head.logits(h), full[..., ids], atol=1e-4).item()
    rest = head.log_rest(h)
    assert rest is not None and rest.shape == (2, 3)
    # A floor of the rest's log-mass (Jensen, before the soft-cap): at most the true one here.
    others = mx.array([i for i in range(1024) if i not in (9, 1, 500, 33)])
    assert (rest <= mx.logsumexp(full[..., others], axis=-1) + 1e-3).all().item()


def test_the_command_line_builds_a_shortlist_for_a_drafter_folder(demo, tmp_path, capsys):
    model, tokenizer = demo
    target = tmp_path / "demo24"
    shutil.copytree(DEMO24, target)
    data = tmp_path / "train.jsonl"
    records = [{"prompt": p, "completion": '{"name": "Maya"}'} for p in DEMO_PROMPTS]
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert head_module.main(["--drafter", str(target / "drafter"), "--data", str(data), "--size", "40"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"wrote {target / 'drafter' / SHORTLIST_FILE}: 40 of 1024 tokens, 100.00% of")
    loaded = read_shortlist(target / "drafter", 1024)
    assert loaded is not None and loaded.ids.size == 40 and loaded.prompt
    answer = set(tokenizer.encode('{"name": "Maya"}', add_special_tokens=False))
    assert answer <= set(loaded.ids.tolist()) and {*model.args.eos_token_id} <= set(loaded.ids.tolist())
    events = list(
        stream_generate(model, tokenizer, DEMO_PROMPTS[0], max_tokens=48, drafter=target / "drafter")
    )
    assert events[-1].stats.drafted_canvases >= 1  # the folder drafts over its shortlist


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--size", "0"], "error: the shortlist size must be between 1 and the vocabulary (1024); got 0"),
        (["--size", "8", "--data", "missing.jsonl"], "error: data not found: missing.jsonl"),
    ],
)
def test_the_command_line_errors_are_one_line(tmp_path, capsys, extra, message):
    target = tmp_path / "demo24"
    shutil.copytree(DEMO24, target)
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"prompt": DEMO_PROMPTS[0], "completion": "x"}) + "\n")
    argv = ["--drafter", str(target / "drafter"), "--data", str(data), "--size", "8", *extra]
    assert head_module.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and len(err.strip().splitlines()) == 1, err
    assert not (target / "drafter" / SHORTLIST_FILE).exists()
