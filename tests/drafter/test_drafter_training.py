"""Training a drafter end to end: data sources and shapes, the on-disk feature store (sharded, memory-mapped,
resumable), the command line, on a tiny random checkpoint in the released layout (sharded, released config form),
its 4-bit conversion, and the embedded demo model with its task's data."""

from __future__ import annotations

import io
import json
import shutil
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlx_dgemma import load, load_tokenizer, stream_generate
from mlx_dgemma.drafter import DrafterProposer, distill, load_drafter, make_proposer
from mlx_dgemma.drafter import data as drafter_data
from mlx_dgemma.drafter import train as drafter_train
from mlx_dgemma.drafter.features import needed_positions, record_rows
from mlx_dgemma.errors import DrafterError
from mlx_dgemma.request import eos_ids
from mlx_dgemma.train.data import prompt_messages, record_messages
from tests.conftest import DEMO24

# A tokenizer for the released fixture (vocabulary 512): the demo's byte-level BPE cut to its first 500 ids.
VOCAB_KEPT = 500
WORDS = [
    "alpha",
    "beta",
    "gamma",
    "delta",
    "epsilon",
    "zeta",
    "eta",
    "theta",
    "iota",
    "kappa",
    "lambda",
    "mu",
]


def tiny_tokenizer(folder: Path) -> None:
    """Write the demo's tokenizer, its vocabulary and merges cut below ``VOCAB_KEPT``, and chat template."""
    spec = json.loads((DEMO24 / "tokenizer.json").read_text())
    vocab = {k: i for k, i in spec["model"]["vocab"].items() if i < VOCAB_KEPT}
    spec["model"]["vocab"] = vocab
    spec["model"]["merges"] = [
        m for m in spec["model"]["merges"] if m[0] in vocab and m[1] in vocab and m[0] + m[1] in vocab
    ]
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    for name in ("tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(DEMO24 / name, folder / name)


@pytest.fixture(scope="module")
def released(fixture_factory, tmp_path_factory) -> Path:
    """The base fixture's released-layout checkpoint (sharded, released config form), with a tokenizer."""
    folder = tmp_path_factory.mktemp("released") / "model"
    shutil.copytree(fixture_factory("base").hf_released, folder)
    tiny_tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def target(released):
    return load(released, dtype=mx.float32)


def records(n: int = 6) -> list[dict]:
    """Prompt/completion records whose answers span one to three 8-token canvases."""
    out = []
    for i in range(n):
        words = [WORDS[(i + k) % len(WORDS)] for k in range(3 + 4 * i)]
        out.append({"prompt": f"Say {len(words)} words after {WORDS[i]}.", "completion": " ".join(words)})
    return out


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


class Quiet:
    """A collection progress that keeps its lines."""

    def __init__(self):
        self.lines: list[str] = []
        self.calls: list[tuple[str, int, int]] = []

    def __call__(self, stage, done, total, note=""):
        self.calls.append((stage, done, total))

    def line(self, text):
        self.lines.append(text)


def collect(target, data: Path, folder: Path, window=12, shard_bytes=1 << 30, max_records=None, **kw):
    model, tokenizer = target
    return distill.collect_features(
        model,
        tokenizer,
        drafter_data.resolve(data),
        folder,
        capture=[1, 3, 5],
        window=window,
        max_tokens=kw.pop("max_tokens", 24),
        from_data=kw.pop("from_data", True),
        max_records=max_records,
        shard_bytes=shard_bytes,
        progress=kw.pop("progress", Quiet()),
        **kw,
    )


def test_released_checkpoint_trains_a_drafter_from_the_command_line(released, target, tmp_path, capsys):
    """The whole path on the released layout: JSONL records, teacher-forced features in shards, training, a drafter
    folder that loads with its target and drafts canvases for it."""
    model, tokenizer = target
    data = write_jsonl(tmp_path / "train.jsonl", records())
    out = tmp_path / "drafter"
    argv = [
        "--model",
        str(released),
        "--data",
        str(data),
        "--out",
        str(out),
        "--from-data",
        "--dtype",
        "float32",
    ]
    argv += [
        "--iters",
        "3",
        "--batch-size",
        "2",
        "--max-tokens",
        "24",
        "--context-window",
        "12",
        "--shard-mb",
        "0.02",
        "--shortlist",
        "40",
    ]
    assert drafter_train.main(argv) == 0
    printed = capsys.readouterr().out
    C = model.args.canvas_length
    found = [
        ex
        for _, ex in drafter_data.examples(drafter_data.resolve(data), tokenizer, eos_ids(model, tokenizer))
    ]
    canvases = sum(min(-(-len(ex.answer) // C), 3) for ex in found)
    assert canvases > len(found)  # some answers span several canvases
    assert f"features: 6 records, {canvases} canvases" in printed
    assert f"distillation: {canvases} canvases from 6 records" in printed and "step 3/3  loss" in printed
    assert "\r" not in printed  # piped: plain lines
    index = json.loads((tmp_path / "drafter.work" / "features" / "index.json").read_text())
    assert len(index["shards"]) >= 2 and index["settings"]["context_window"] == 12

    drafter = load_drafter(out, model)
    assert drafter.args.context_window == 12 and drafter.args.target_layers == [1, 3, 5]
    proposer = make_proposer(out, model)
    assert isinstance(proposer, DrafterProposer)
    assert proposer.shortlist is not None and proposer.shortlist.ids.size == 40  # --shortlist 40
    assert "shortlist: 40 tokens" in printed
    events = list(
        stream_generate(model, tokenizer, "Say 5 words after beta.", max_tokens=16, drafter=proposer)
    )
    assert events[-1].stats.drafted_canvases >= 1


def test_a_4bit_conversion_of_the_released_checkpoint_trains_a_drafter(released, tmp_path):
    """A drafter trains through a quantized target's embedding and LM head, and loads with it."""
    from mlx_dgemma.convert import convert

    q4 = convert(released, tmp_path / "q4", quantize=True, progress=False).path
    data = write_jsonl(tmp_path / "train.jsonl", records(3))
    out = tmp_path / "drafter"
    argv = ["--model", str(q4), "--data", str(data), "--out", str(out), "--from-data", "--iters", "2"]
    assert drafter_train.main([*argv, "--batch-size", "2", "--max-tokens", "16"]) == 0
    model, _ = load(q4)
    assert np.isfinite(json.loads((out / "config.json").read_text())["training"]["final_loss"])
    assert isinstance(make_proposer(out, model), DrafterProposer)


@pytest.mark.parametrize("window", [5, 12])  # shorter than a canvas (8): windows apart; longer: they overlap
def test_the_memory_mapped_store_gives_the_in_memory_batches(target, tmp_path, window):
    """Each record's rows are stored once; every sample's window read from the shards equals the in-memory
    sample's own copy (``collect_from_data``), and so does every batch the trainer builds."""
    model, tokenizer = target
    data = write_jsonl(tmp_path / "train.jsonl", records())
    store = collect(target, data, tmp_path / "features", window=window, shard_bytes=4096)
    memory = distill.collect_from_data(model, tokenizer, data, [1, 3, 5], window, max_tokens=24)
    assert len(store) == len(memory) and store.records == memory.prompts == 6
    assert isinstance(store.window(0), np.memmap)
    stored_rows = sum(len(np.load(p, mmap_mode="r")) for p in (tmp_path / "features").glob("*.features.npy"))
    assert stored_rows < sum(memory.lengths) if window > 8 else stored_rows == sum(memory.lengths)
    for i in range(len(store)):
        np.testing.assert_array_equal(store.window(i), memory.window(i))
    np.testing.assert_array_equal(store.targets(range(len(store))), memory.targets(range(len(memory))))

    cfg = drafter_train.train_config(
        drafter_train.build_parser().parse_args(
            ["--data", "-", "--out", "-", "--iters", "1", "--batch-size", "4"]
        )
    )
    from mlx_dgemma.drafter.model import Drafter, DrafterArgs

    a = model.args
    dargs = DrafterArgs(a.hidden_size, a.vocab_size, a.canvas_length, context_window=window, num_layers=1)
    trainers = [
        drafter_train.DrafterTrainer(Drafter(dargs), model, s, cfg, tmp_path) for s in (store, memory)
    ]
    idx = np.array([len(store) - 1, 0, 2])
    for got, want in zip(trainers[0].batch(idx), trainers[1].batch(idx)):
        np.testing.assert_array_equal(np.array(got), np.array(want))


def test_record_rows_count_each_needed_position_once():
    for prompt, count, C, W in [(3, 1, 8, 12), (30, 3, 8, 12), (30, 3, 8, 5), (2, 4, 8, 8), (0, 2, 8, 3)]:
        windows = distill.canvas_windows(prompt, count, C, W)
        assert record_rows(prompt, count, C, W) == len(needed_positions(windows))
        assert all(0 <= a < b == prompt + k * C for k, (a, b) in enumerate(windows) if b)


def test_collection_resumes_after_the_last_complete_shard(target, tmp_path, monkeypatch):
    """Interrupted while encoding, a run keeps its complete shards (an unfinished one is dropped); the next run
    encodes only the records after them, and ends with the samples of an uninterrupted run."""
    model, tokenizer = target
    data = write_jsonl(tmp_path / "train.jsonl", records())
    whole = collect(target, data, tmp_path / "whole")

    real = distill.teacher_forced_record
    encoded: list[list[int]] = []

    def counting(model, example, *args):
        encoded.append(example.prompt)
        if stop_at is not None and len(encoded) == stop_at:
            raise KeyboardInterrupt
        return real(model, example, *args)

    monkeypatch.setattr(distill, "teacher_forced_record", counting)
    plan = distill.scan(drafter_data.resolve(data), tokenizer, model, True, 24, None, Quiet())
    F = 3 * model.args.hidden_size
    sizes = [record_rows(p, c, 8, 12) * F * 2 for p, c in zip(plan.prompt_lengths, plan.canvases)]
    stop_at = (
        4  # records 0 and 1 fill the first shard; record 2 waits in the second when record 3 is interrupted
    )
    with pytest.raises(KeyboardInterrupt):
        collect(target, data, tmp_path / "cut", shard_bytes=sizes[0] + sizes[1])
    index = json.loads((tmp_path / "cut" / "index.json").read_text())
    assert [s["records"] for s in index["shards"]] == [[0, 2]]
    assert not list((tmp_path / "cut").glob("*.tmp"))  # the unfinished shard is gone

    encoded.clear()
    stop_at = None
    progress = Quiet()
    again = collect(target, data, tmp_path / "cut", shard_bytes=sizes[0] + sizes[1], progress=progress)
    prompts = [ex.prompt for _, ex in drafter_data.examples(drafter_data.resolve(data), tokenizer, {1})]
    assert encoded == prompts[2:]  # the first shard's records are not encoded again
    assert any("2 records collected already, continuing with record 3" in line for line in progress.lines)
    assert len(again) == len(whole) and again.records == whole.records
    for i in range(len(whole)):
        np.testing.assert_array_equal(again.window(i), whole.window(i))
    np.testing.assert_array_equal(again.targets(range(len(whole))), whole.targets(range(len(whole))))

    # A complete store is reused as it is (nothing encoded); more records extend it, fewer read part of it.
    encoded.clear()
    assert len(collect(target, data, tmp_path / "cut", shard_bytes=sizes[0] + sizes[1])) == len(whole)
    assert encoded == []
    assert collect(target, data, tmp_path / "cut", max_records=2).records == 2 and encoded == []


def test_a_store_refuses_other_settings_and_other_data(target, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", records(3))
    collect(target, data, tmp_path / "f")
    with pytest.raises(DrafterError, match="collected with context_window 12, this run asks for 6") as e:
        collect(target, data, tmp_path / "f", window=6)
    assert "\n" not in str(e.value) and "--features" in str(e.value)
    changed = records(3)
    changed[1]["completion"] = "something else entirely"
    write_jsonl(data, changed)
    with pytest.raises(DrafterError, match="first 3 records are not those the features"):
        collect(target, data, tmp_path / "f")


def test_features_that_do_not_fit_on_disk_are_refused_before_encoding(target, tmp_path, monkeypatch):
    import shutil as shutil_module
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil_module, "disk_usage", lambda path: usage(10**6, 10**6 - 100, 100))
    data = write_jsonl(tmp_path / "train.jsonl", records(2))
    with pytest.raises(DrafterError, match=r"the features need .* MB more, and .* has 0.0 MB free") as e:
        collect(target, data, tmp_path / "f")
    assert "--max-records" in str(e.value) and "--context-window" in str(e.value)
    assert not list((tmp_path / "f").glob("shard-*"))


def test_distillation_by_generation_streams_into_the_store_too(target, tmp_path):
    """Without --from-data the target answers the prompts (records need no answer) and each committed canvas is
    a sample, its window ending where the cache ended before it."""
    model, tokenizer = target
    data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": r["prompt"]} for r in records(3)])
    store = collect(target, data, tmp_path / "f", from_data=False, max_tokens=16, shard_bytes=1)
    ids = [p for _, p in drafter_data.prompts(drafter_data.resolve(data), tokenizer)]
    memory = distill.collect(model, tokenizer, ids, [1, 3, 5], 12, max_tokens=16)
    assert len(store) == len(memory) >= 3 and store.records == 3
    for i in range(len(store)):
        np.testing.assert_array_equal(store.window(i), memory.window(i))
    np.testing.assert_array_equal(store.targets(range(len(store))), memory.targets(range(len(memory))))


ANSWER = "three words here"
SHAPES = {
    "prompt/completion": {"prompt": "Say it.", "completion": ANSWER},
    "messages": {
        "messages": [{"role": "user", "content": "Say it."}, {"role": "assistant", "content": ANSWER}]
    },
    "sharegpt": {"conversations": [{"from": "human", "value": "Say it."}, {"from": "gpt", "value": ANSWER}]},
    "sharegpt roles": {
        "conversations": [{"role": "user", "content": "Say it."}, {"role": "assistant", "content": ANSWER}]
    },
    "alpaca": {"instruction": "Say it.", "input": "", "output": ANSWER},
    "dolly": {"instruction": "Say it.", "context": "", "response": ANSWER},
    "question/answer": {"question": "Say it.", "answer": ANSWER},
}


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_each_record_shape_is_the_same_conversation(shape):
    want = [{"role": "user", "content": "Say it."}, {"role": "assistant", "content": ANSWER}]
    assert record_messages(SHAPES[shape]) == want
    assert prompt_messages(SHAPES[shape]) == want[:1]


def test_record_shapes_with_a_system_prompt_input_or_no_answer():
    alpaca = {"instruction": "Sort these.", "input": "3 1 2", "output": "1 2 3", "system": "Be brief."}
    assert record_messages(alpaca) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Sort these.\n\n3 1 2"},
        {"role": "assistant", "content": "1 2 3"},
    ]
    sharegpt = {"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "Q"}]}
    assert prompt_messages(sharegpt) == [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}]
    assert prompt_messages({"question": "Q"}) == [{"role": "user", "content": "Q"}]
    with pytest.raises(ValueError, match="must end with the assistant's answer"):
        record_messages(sharegpt)
    with pytest.raises(ValueError, match="turn 1 is from 'narrator'"):
        record_messages({"conversations": [{"from": "narrator", "value": "x"}]})
    with pytest.raises(ValueError, match="'question' and 'answer' must be strings"):
        record_messages({"question": "Q", "answer": 42})


def test_files_of_every_kind_give_the_same_examples(tmp_path):
    """JSONL, a JSON list and JSON Lines named .json, in any shape, encode to the same prompt and answer ids."""
    tokenizer = load_tokenizer(DEMO24)
    eos = {1, 5}
    shapes = [SHAPES[k] for k in sorted(SHAPES)]
    write_jsonl(tmp_path / "a.jsonl", shapes)
    (tmp_path / "b.json").write_text(json.dumps(shapes))
    (tmp_path / "c.json").write_text(json.dumps({"data": shapes}))
    write_jsonl(tmp_path / "d.json", shapes)
    found = [ex for _, ex in drafter_data.examples(drafter_data.resolve(tmp_path), tokenizer, eos)]
    assert len(found) == 4 * len(shapes) and all(ex == found[0] for ex in found)
    limited = list(drafter_data.examples(drafter_data.resolve(tmp_path), tokenizer, eos, limit=3, start=1))
    assert [n for n, _ in limited] == [1, 2]


def test_parquet_files_are_read_with_pyarrow(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([SHAPES["question/answer"]] * 3), tmp_path / "train.parquet")
    got = list(drafter_data.records(drafter_data.resolve(tmp_path / "train.parquet")))
    assert [w for w, _ in got] == ["train.parquet row 1", "train.parquet row 2", "train.parquet row 3"]


def test_parquet_without_pyarrow_is_a_one_line_error(tmp_path, monkeypatch):
    (tmp_path / "train.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow raises ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(DrafterError, match=r"^reading train.parquet needs pyarrow: pip install pyarrow$"):
        list(drafter_data.records(drafter_data.resolve(tmp_path)))


def test_a_folder_or_dataset_picks_the_split_files(tmp_path):
    for name in (
        "data/train-00000-of-00002.jsonl",
        "data/train-00001-of-00002.jsonl",
        "data/test-00000.jsonl",
    ):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        write_jsonl(tmp_path / name, [SHAPES["messages"]])
    (tmp_path / "dataset_info.json").write_text("{}")
    names = lambda split: [f.name for f in drafter_data.resolve(tmp_path, split).files]  # noqa: E731
    assert names("train") == ["train-00000-of-00002.jsonl", "train-00001-of-00002.jsonl"]
    assert names("test") == ["test-00000.jsonl"]
    with pytest.raises(
        DrafterError, match=r"no 'validation' split in .*: its files name the splits test, train"
    ):
        names("validation")
    plain = tmp_path / "plain"
    plain.mkdir()
    write_jsonl(plain / "mine.jsonl", [SHAPES["messages"]])
    assert [f.name for f in drafter_data.resolve(plain).files] == ["mine.jsonl"]


def test_a_hub_dataset_id_is_downloaded_as_a_dataset(tmp_path, monkeypatch):
    """``org/name`` goes to ``snapshot_download(repo_type="dataset")`` (the hub cache first), with patterns for
    the split's data files; the files of the split are read from the snapshot."""
    import huggingface_hub

    snapshot = tmp_path / "snapshot"
    (snapshot / "data").mkdir(parents=True)
    write_jsonl(snapshot / "data" / "train-00000-of-00001.jsonl", [SHAPES["alpaca"]] * 2)
    write_jsonl(snapshot / "data" / "test-00000-of-00001.jsonl", [SHAPES["alpaca"]])
    calls = []

    def fake(repo_id, **kw):
        calls.append((repo_id, kw))
        if kw.get("local_files_only"):
            raise FileNotFoundError("not in the cache")
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    source = drafter_data.resolve("someone/records")
    assert [f.name for f in source.files] == ["train-00000-of-00001.jsonl"]
    assert [kw["local_files_only"] for _, kw in calls] == [True, False]
    repo, kw = calls[-1]
    assert (
        repo == "someone/records" and kw["repo_type"] == "dataset" and "*train*.jsonl" in kw["allow_patterns"]
    )
    assert len(list(drafter_data.records(source))) == 2

    def offline(repo_id, **kw):
        raise ConnectionError("offline")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(DrafterError, match=r"cannot get the dataset someone/records .*ConnectionError") as e:
        drafter_data.resolve("someone/records")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    ("lines", "words"),
    [
        (
            ['{"prompt": "a", "completion": "b"}', '{"text": "x"}'],
            "data.jsonl line 2: expected 'messages' or",
        ),
        (['{"prompt": "a", "completion": "b"}', "", '{"prompt": "a"'], "data.jsonl line 3: not valid JSON"),
        (
            ['{"instruction": "a", "output": 3}'],
            "data.jsonl line 1: 'instruction' and 'output' must be strings",
        ),
    ],
)
def test_bad_records_are_one_line_errors_with_their_line(tmp_path, lines, words):
    tokenizer = load_tokenizer(DEMO24)
    write_jsonl(tmp_path / "data.jsonl", lines)
    with pytest.raises(DrafterError) as e:
        list(drafter_data.examples(drafter_data.resolve(tmp_path / "data.jsonl"), tokenizer, {1}))
    assert str(e.value).startswith(words) and "\n" not in str(e.value)


@pytest.mark.parametrize(
    ("data", "words"),
    [
        ("missing.jsonl", "data not found: missing.jsonl"),
        ("./nowhere", "data not found: ./nowhere"),
        ("notes.txt", "give a .jsonl, .json or .parquet file"),
    ],
)
def test_missing_or_unreadable_data_fails_before_the_target_loads(tmp_path, capsys, monkeypatch, data, words):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("hello\n")
    monkeypatch.setattr(drafter_train, "load", lambda *a: pytest.fail("the target loaded"))
    assert drafter_train.main(["--data", data, "--out", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and words in err and "\n" not in err


def test_progress_is_a_bar_on_a_terminal_and_lines_when_piped():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    for out, bar in ((Terminal(), True), (io.StringIO(), False)):
        with drafter_train.StageProgress(out) as progress:
            for done in range(1, 41):
                progress("encode", done, 40, f"{done} canvases")
            progress.line("a line of its own")
        text = out.getvalue()
        assert ("\r" in text) == bar and "a line of its own" in text
        if not bar:
            assert text.count("encode ") == 20 and "encode 40/40 records, 40 canvases" in text


def test_the_demo_models_drafter_trains_on_its_tasks_records(tmp_path, monkeypatch, capsys):
    """``python -m demo.train_drafter --from-data`` on a copy of the embedded model, a few records and steps."""
    from demo import train_drafter
    from mlx_dgemma import DEFAULT_MODEL

    model_dir = tmp_path / "model"
    shutil.copytree(DEFAULT_MODEL, model_dir)
    shutil.rmtree(model_dir / "drafter")
    argv = ["--model", str(model_dir), "--prompts", "3", "--iters", "2", "--batch-size", "2", "--layers", "1"]
    monkeypatch.setattr(
        sys, "argv", ["train_drafter", *argv, "--work", str(tmp_path / "work"), "--from-data"]
    )
    assert train_drafter.main() == 0
    assert "distillation: " in capsys.readouterr().out
    model, _ = load(model_dir, dtype=mx.float32)
    proposer = make_proposer("auto", model)
    assert isinstance(proposer, DrafterProposer) and proposer.drafter.args.num_layers == 1
