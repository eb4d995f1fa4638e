"""``mlx_dgemma.train``'s command line: mlx-lm lora's names, ``-c config.yaml``, ``--test``, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import mlx_dgemma  # noqa: F401  # isort: skip  (first: it preloads OpenBLAS before mlx loads)
import pytest

from mlx_dgemma.train.checkpoint import current
from mlx_dgemma.train.cli import build_parser, main, parse_args

RECORDS = [
    {"prompt": f"Sort: {i + 3} {i + 1} {i + 2}", "completion": f"{i + 1} {i + 2} {i + 3}"} for i in range(4)
]


def write_data(folder: Path, test: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("train", "valid", *(["test"] if test else [])):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return folder


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def test_no_flag_is_taken_for_an_abbreviation_of_another():
    assert parse_args(["--train"]).train and not parse_args(["--train"]).train_router
    for argv in (["--train-rout"], ["--learning", "1e-3"], ["--grad-acc", "2"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args(argv)


def test_mlx_lm_lora_names_mean_the_same_as_ours():
    ours = parse_args(
        [
            "--out",
            "a",
            "--lr",
            "2e-4",
            "--lora-layers",
            "4",
            "--full",
            "--grad-accum",
            "3",
            "--report-every",
            "5",
            "--val-every",
            "7",
        ]
    )
    theirs = parse_args(
        [
            "--adapter-path",
            "a",
            "--learning-rate",
            "2e-4",
            "--num-layers",
            "4",
            "--fine-tune-type",
            "full",
            "--grad-accumulation-steps",
            "3",
            "--steps-per-report",
            "5",
            "--steps-per-eval",
            "7",
        ]
    )
    keys = ("out", "lr", "lora_layers", "fine_tune_type", "grad_accum", "report_every", "val_every")
    assert (
        [getattr(theirs, k) for k in keys]
        == [getattr(ours, k) for k in keys]
        == ["a", 2e-4, "4", "full", 3, 5, 7]
    )
    assert parse_args(["--num-layers", "-1"]).lora_layers == "all"  # mlx-lm's "every layer"
    assert parse_args([]).fine_tune_type == "lora"


def test_a_yaml_config_in_mlx_lm_form_is_read_and_flags_override_it(tmp_path):
    config = tmp_path / "lora.yaml"
    config.write_text("""
model: some/model
train: true
fine_tune_type: lora
optimizer: adamw
optimizer_config:
  adamw:
    weight_decay: 0.01
data: data
num_layers: 4
batch_size: 2
iters: 30
val_batches: -1
learning_rate: 1e-5
steps_per_report: 5
adapter_path: my_adapters
resume_adapter_file: null
max_seq_length: 2048
grad_checkpoint: true
mask_prompt: true
lr_schedule:
  name: cosine_decay
  warmup: 3
lora_parameters:
  rank: 4
  scale: 10.0
  dropout: 0.05
""")
    args = parse_args(["-c", str(config), "--iters", "7"])
    assert (args.model, args.data, args.out, args.iters, args.batch_size, args.lr) == (
        "some/model",
        "data",
        "my_adapters",
        7,
        2,
        1e-5,
    )
    assert (args.lora_layers, args.rank, args.alpha, args.dropout) == ("4", 4, 40.0, 0.05)
    assert (args.weight_decay, args.lr_schedule, args.warmup, args.report_every) == (0.01, "cosine", 3, 5)
    assert args.val_batches == -1  # mlx-lm's "the whole set"
    assert args.train and args.grad_checkpoint and args.mask_prompt and args.fine_tune_type == "lora"


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("iters: 5\nlearning_rat: 1e-4\n", "unknown key 'learning_rat'"),
        ("iters: many\n", "iters must be an int"),
        ("- a\n- b\n", "must hold a mapping"),
        ("resume_adapter_file: old.safetensors\n", "resume_adapter_file is not supported"),
        ("lora_parameters:\n  keys: [self_attn.q_proj]\n", "lora_parameters.keys is not supported"),
        ("fine_tune_type: qlora\n", "fine_tune_type must be one of lora, dora, full"),
        ("iters: [1\n", "not valid YAML"),
    ],
)
def test_a_bad_config_file_is_a_one_line_error(tmp_path, capsys, text, words):
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    assert main(["-c", str(config), "--data", "nowhere"]) == 2
    assert words in one_line_error(capsys)


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (["--dropout", "1.5"], "dropout must be in [0, 1)"),
        (["--lr", "0"], "learning rate must be a positive number"),
        (["--learning-rate", "nan"], "learning rate must be a positive number"),
        (["--batch-size", "0"], "batch-size must be at least 1"),
        (["--iters", "-1"], "iters must be at least 0"),
        (["--rank", "0"], "rank must be at least 1"),
        (["--grad-accumulation-steps", "0"], "grad-accum must be at least 1"),
        (["--self-conditioning-p", "2"], "self-conditioning probability must be in [0, 1]"),
        (["--fine-tune-type", "dora"], "dora is not supported"),
        (["--test-batches", "0"], "--test-batches must be a positive number or -1"),
        (["--val-batches", "0"], "val-batches must be at least 1, or -1 for all"),
    ],
)
def test_out_of_range_numbers_are_one_line_errors(tmp_path, capsys, flags, words):
    data = write_data(tmp_path / "data")
    assert main(["--data", str(data), "--out", str(tmp_path / "out"), *flags]) == 2
    assert words in one_line_error(capsys)
    assert not (tmp_path / "out").exists()


def test_train_then_test_prints_mlx_lm_s_test_line_and_test_alone_reads_the_adapters(tmp_path, capsys):
    data, out = write_data(tmp_path / "data"), tmp_path / "adapters"
    argv = [
        "--data",
        str(data),
        "--adapter-path",
        str(out),
        "--iters",
        "1",
        "--rank",
        "4",
        "--test",
        "--mask-prompt",
        "--grad-checkpoint",
    ]
    assert main(["--train", *argv]) == 0
    trained = capsys.readouterr().out
    line = next(x for x in trained.splitlines() if x.startswith("Test loss"))
    assert line.endswith(".") and "Test ppl" in line
    assert json.loads((current(out) / "trainer_state.json").read_text())["config"]["objective"]["mask_prompt"]

    assert main(argv) == 0  # --test without --train: evaluate the adapters in --adapter-path, train nothing
    tested = capsys.readouterr().out
    assert "done: step" not in tested and line in tested  # the same adapters and fixed noise: the same loss


def test_test_needs_a_test_file(tmp_path, capsys):
    data = write_data(tmp_path / "data", test=False)
    assert main(["--data", str(data), "--out", str(tmp_path / "a"), "--iters", "1", "--train", "--test"]) == 2
    err = one_line_error(capsys)
    assert "--test needs" in err and "test.jsonl" in err
    assert not (tmp_path / "a").exists()  # refused before training, not after


def test_a_diverging_run_exits_non_zero_with_one_line_and_keeps_its_checkpoint(tmp_path, capsys):
    data, out = write_data(tmp_path / "data"), tmp_path / "adapters"
    code = main(
        [
            "--data",
            str(data),
            "--out",
            str(out),
            "--iters",
            "4",
            "--save-every",
            "1",
            "--rank",
            "4",
            "--lr",
            "1e30",
        ]
    )
    err = one_line_error(capsys)
    assert code == 2 and "not a finite number" in err and "lower the learning rate" in err
    kept = json.loads((out / "checkpoint.json").read_text())["step"]
    assert f"checkpoint (step {kept})" in err and kept < 4
